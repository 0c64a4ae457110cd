"""The `make demo` flow: its stages, their schedule and timing, and the summary it writes.

Each stage is one of the project's own commands, printed before it runs so it can be copied:
prepare the synthetic set, fine-tune the tiny autoencoder, train tiny text-to-image on its cached
latents, train inpainting from it, then evaluation through the plain diffusers pipelines (prompt
fidelity, inpainting fidelity without paste-back, a small guidance sweep) and the full lesion flow.
The training recipes are conf/experiment/demo_{autoencoder,text2image,inpaint}.yaml; the sizes of
the evaluations (and, for the quick profile, the training overrides) are conf/demo/{full,quick}.yaml.
`python -m mame_lightning.demo` is the command-line front end.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mame_lightning import CONF_DIR
from mame_lightning.io import write_text

PROFILE_DIR = Path(CONF_DIR) / "demo"
# What the summary holds the demo to (the figures a `make demo` run should reach on 2 cores).
TARGETS = {"minutes": 15.0, "area_agreement": 0.9, "area_class": 0.8}


class DemoError(ValueError):
    """A demo profile that cannot be used; the message names the file and the key."""


@dataclass
class Profile:
    """Evaluation sizes of one demo flavour, and overrides for every training stage (conf/demo/NAME.yaml)."""

    fidelity_images: int
    inpaint_cases: int
    sweep_scales: List[float]
    sweep_images: int
    steps: int
    train_overrides: List[str] = field(default_factory=list)


def load_profile(name: str, folder: Path = PROFILE_DIR) -> Profile:
    """conf/demo/<name>.yaml checked against `Profile`: a missing, unknown or mistyped key names itself."""
    path = Path(folder) / f"{name}.yaml"
    if not path.is_file():
        choices = ", ".join(sorted(p.stem for p in Path(folder).glob("*.yaml")))
        raise DemoError(f"no demo profile {name!r} ({path} not found; profiles: {choices})")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Profile), OmegaConf.load(path)))
    except OmegaConfBaseException as error:
        what = str(getattr(error, "msg", None) or error).splitlines()[0]
        key = getattr(error, "full_key", None)
        raise DemoError(f"{path}: {key}: {what}" if key else f"{path}: {what}") from None


def scales_override(scales: List[float]) -> str:
    """[1, 4, 7] -> "[1,4,7]": a list value as one Hydra override token (whole numbers without .0)."""
    return "[" + ",".join(f"{s:g}" for s in scales) + "]"


def prepared_dir(prepare_overrides: list[str] = ()) -> Path:
    """Where the prepare stage writes the phantom set (paths.root follows MAME_ROOT)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("prepare", overrides=["dataset=synthetic", *prepare_overrides])
    return Path(str(cfg.dataset.prepared_dir)).resolve()


@dataclass(frozen=True)
class Stage:
    key: str
    title: str
    args: list[str]


def stages(root: Path, p: Profile, prepare_overrides: list[str] = (), prepared: Path | None = None) -> list[Stage]:
    """Every stage in running order; each is a public entry point (module + overrides)."""
    vae = root / "autoencoder" / "export" / "vae"
    t2i, inpaint = root / "text2image" / "export", root / "inpaint" / "export"
    prepared = prepared or prepared_dir(prepare_overrides)
    train = ["trainer.enable_progress_bar=false", *p.train_overrides]
    return [
        Stage("prepare", "Prepare the synthetic phantom set (64 px)",
              ["mame_lightning.prepare", "dataset=synthetic", *prepare_overrides]),
        Stage("autoencoder", "Fine-tune the tiny autoencoder on the phantoms", [
            "mame_lightning.train", "experiment=demo_autoencoder", f"hydra.run.dir={root / 'autoencoder'}", *train]),
        Stage("text2image", "Train tiny text-to-image on cached latents", [
            "mame_lightning.train", "experiment=demo_text2image", f"model.vae_path={vae}",
            f"hydra.run.dir={root / 'text2image'}", *train]),
        Stage("inpaint", "Train inpainting from the text-to-image model (conv_in widened to 9; lesion boxes + "
                         "random masks)", [
            "mame_lightning.train", "experiment=demo_inpaint", f"model.path={t2i}",
            f"hydra.run.dir={root / 'inpaint'}", *train]),
        Stage("fidelity", "Prompt fidelity through stock StableDiffusionPipeline", [
            "mame_lightning.evaluate", "mode=fidelity", "pipeline=stock", f"model_path={t2i}",
            f"out={root / 'fidelity'}", f"fidelity.images_per_prompt={p.fidelity_images}",
            f"guidance.steps={p.steps}", "batch_size=8", "progress=false"]),
        Stage("sweep", "Guidance sweep: MS-SSIM diversity per scale (paper Table 3)", [
            "mame_lightning.evaluate", "mode=sweep", f"model_path={t2i}", f"out={root / 'sweep'}",
            f"guidance.scales={scales_override(p.sweep_scales)}", f"guidance.images_per_prompt={p.sweep_images}",
            f"guidance.steps={p.steps}", "max_prompts=2", f"batch_size={p.sweep_images}", "progress=false"]),
        Stage("inpaint_fidelity", "Inpainting fidelity through stock StableDiffusionInpaintPipeline (no paste-back)", [
            "mame_lightning.evaluate", "mode=inpaint_fidelity", f"model_path={inpaint}", f"prepared_dir={prepared}",
            f"out={root / 'inpaint_fidelity'}", f"inpaint_fidelity.n={p.inpaint_cases}",
            f"guidance.steps={p.steps}", "progress=false"]),
        Stage("full", "Generate a lesion into a healthy synthetic image (full pipeline)", [
            "mame_lightning.generate", "mode=full", f"model_path={t2i}", f"inpaint_model_path={inpaint}",
            "view=MLO", "area=big", "n=2", f"steps={p.steps}", f"out={root / 'full'}"]),
    ]


# Stages run in this order; the lanes of one step run side by side (each on its share of the cores):
# the text-to-image evaluations need only that model, so they run while inpainting trains.
SCHEDULE = (("prepare",), ("autoencoder",), ("text2image",), ("inpaint", "fidelity+sweep"),
            ("inpaint_fidelity", "full"))


@dataclass
class Timing:
    seconds: float
    cpu_seconds: float
    load: float
    beside: str = ""


def run_stage(stage: Stage, log_dir: Path, threads: int | None = None, tag: str = "") -> Timing:
    """Run one stage as a child process, stream its notable lines, return its wall and CPU seconds."""
    command = [sys.executable, "-m", *stage.args]
    print(f"\n==> {stage.title}\n    $ {shlex.join(['python', '-m', *stage.args])}", flush=True)
    started = time.time()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / f"{stage.key}-{int(started)}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log_file, "w") as log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            log.write(line)
            if _worth_showing(line):
                print(f"    {tag}{line.rstrip()}", flush=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = code = os.waitstatus_to_exitcode(status)
    seconds = time.time() - started
    if code != 0:
        tail = log_file.read_text().splitlines()[-30:]
        raise SystemExit(f"stage failed ({stage.title}); last lines of {log_file}:\n" + "\n".join(tail))
    print(f"    {tag}done in {seconds:.0f} s (log: {log_file})", flush=True)
    return Timing(seconds, usage.ru_utime + usage.ru_stime, os.getloadavg()[0])


def run_schedule(all_stages: list[Stage], log_dir: Path) -> tuple[dict[str, Timing], float]:
    """Every step of SCHEDULE in turn, its lanes in parallel threads; (timing per stage, total seconds)."""
    from concurrent.futures import ThreadPoolExecutor

    by_key = {stage.key: stage for stage in all_stages}
    timings: dict[str, Timing] = {}
    started = time.time()
    for step in SCHEDULE:
        lanes = [[by_key[key] for key in lane.split("+")] for lane in step]
        threads = max(1, (os.cpu_count() or 1) // len(lanes)) if len(lanes) > 1 else None

        def run_lane(lane: list[Stage], others: str) -> None:
            for stage in lane:
                timing = run_stage(stage, log_dir, threads, tag=f"[{stage.key}] " if threads else "")
                timing.beside = others
                timings[stage.key] = timing

        with ThreadPoolExecutor(max_workers=len(lanes)) as pool:
            jobs = [pool.submit(run_lane, lane, ", ".join(s.key for other in lanes if other is not lane for s in other))
                    for lane in lanes]
            for job in jobs:
                job.result()
    return {stage.key: timings[stage.key] for stage in all_stages}, time.time() - started


def _worth_showing(line: str) -> bool:
    keys = ("kept", "agreement", "exported", "s/image", "seconds per image", "error", "Sweep", "written",
            "wrote", "| ", "inpainting fidelity")
    progress_bar = "%|" in line or "it/s]" in line or "img/s]" in line
    noise = "Warning" in line or "should be kept in float32" in line
    return any(k in line for k in keys) and not noise and not progress_bar


def class_agreement(entry: dict) -> dict[str, float]:
    """Per prompt class, the share of its images measured as that class (the confusion-matrix rows)."""
    labels, matrix = entry.get("labels") or [], entry.get("matrix") or []
    return {label: row[i] / sum(row) for i, (label, row) in enumerate(zip(labels, matrix)) if sum(row)}


def fidelity_lines(root: Path) -> list[str]:
    path = root / "fidelity" / "fidelity.json"
    if not path.is_file():
        return []
    report = json.loads(path.read_text())
    attrs = report.get("attributes", {})
    lines = [f"Prompt fidelity ({report.get('n_images')} images through {report.get('scheduler', 'the pipeline')}, "
             f"guidance {report.get('guidance')}):"]
    for name in ("area", "view"):
        entry = attrs.get(name)
        if isinstance(entry, dict) and entry.get("agreement") is not None:
            classes = class_agreement(entry)
            per_class = ", ".join(f"{label} {value:.2f}" for label, value in classes.items())
            line = f"- {name} agreement: {entry['agreement']:.2f} (chance {entry['chance']:.2f}; per class: {per_class})"
            if name == "area":
                met = entry["agreement"] >= TARGETS["area_agreement"] and all(
                    v >= TARGETS["area_class"] for v in classes.values())
                line += (f"; target ≥ {TARGETS['area_agreement']} with every class ≥ {TARGETS['area_class']}: "
                         f"{'meets target' if met else 'MISSES target'}")
            lines.append(line)
    return lines


def inpaint_lines(root: Path) -> list[str]:
    from mame_lightning.runs.evaluation.inpaint_fidelity import JSON_FILE, summary_lines

    path = root / "inpaint_fidelity" / JSON_FILE
    if not path.is_file():
        return []
    report = json.loads(path.read_text())
    return [f"Inpainting fidelity ({report['n']} healthy images painted through real lesion masks by "
            f"{report['pipeline']}, guidance {report['guidance']}, no paste-back):"] + [
        f"- {line.removeprefix('inpainting fidelity — ')}" for line in summary_lines(report)]


def summarise(root: Path, timings: dict[str, Timing], total_seconds: float, titles: dict[str, str] | None = None) -> str:
    titles = titles or {}
    lines = ["# mame_lightning demo", "", "| stage | seconds | CPU seconds | load (1 min) at end | ran beside |",
             "|---|---|---|---|---|"]
    lines += [f"| {titles.get(key, key)} | {t.seconds:.0f} | {t.cpu_seconds:.0f} | {t.load:.1f} | {t.beside or '–'} |"
              for key, t in timings.items()]
    lines += ["", f"Total: {total_seconds / 60:.1f} min wall clock (target ≤ {TARGETS['minutes']:.0f} min on 2 cores; "
                  f"{os.cpu_count()} CPUs here; CPU seconds and load say how much work each stage was and how busy "
                  "the machine was)", ""]
    lines += fidelity_lines(root) + [""] + inpaint_lines(root)
    lines += [
        "",
        "Where things are:",
        f"- training sample grids: {root}/text2image/tensorboard/samples/ (and in TensorBoard)",
        f"- per-attribute grids and confusion matrices: {root}/fidelity/",
        f"- inpainting grid (input, mask, painted, zooms, real lesion): {root}/inpaint_fidelity/inpaint_fidelity_grid.png",
        f"- guidance sweep (Table 3 shape): {root}/sweep/sweep.md, plot {root}/sweep/msssim_vs_guidance.png",
        f"- lesion pipeline output: {root}/full/ (images, masks, finding_annotations.csv)",
        f"- exported diffusers pipelines: {root}/text2image/export, {root}/inpaint/export",
        f"- TensorBoard: tensorboard --logdir {root}",
    ]
    return "\n".join(lines) + "\n"


def run(root: Path, profile: Profile, prepare_overrides: list[str] = ()) -> str:
    """Every stage into `root` (logs in root/logs); writes and prints root/summary.md, returns its text."""
    root = Path(root).resolve()
    all_stages = stages(root, profile, list(prepare_overrides))
    timings, total = run_schedule(all_stages, root / "logs")
    summary = summarise(root, timings, total, {stage.key: stage.title for stage in all_stages})
    write_text(root / "summary.md", summary)
    print("\n" + summary)
    return summary


__all__ = ["DemoError", "Profile", "Stage", "Timing", "TARGETS", "SCHEDULE", "load_profile", "stages", "run_stage",
           "run_schedule", "summarise", "run"]
