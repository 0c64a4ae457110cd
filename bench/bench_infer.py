"""Inference: seconds per image of our generation path against StableDiffusionPipeline.

Same weights (an exported tiny model on the CPU), same prompt and seeds. Baselines: the diffusers
pipeline with the same scheduler and steps (24 DPM-Solver++ steps, guidance 4: like for like),
and with SD v1.5's shipped defaults (PNDM, guidance 7.5) at 24 steps. Our path is also tried
with channels-last memory, plain (non-SDPA) attention and torch.compile, to record what wins.
Text-to-image and inpainting; variants take turns image by image.

    python bench/bench_infer.py [--device cuda] [--quick] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import setups
from common import (add_common_args, device_info, device_label, finish_args, format_table, make_record,
                    quiet_warnings, ratio, ratio_line, record_result, resolve_device, step_stats, synchronize)

NAME = "infer"
PROMPTS = {"text2image": "a mammogram in CC view with medium area", "inpaint": "a mammogram with a lesion"}
GUIDANCE, DEFAULT_GUIDANCE = 4.0, 7.5


@dataclass
class Contender:
    """One way of making an image: `draw(seed)` returns it as gray uint8."""

    name: str
    kind: str  # "ours" or "baseline"
    draw: Callable[[int], np.ndarray]
    setup_s: float = 0.0
    note: str = ""


def export_folder(work_dir: Path, cache_dir: Path, task: str, size: int) -> Path:
    """A tiny exported model (diffusers folder + sidecar), written once."""
    folder = Path(work_dir) / f"export_tiny_{task}_{size}"
    if (folder / "mame_lightning.json").is_file():
        return folder
    components = setups.tiny_model(cache_dir, size=size, inpaint=task == "inpaint")
    components.save_pretrained(folder)
    (folder / "mame_lightning.json").write_text(json.dumps({"task": task, "prepare_size": size}))
    return folder


def inpaint_inputs(size: int) -> tuple[np.ndarray, np.ndarray]:
    """A breast-like image and a square lesion mask in its middle (uint8, size×size)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    inside = (x / (0.7 * size)) ** 2 + ((y - size / 2) / (0.45 * size)) ** 2 <= 1.0
    image = np.where(inside, 170, 8).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[size * 3 // 8 : size * 5 // 8, size // 4 : size // 2] = 255
    return image, mask


def gray(images) -> np.ndarray:
    """A PIL image or float array from a pipeline -> gray uint8 (as our path returns it)."""
    first = images[0]
    array = np.asarray(first, dtype=np.float32) / (255.0 if isinstance(first, Image.Image) else 1.0)
    return np.clip(np.rint(array.mean(axis=-1) * 255.0), 0, 255).astype(np.uint8)


def ours(folder: Path, task: str, device: torch.device, size: int, tweak: str = "") -> Contender:
    from mame_lightning.pipelines.generation import GenerationSettings, inpaint, text2image
    from mame_lightning.pipelines.loading import load_folder

    began = time.perf_counter()
    model = load_folder(folder, device=str(device), dtype="auto", scheduler="dpmsolver++")
    apply_tweak(model.pipe, tweak)
    image, mask = inpaint_inputs(size)

    def draw(seed: int) -> np.ndarray:
        settings = GenerationSettings(guidance=GUIDANCE, steps=24, seed=seed, progress=False)
        if task == "inpaint":
            return inpaint(model, image, mask, PROMPTS[task], n=1, settings=settings)[0].image
        return text2image(model, PROMPTS[task], n=1, settings=settings)[0].image

    name = "ours" + (f"+{tweak}" if tweak else "")
    return Contender(name, "ours", draw, time.perf_counter() - began)


def apply_tweak(pipe, tweak: str) -> None:
    """channels_last: NHWC convolutions; plain_attention: no SDPA; compile: torch.compile the UNet."""
    if tweak == "channels_last":
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    elif tweak == "plain_attention":
        from diffusers.models.attention_processor import AttnProcessor

        pipe.unet.set_attn_processor(AttnProcessor())
    elif tweak == "compile":
        pipe.unet = torch.compile(pipe.unet)
    elif tweak:
        raise ValueError(f"unknown tweak {tweak!r}")


def dtype_argument(dtype: torch.dtype) -> dict:
    """diffusers 0.42 renamed from_pretrained's `torch_dtype` to `dtype`."""
    import diffusers
    from packaging.version import Version

    return {"dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype": dtype}


def baseline(folder: Path, task: str, device: torch.device, size: int, defaults: bool) -> Contender:
    """StableDiffusion(Inpaint)Pipeline.from_pretrained, called the way its documentation shows."""
    from diffusers import (DPMSolverMultistepScheduler, PNDMScheduler, StableDiffusionInpaintPipeline,
                           StableDiffusionPipeline)

    began = time.perf_counter()
    cls = StableDiffusionInpaintPipeline if task == "inpaint" else StableDiffusionPipeline
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = cls.from_pretrained(folder, **dtype_argument(dtype), safety_checker=None,
                               requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    if defaults:  # what SD v1.5's scheduler_config.json holds
        pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    else:
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    guidance = DEFAULT_GUIDANCE if defaults else GUIDANCE
    image, mask = inpaint_inputs(size)
    extra = {"image": Image.fromarray(image).convert("RGB"), "mask_image": Image.fromarray(mask)} if task == "inpaint" else {}

    def draw(seed: int) -> np.ndarray:
        generator = torch.Generator("cpu").manual_seed(seed)
        out = pipe(PROMPTS[task], num_inference_steps=24, guidance_scale=guidance, generator=generator,
                   height=size, width=size, **extra)
        return gray(out.images)

    name = "diffusers PNDM defaults" if defaults else "diffusers DPM++ (same settings)"
    return Contender(name, "baseline", draw, time.perf_counter() - began)


def contenders(folder: Path, task: str, device: torch.device, size: int, tweaks: list[str]) -> list[Contender]:
    out = [baseline(folder, task, device, size, defaults=False), baseline(folder, task, device, size, defaults=True),
           ours(folder, task, device, size)]
    out += [ours(folder, task, device, size, tweak) for tweak in tweaks]
    return out


def timed(draw: Callable[[int], np.ndarray], seed: int, device: torch.device) -> tuple[float, np.ndarray]:
    synchronize(device)
    began = time.perf_counter()
    image = draw(seed)
    synchronize(device)
    return time.perf_counter() - began, image


def measure(task: str, entries: list[Contender], device: torch.device, images: int, warmup: int) -> list[dict]:
    """Every contender draws image i before any draws image i+1 (seeds 0.. shared)."""
    times: dict[str, list[float]] = {c.name: [] for c in entries}
    first_images: dict[str, np.ndarray] = {}
    first_call: dict[str, float] = {}
    for index in range(warmup + images):
        for entry in entries:
            seconds, image = timed(entry.draw, index, device)
            if index == 0:
                first_images[entry.name], first_call[entry.name] = image, seconds
            if index >= warmup:
                times[entry.name].append(seconds)
    reference = next(c for c in entries if c.kind == "baseline")
    # our inpainting keeps the input outside the mask; the pipeline re-encodes it, so compare inside only
    region = inpaint_inputs(first_images[reference.name].shape[0])[1] > 0 if task == "inpaint" else slice(None)
    rows = []
    for entry in entries:
        stats = step_stats(times[entry.name])
        diff = np.abs(first_images[entry.name][region].astype(int) - first_images[reference.name][region].astype(int)).max()
        rows.append({"task": task, "variant": entry.name, "kind": entry.kind, "s_per_image": stats["median_s"],
                     "mean_s": stats["mean_s"], "images": stats["n"], "load_s": entry.setup_s,
                     "first_image_s": first_call[entry.name], "max_diff_vs_same_settings": int(diff)})
    same = rows[0]["s_per_image"]
    for row in rows:
        row["speedup_vs_same_settings"] = ratio(same, row["s_per_image"])
    return rows


def summary_ratios(rows: list[dict]) -> dict:
    ratios = {}
    for task in PROMPTS:
        mine = [r for r in rows if r["task"] == task]
        if not mine:
            continue
        by_name = {r["variant"]: r for r in mine}
        best = min((r for r in mine if r["kind"] == "ours"), key=lambda r: r["s_per_image"])
        for r in mine:
            r["best_ours"] = r is best
        same, defaults = by_name["diffusers DPM++ (same settings)"], by_name["diffusers PNDM defaults"]
        ratios[f"{task}.ours_vs_same"] = ratio(same["s_per_image"], by_name["ours"]["s_per_image"])
        ratios[f"{task}.best_vs_same"] = ratio(same["s_per_image"], best["s_per_image"])
        ratios[f"{task}.ours_vs_defaults"] = ratio(defaults["s_per_image"], by_name["ours"]["s_per_image"])
    return ratios


COLUMNS = [("task", "task"), ("variant", "variant"), ("s_per_image", "s/image"), ("speedup_vs_same_settings", "speed-up"),
           ("first_image_s", "first image s"), ("load_s", "load s"), ("max_diff_vs_same_settings", "max |diff| (first image)"),
           ("best_ours", "fastest ours")]


def run(args) -> dict:
    device = resolve_device(args.device)
    facts = device_info(device)
    size = 32 if args.quick else args.size
    images, warmup = (1, 1) if args.quick else (args.images, args.warmup)
    tweaks = [] if args.quick else ["channels_last", "plain_attention"] + (["compile"] if args.compile else [])
    rows = []
    with quiet_warnings():
        for task in args.tasks:
            print(f"[infer] {task} ...", flush=True)
            folder = export_folder(args.work_dir, args.cache_dir, task, size)
            with torch.inference_mode():
                rows += measure(task, contenders(folder, task, device, size, tweaks), device, images, warmup)
    ratios = summary_ratios(rows)
    facts["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    table = format_table(rows, COLUMNS, title=f"Inference, 24 steps, tiny model at {size} px, on {device_label(facts)}")
    config = {"model": "tiny", "size": size, "steps": 24, "guidance": GUIDANCE, "images": images, "warmup": warmup,
              "tweaks": tweaks, "tasks": args.tasks, "quick": args.quick}
    record_result(args, NAME, make_record(NAME, facts, config, rows, ratios))
    print(table)
    print(ratio_line(NAME, ratios), flush=True)
    return {"name": NAME, "rows": rows, "ratios": ratios, "table": table}


def parser() -> argparse.ArgumentParser:
    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--images", type=int, default=4, help="timed images per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed images per variant")
    p.add_argument("--tasks", nargs="+", choices=tuple(PROMPTS), default=list(PROMPTS))
    p.add_argument("--compile", action="store_true", help="also try torch.compile on the UNet (slow first image)")
    return p


def main(argv: list[str] | None = None) -> dict:
    return run(finish_args(parser().parse_args(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
