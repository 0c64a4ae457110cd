"""`make demo`: the whole MAM-E flow on the built-in synthetic phantoms, on a CPU, in minutes.

Each stage is one of the project's own commands, printed before it runs so it can be copied:
prepare the synthetic set, fine-tune the tiny autoencoder, train tiny text-to-image on its cached
latents, a short inpainting run, then evaluation (prompt fidelity with a grid per attribute, and a
small guidance sweep). `python -m mame_lightning.demo --quick` runs the same flow with a handful of
steps (a smoke test, not a model that learns).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Profile:
    """Step counts and sizes of one demo flavour."""

    autoencoder_steps: int
    text2image_steps: int
    inpaint_steps: int
    batch_size: int
    fidelity_images: int
    sweep_scales: str
    sweep_images: int
    steps: int


FULL = Profile(autoencoder_steps=200, text2image_steps=1500, inpaint_steps=100, batch_size=32,
               fidelity_images=8, sweep_scales="[1,4,7]", sweep_images=6, steps=24)
QUICK = Profile(autoencoder_steps=4, text2image_steps=4, inpaint_steps=2, batch_size=4,
                fidelity_images=1, sweep_scales="[4]", sweep_images=2, steps=2)


def stages(root: Path, p: Profile, prepare_overrides: list[str] = ()) -> list[tuple[str, list[str]]]:
    """(title, module + overrides) of each stage; every one is a public entry point."""
    vae = root / "autoencoder" / "export" / "vae"
    t2i, inpaint = root / "text2image" / "export", root / "inpaint" / "export"
    every = max(p.text2image_steps // 3, 1)
    quiet = ["trainer.enable_progress_bar=false", f"trainer.val_check_interval={every}",
             f"callbacks.checkpoint.every_n_train_steps={every}"]
    return [
        ("Prepare the synthetic phantom set (64 px)",
         ["mame_lightning.prepare", "dataset=synthetic", *prepare_overrides]),
        ("Fine-tune the tiny autoencoder on the phantoms", [
            "mame_lightning.train", "task=autoencoder", f"hydra.run.dir={root / 'autoencoder'}",
            f"trainer.max_steps={p.autoencoder_steps}", "dataset.batch_size=8", "optimizer.lr=1e-3",
            "callbacks.sample_grid=null", *quiet]),
        ("Train tiny text-to-image on cached latents", [
            "mame_lightning.train", "task=text2image", f"model.vae_path={vae}", "dataset.latent_cache=true",
            f"hydra.run.dir={root / 'text2image'}", f"trainer.max_steps={p.text2image_steps}",
            f"dataset.batch_size={p.batch_size}", "optimizer.lr=1e-3", f"callbacks.sample_grid.every_n_steps={every}",
            *quiet]),
        ("Short inpainting run, starting from the text-to-image model (conv_in widened to 9)", [
            "mame_lightning.train", "task=inpaint", "model=sd15_inpaint", f"model.path={root / 'text2image' / 'export'}",
            f"hydra.run.dir={root / 'inpaint'}", f"trainer.max_steps={p.inpaint_steps}",
            "dataset.batch_size=8", "dataset.latent_cache=true", "optimizer.lr=1e-3", *quiet]),
        ("Prompt fidelity: generate per attribute and measure", [
            "mame_lightning.evaluate", "mode=fidelity", f"model_path={t2i}", f"out={root / 'fidelity'}",
            f"fidelity.images_per_prompt={p.fidelity_images}", f"guidance.steps={p.steps}"]),
        ("Guidance sweep: MS-SSIM diversity per scale (paper Table 3)", [
            "mame_lightning.evaluate", "mode=sweep", f"model_path={t2i}", f"out={root / 'sweep'}",
            f"guidance.scales={p.sweep_scales}", f"guidance.images_per_prompt={p.sweep_images}",
            f"guidance.steps={p.steps}", "max_prompts=2"]),
        ("Generate a lesion into a healthy synthetic image (full pipeline)", [
            "mame_lightning.generate", "mode=full", f"model_path={t2i}", f"inpaint_model_path={inpaint}",
            "view=MLO", "area=big", "n=2", f"steps={p.steps}", f"out={root / 'full'}"]),
    ]


def run_stage(title: str, args: list[str], log_dir: Path) -> float:
    command = [sys.executable, "-m", *args]
    print(f"\n==> {title}\n    $ {shlex.join(['python', '-m', *args])}", flush=True)
    started = time.time()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / f"{args[0].split('.')[-1]}-{int(started)}.log"
    with open(log_file, "w") as log:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            log.write(line)
            if _worth_showing(line):
                print("    " + line.rstrip(), flush=True)
        code = proc.wait()
    seconds = time.time() - started
    if code != 0:
        tail = log_file.read_text().splitlines()[-30:]
        raise SystemExit(f"stage failed ({title}); last lines of {log_file}:\n" + "\n".join(tail))
    print(f"    done in {seconds:.0f} s (log: {log_file})", flush=True)
    return seconds


def _worth_showing(line: str) -> bool:
    keys = ("kept", "agreement", "exported", "s/image", "seconds per image", "error", "Sweep", "written",
            "wrote", "| ")
    progress_bar = "%|" in line or "it/s]" in line or "img/s]" in line
    noise = "Warning" in line or "should be kept in float32" in line
    return any(k in line for k in keys) and not noise and not progress_bar


def summarise(root: Path, timings: dict[str, float]) -> str:
    lines = ["# mame_lightning demo", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {title} | {seconds:.0f} |" for title, seconds in timings.items()]
    lines += ["", f"Total: {sum(timings.values()) / 60:.1f} min", ""]
    fidelity = root / "fidelity" / "fidelity.json"
    if fidelity.is_file():
        report = json.loads(fidelity.read_text())
        attrs = report.get("attributes", report)
        for name in ("area", "view"):
            entry = attrs.get(name) if isinstance(attrs, dict) else None
            if isinstance(entry, dict) and entry.get("agreement") is not None:
                chance = 1 / max(1, len(entry.get("labels") or [1]))
                lines.append(f"Prompt fidelity — {name} agreement: {entry['agreement']:.2f} (chance {chance:.2f})")
    lines += [
        "",
        "Where things are:",
        f"- training sample grids: {root}/text2image/tensorboard/samples/ (and in TensorBoard)",
        f"- per-attribute grids and confusion matrices: {root}/fidelity/",
        f"- guidance sweep (Table 3 shape): {root}/sweep/sweep.md, plot {root}/sweep/msssim_vs_guidance.png",
        f"- lesion pipeline output: {root}/full/ (images, masks, finding_annotations.csv)",
        f"- exported diffusers pipelines: {root}/text2image/export, {root}/inpaint/export",
        f"- TensorBoard: tensorboard --logdir {root}",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="outputs/demo", help="where the demo's runs go (default outputs/demo)")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage: checks the flow, learns nothing")
    parser.add_argument("--prepare-override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra override for the synthetic set, e.g. dataset.source.n=64 (repeatable)")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    profile = QUICK if args.quick else FULL
    timings: dict[str, float] = {}
    for title, stage_args in stages(root, profile, args.prepare_override):
        timings[title] = run_stage(title, stage_args, root / "logs")
    summary = summarise(root, timings)
    (root / "summary.md").write_text(summary)
    print("\n" + summary)


if __name__ == "__main__":
    main()
