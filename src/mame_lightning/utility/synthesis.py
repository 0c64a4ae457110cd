"""Synthetic training images through the project's full pipeline (pipelines/full.py).

Each synthetic pair is a healthy text-to-image mammogram and the same image with a lesion painted
into a box inside the breast; the healthy original is the control, so the two classes differ only
where the lesion is. Prompts cycle through every attribute combination the text-to-image model was
trained on; pair i uses seed `synthesis.seed + i`. One `run_full` call per prompt writes a part
folder, whose `finding_annotations.csv` gives each lesion's box. The first pair is timed alone: if
the whole set would not fit in `synthesis.budget_s`, the run stops there, before any training.
A finished set (`synthesis.json`, written last) is reused when its settings and models match.
"""

from __future__ import annotations

import json
import time

import numpy as np
from dataclasses import asdict, dataclass
from pathlib import Path

from mame_lightning.eval.report import read_csv
from mame_lightning.io import write_json
from mame_lightning.pipelines.full import FINDINGS_FILE, run_full
from mame_lightning.pipelines.generation import GenerationSettings, inpaint, text2image
from mame_lightning.pipelines.loading import load_model
from mame_lightning.pipelines.prompting import build_prompt
from mame_lightning.utility.checks import UtilityError, check_budget
from mame_lightning.utility.split import HEALTHY, LESION, Sample

MANIFEST = "synthesis.json"


@dataclass(frozen=True)
class SynthesisSettings:
    steps: int = 24
    guidance: float = 4.0
    scheduler: str = "dpmsolver++"
    seed: int = 1000
    lesion_prompt: str | None = None
    lesion_box_size: float = 0.125
    box: str | None = None
    budget_s: float = 600.0
    device: str = "auto"
    dtype: str = "auto"


def prompt_plan(metadata: dict, n: int) -> list[tuple[str, int]]:
    """(prompt, number of pairs) per attribute combination of the model, n spread evenly over them
    (fewer pairs than combinations: combinations evenly spaced over the list)."""
    from mame_lightning.runs.evaluation.inputs import attribute_combinations

    prompts = [build_prompt(metadata, attributes=combo) for combo in attribute_combinations(metadata, limit=n)]
    prompts = list(dict.fromkeys(prompts)) or [build_prompt(metadata)]
    counts = [n // len(prompts) + (i < n % len(prompts)) for i in range(len(prompts))]
    return [(p, c) for p, c in zip(prompts, counts) if c]


def part_jobs(plan: list[tuple[str, int]], seed: int) -> list[tuple[str, int, int]]:
    """(prompt, n, first seed) per run_full call; the very first pair is a call of its own (the probe)."""
    jobs, next_seed = [], int(seed)
    for index, (prompt, count) in enumerate(plan):
        sizes = [1, count - 1] if index == 0 else [count]
        for size in (s for s in sizes if s):
            jobs.append((prompt, size, next_seed))
            next_seed += size
    return jobs


def warm_up(t2i, inpainter, prompt: str, lesion_prompt: str, guidance: float) -> None:
    """One untimed two-step pair: first-call set-up (kernels, caches, allocations) costs several
    pairs' worth of time and must not count against the budget."""
    quick = GenerationSettings(guidance=guidance, steps=2, seed=0, progress=False)
    healthy = text2image(t2i, prompt, 1, quick)[0].image
    mask = np.zeros_like(healthy)
    side = healthy.shape[0]
    mask[side // 4:side // 2, side // 4:side // 2] = 255
    inpaint(inpainter, healthy, mask, lesion_prompt, 1, quick)


def _fingerprint(settings: SynthesisSettings, n: int, t2i: Path, inpainter: Path) -> dict:
    def stamp(folder: Path) -> dict:
        index = folder / "model_index.json"
        return {"path": str(folder.resolve()), "mtime": index.stat().st_mtime_ns}

    return {"n": int(n), "settings": asdict(settings), "text2image": stamp(t2i), "inpaint": stamp(inpainter)}


def generate_synthetic(t2i_path, inpaint_path, n: int, settings: SynthesisSettings, out) -> dict:
    """Write (or reuse) n lesion images and their n healthy originals under `out`; returns the manifest."""
    out, t2i_path, inpaint_path = Path(out), Path(t2i_path), Path(inpaint_path)
    wanted = _fingerprint(settings, n, t2i_path, inpaint_path)
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("fingerprint") == wanted:
            return {**manifest, "reused": True}
        manifest_path.unlink()
    load = dict(device=settings.device, dtype=settings.dtype, scheduler=settings.scheduler)
    t2i, inpainter = load_model(t2i_path, **load), load_model(inpaint_path, **load)
    lesion_prompt = settings.lesion_prompt or build_prompt(inpainter.metadata, "inpaint")
    jobs = part_jobs(prompt_plan(t2i.metadata, n), settings.seed)
    warm_up(t2i, inpainter, jobs[0][0], lesion_prompt, settings.guidance)
    parts, started = [], time.perf_counter()
    for index, (prompt, size, seed) in enumerate(jobs):
        folder = out / f"part_{index:03d}"
        began = time.perf_counter()
        try:
            run_full(t2i, inpainter, prompt, folder, n=size, lesion_prompt=lesion_prompt, box=settings.box,
                     lesion_box_size=settings.lesion_box_size,
                     settings=GenerationSettings(guidance=settings.guidance, steps=settings.steps, seed=seed,
                                                 progress=len(jobs) == 1 or index > 0))
        except ValueError as error:
            raise UtilityError(f"synthesis (prompt {prompt!r}, seeds {seed}..{seed + size - 1}): {error}") from error
        if index == 0:
            check_budget(n, time.perf_counter() - began, settings.budget_s)
        parts.append({"folder": folder.name, "prompt": prompt, "n": size, "seed": seed})
    seconds = time.perf_counter() - started
    manifest = {"fingerprint": wanted, "n": n, "lesion_prompt": lesion_prompt, "parts": parts,
                "seconds": round(seconds, 2), "seconds_per_pair": round(seconds / max(n, 1), 3)}
    write_json(manifest_path, manifest)
    return {**manifest, "reused": False}


def synthetic_samples(out, manifest: dict) -> list[Sample]:
    """Lesion samples (boxes from each part's finding_annotations.csv) and their healthy controls."""
    samples = []
    for part in manifest["parts"]:
        folder = Path(out) / part["folder"]
        for row in read_csv(folder / FINDINGS_FILE):
            image_id = row["image_id"]
            box = tuple(float(row[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
            group = f"synthetic:{part['folder']}/{image_id}"
            samples.append(Sample(str(folder / "images" / f"{image_id}.png"), LESION, group, "synthetic",
                                  f"{part['folder']}/{image_id}", (box,)))
            samples.append(Sample(str(folder / "healthy" / f"{image_id}.png"), HEALTHY, group, "synthetic",
                                  f"{part['folder']}/{image_id}/healthy"))
    return samples
