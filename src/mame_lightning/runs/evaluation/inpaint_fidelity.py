"""`mode=inpaint_fidelity`: healthy images painted through real lesion masks, scored outside and inside.

Healthy images of a prepared set are painted through real lesion masks by the exported model,
loaded as any diffusers user loads it (`StableDiffusionInpaintPipeline.from_pretrained`) and called
plainly: no paste-back of the input outside the mask, which would hide a model that repaints
everything. The metrics are in `eval/inpaint_fidelity.py`; this module picks the cases, drives the
pipeline and writes inpaint_fidelity.json, inpaint_fidelity_cases.csv and inpaint_fidelity_grid.png.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from tqdm.auto import tqdm

from mame_lightning.eval.inpaint_fidelity import (GRID_COLUMNS, Case, Lesion, Painter, evaluate_painter, grid_rows,
                                                  pick_cases, real_contrasts)
from mame_lightning.eval.report import write_csv
from mame_lightning.io import write_json, write_png
from mame_lightning.pipelines.generation import generators, to_gray_uint8
from mame_lightning.pipelines.loading import LoadedModel
from mame_lightning.runs.evaluation.grids import sample_grid
from mame_lightning.runs.evaluation.inputs import EvaluationError, check_model_paths, load_images, model_paths
from mame_lightning.runs.evaluation.loading import load_for

JSON_FILE, CASES_FILE, GRID_FILE = "inpaint_fidelity.json", "inpaint_fidelity_cases.csv", "inpaint_fidelity_grid.png"


def _records(prepared_dir: Path, task: str) -> tuple[Path, list[dict]]:
    folder = Path(prepared_dir) / task
    path = folder / "metadata.jsonl"
    if not path.is_file():
        raise EvaluationError(f"mode=inpaint_fidelity needs prepared_dir=PREPARED (with text2image/ and inpaint/): "
                              f"{path} not found")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise EvaluationError(f"{path}: line {number}: not valid JSON ({error.msg})") from error
    if not records:
        raise EvaluationError(f"{path}: no images")
    return folder, records


def load_lesions(prepared_dir: Path) -> list[Lesion]:
    """Every lesion box of the prepared inpainting set, with its image."""
    from mame_lightning.data.records import Box

    folder, records = _records(prepared_dir, "inpaint")
    images = load_images([folder / r["file_name"] for r in records])
    lesions = []
    for record, image in zip(records, images):
        for box in record.get("boxes") or []:
            parsed = Box.from_list(box)
            lesions.append(Lesion(record["id"], image, parsed, parsed.category, record.get("view"), record.get("area")))
    if not lesions:
        raise EvaluationError(f"{folder / 'metadata.jsonl'}: no lesion boxes (boxes) to take masks from")
    return lesions


def load_healthy(prepared_dir: Path, limit: int | None, seed: int) -> list[tuple[str, np.ndarray, dict]]:
    """Healthy images (the text-to-image set), a seeded sample of at most `limit`."""
    folder, records = _records(prepared_dir, "text2image")
    if limit and len(records) > int(limit):
        picks = np.sort(np.random.default_rng(seed).choice(len(records), int(limit), replace=False))
        records = [records[i] for i in picks]
    images = load_images([folder / r["file_name"] for r in records])
    return [(r["id"], image, {"view": r.get("view"), "area": r.get("area")}) for r, image in zip(records, images)]


def pipeline_painter(model: LoadedModel, prompt: str, guidance: float, steps: int) -> Painter:
    """The plain pipeline call: prompt, image, mask_image, steps, guidance, one generator per image."""

    @torch.inference_mode()
    def paint(images: list[np.ndarray], masks: list[np.ndarray], seeds: list[int]) -> list[np.ndarray]:
        height, width = images[0].shape
        out = model.pipe(prompt=[prompt] * len(images), image=[Image.fromarray(i).convert("RGB") for i in images],
                         mask_image=[Image.fromarray(m) for m in masks], height=height, width=width,
                         num_inference_steps=int(steps), guidance_scale=float(guidance), generator=generators(seeds),
                         output_type="np")
        return to_gray_uint8(out.images)

    return paint


def pipeline_roundtrip(model: LoadedModel) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    """Encode and decode through the pipeline's own VAE and image processor (the posterior mode)."""
    pipe = model.pipe

    @torch.inference_mode()
    def roundtrip(images: list[np.ndarray]) -> list[np.ndarray]:
        pixels = pipe.image_processor.preprocess([Image.fromarray(i).convert("RGB") for i in images])
        pixels = pixels.to(device=pipe.vae.device, dtype=pipe.vae.dtype)
        decoded = pipe.vae.decode(pipe.vae.encode(pixels).latent_dist.mode()).sample
        return to_gray_uint8(pipe.image_processor.postprocess(decoded, output_type="np"))

    return roundtrip


def inpaint_prompt(cfg: DictConfig, model: LoadedModel | None) -> str:
    from mame_lightning.pipelines.prompting import model_template

    given = cfg.inpaint_fidelity.get("prompt")
    if given:
        return str(given)
    return model_template(model.metadata if model is not None else {}, "inpaint")


def cases_for(cfg: DictConfig) -> tuple[list[Case], dict[str, list[float]], int]:
    """The cases to paint, the real lesions' contrasts by category and the ring width used."""
    icfg = cfg.inpaint_fidelity
    if not cfg.get("prepared_dir"):
        raise EvaluationError("mode=inpaint_fidelity needs prepared_dir=PREPARED (the prepared set: healthy "
                              "images from text2image/, lesion masks and real lesions from inpaint/)")
    prepared = Path(str(cfg.prepared_dir)).expanduser()
    lesions = load_lesions(prepared)
    healthy = load_healthy(prepared, icfg.get("healthy_max"), int(cfg.seed))
    ring_px = int(icfg.ring_px) if icfg.get("ring_px") else max(2, healthy[0][1].shape[0] // 16)
    cases = pick_cases(lesions, healthy, int(icfg.n), ring_px, seed=int(cfg.seed))
    if not cases:
        raise EvaluationError(f"{prepared}: no lesion box fits on the tissue of any healthy image")
    return cases, real_contrasts(lesions, ring_px), ring_px


def run_inpaint_fidelity(cfg: DictConfig, out: str | Path) -> dict:
    """Paint healthy images through real lesion masks with the plain pipeline (stock unless told)."""
    path = check_model_paths(model_paths(cfg))[0]
    return score_inpainting(cfg, Path(out), model=load_for(cfg, path, "stock"))


def score_inpainting(cfg: DictConfig, out: Path, model: LoadedModel | None = None, painter: Painter | None = None,
                     roundtrip=None) -> dict:
    """Score `painter` (default: the model's plain pipeline) on the prepared set's cases; write the outputs."""
    icfg = cfg.inpaint_fidelity
    cases, real, ring_px = cases_for(cfg)
    if painter is None or roundtrip is None:
        if model is None:
            raise EvaluationError("inpaint_fidelity needs a model (model_path=EXPORT) or a painter")
        if model.task != "inpaint":
            raise EvaluationError(f"{model.path} is a {model.task} model; inpaint_fidelity evaluates inpainting models")
        painter = painter or pipeline_painter(model, inpaint_prompt(cfg, model), float(icfg.guidance),
                                              int(cfg.guidance.steps))
        roundtrip = roundtrip or pipeline_roundtrip(model)
    grow_px = int(icfg.get("grow_px") if icfg.get("grow_px") is not None else
                  (model.vae_scale_factor if model is not None else 0))
    with tqdm(total=len(cases), desc="inpaint fidelity", unit="image", disable=not cfg.progress) as bar:
        report, painted = evaluate_painter(painter, roundtrip, cases, real, ring_px, grow_px,
                                           batch_size=int(icfg.batch_size), progress=bar.update)
    out.mkdir(parents=True, exist_ok=True)
    rows = report.pop("rows")
    write_csv(out / CASES_FILE, [{**r, "box": " ".join(map(str, r["box"]))} for r in rows])
    grid = Image.fromarray(sample_grid(grid_rows(cases, painted, int(icfg.grid_rows))))
    scale = max(1, 128 // cases[0].image.shape[0])  # small images are enlarged so a lesion is visible
    write_png(out / GRID_FILE, grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST))
    report.update(model_path=model.path if model is not None else None,
                  pipeline=model.scheduler if model is not None else "custom painter",
                  prompt=inpaint_prompt(cfg, model), guidance=float(icfg.guidance), steps=int(cfg.guidance.steps),
                  grid=str(out / GRID_FILE), grid_columns=list(GRID_COLUMNS), cases_csv=str(out / CASES_FILE),
                  paste_back=False)
    write_json(out / JSON_FILE, report)
    for line in summary_lines(report):
        print(line)
    return report


def summary_lines(report: dict) -> list[str]:
    """Two lines with the figures and whether each target is met (the demo summary quotes them)."""
    outside, lesion = report["outside"], report["contrast"]
    verdict = {True: "meets target", False: "MISSES target"}
    categories = ", ".join(f"{name} {c['ratio']:.2f}× (n={c['n']}{'' if c['measurable'] else ', not judged'})"
                           for name, c in lesion["categories"].items())
    return [
        f"inpainting fidelity — outside the mask: change {outside['change']:.1f} grey levels = "
        f"{outside['ratio']:.2f}× the VAE round trip ({outside['vae_roundtrip']:.1f}); target ≤ "
        f"{outside['target']}×: {verdict[outside['pass']]}",
        f"inpainting fidelity — lesion contrast: {lesion['ratio']:.2f}× real lesions' (mean painted "
        f"{lesion['painted']:.1f}, real {lesion['real']:.1f} grey levels; {lesion['visible']:.0%} of cases at least "
        f"{lesion['target']}× real; by category: {categories}); target ≥ {lesion['target']}× over the judged "
        f"cases: {verdict[lesion['pass']]}",
    ] + ([f"inpainting fidelity — below {lesion['target']}× in: {', '.join(lesion['below'])} (the inpainting prompt "
          "names no category; these are painted less conspicuous than their real counterparts)"]
         if lesion.get("below") else []) + ([f"inpainting fidelity — not judged: {', '.join(lesion['unmeasurable'])} (real lesions' contrast within "
          "healthy tissue's spread at this image size)"] if lesion["unmeasurable"] else [])


__all__ = ["run_inpaint_fidelity", "score_inpainting", "pipeline_painter", "pipeline_roundtrip", "load_lesions",
           "load_healthy", "cases_for", "summary_lines"]
