"""Inference: seconds per image of our generation path against StableDiffusionPipeline.

Same weights (an exported tiny model on the CPU), same prompt and seeds. Baselines: the diffusers
pipeline with the same scheduler and steps (24 DPM-Solver++ steps, guidance 4: like for like),
called as its documentation shows (one call per image with its own generator), and with SD
v1.5's shipped defaults (PNDM, guidance 7.5) at 24 steps. Our path: one image per call, batches
of 4 and 8 (`batch_size`; the first image of a call comes alone), without the prompt-embedding
cache, channels-last, plain (non-SDPA) attention, torch.compile (`--compile`), and the
approximate `accelerate=deepcache` (pixels change: mean SSIM to our exact images, and with a
trained model the prompt-fidelity agreement change). Variants take turns call by call.

    python bench/bench_infer.py [--device cuda] [--quick] [--compile] [--fidelity-model EXPORT_DIR]
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
from infer_quality import DEFAULT_FIDELITY_MODEL, SSIM_BAR, add_fidelity, equal_output, mean_ssim
from common import (REPO_ROOT, add_common_args, device_info, device_label, finish_args, format_table, make_record,
                    quiet_warnings, ratio, ratio_line, record_result, resolve_device, step_stats, synchronize)

NAME = "infer"
PROMPTS = {"text2image": "a mammogram in CC view with medium area", "inpaint": "a mammogram with a lesion"}
GUIDANCE, DEFAULT_GUIDANCE = 4.0, 7.5


@dataclass
class Contender:
    """One way of making images: `draw(seeds)` returns them (gray uint8) and the seconds until the
    first was ready (None: the whole call); `batch` seeds per call."""

    name: str
    kind: str  # "baseline", "ours" (meant to draw the same images) or "approx" (changes pixels)
    draw: Callable[[list[int]], tuple[list[np.ndarray], float | None]]
    setup_s: float = 0.0
    note: str = ""
    batch: int = 1


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


def default_batch() -> int:
    """What `python -m mame_lightning.generate` uses when not told (conf/generate.yaml)."""
    from omegaconf import OmegaConf

    return int(OmegaConf.load(REPO_ROOT / "src/mame_lightning/conf/generate.yaml").batch_size)


def ours_name(batch: int = 1, tweak: str = "", accelerate: str = "none", interval: int = 3,
              prompt_cache: bool = True) -> str:
    name = "ours" + (f", batch {batch}" if batch > 1 else "") + (f"+{tweak}" if tweak else "")
    name += f" + deepcache {interval}" if accelerate == "deepcache" else ""
    return name + ("" if prompt_cache else ", no prompt cache")


def ours(folder: Path, task: str, device: torch.device, size: int, tweak: str = "", *, batch: int = 1,
         accelerate: str = "none", interval: int = 3, prompt_cache: bool = True) -> Contender:
    from mame_lightning.pipelines.generation import GenerationSettings, inpaint, text2image
    from mame_lightning.pipelines.loading import load_folder

    began = time.perf_counter()
    model = load_folder(folder, device=str(device), dtype="auto", scheduler="dpmsolver++")
    apply_tweak(model.pipe, tweak)
    image, mask = inpaint_inputs(size)

    def draw(seeds: list[int]) -> tuple[list[np.ndarray], float]:
        if not prompt_cache:
            model.prompt_cache.clear()
        settings = GenerationSettings(guidance=GUIDANCE, steps=24, seed=seeds[0], batch_size=batch, progress=False,
                                      accelerate=accelerate, deepcache_interval=interval)
        if task == "inpaint":
            results = inpaint(model, image, mask, PROMPTS[task], n=len(seeds), settings=settings)
        else:
            results = text2image(model, PROMPTS[task], n=len(seeds), settings=settings)
        return [r.image for r in results], results[0].seconds  # the first image comes alone

    kind = "approx" if accelerate != "none" else "ours"
    name = ours_name(batch, tweak, accelerate, interval, prompt_cache)
    return Contender(name, kind, draw, time.perf_counter() - began, batch=batch)


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

    def draw(seeds: list[int]) -> tuple[list[np.ndarray], None]:
        images = []
        for seed in seeds:
            generator = torch.Generator("cpu").manual_seed(seed)
            out = pipe(PROMPTS[task], num_inference_steps=24, guidance_scale=guidance, generator=generator,
                       height=size, width=size, **extra)
            images.append(gray(out.images))
        return images, None

    name = "diffusers PNDM defaults" if defaults else "diffusers DPM++ (same settings)"
    return Contender(name, "baseline", draw, time.perf_counter() - began)


def contenders(folder: Path, task: str, device: torch.device, size: int, tweaks: list[str], batches: list[int],
               intervals: list[int]) -> list[Contender]:
    out = [baseline(folder, task, device, size, defaults=False), baseline(folder, task, device, size, defaults=True),
           ours(folder, task, device, size)]
    out += [ours(folder, task, device, size, batch=b) for b in batches]
    out += [ours(folder, task, device, size, prompt_cache=False)] if tweaks else []
    out += [ours(folder, task, device, size, tweak) for tweak in tweaks]
    top = max(batches, default=1)
    out += [ours(folder, task, device, size, batch=top, accelerate="deepcache", interval=n) for n in intervals]
    return out


def timed(entry: Contender, seeds: list[int], device: torch.device) -> tuple[float, float, list[np.ndarray], float]:
    """(seconds for the call, seconds until its first image, images, process CPU seconds for the call).

    CPU seconds (all threads) barely move when other jobs share the cores; wall seconds do."""
    synchronize(device)
    began, cpu = time.perf_counter(), time.process_time()
    images, first = entry.draw(seeds)
    synchronize(device)
    seconds = time.perf_counter() - began
    return seconds, seconds if first is None else first, images, time.process_time() - cpu


def region_of(task: str, size: int):
    """Where images are compared: the mask's box for inpainting (ours keeps the input outside it)."""
    if task != "inpaint":
        return slice(None), slice(None)
    rows, cols = np.nonzero(inpaint_inputs(size)[1])
    return slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1)


def measure(task: str, entries: list[Contender], device: torch.device, images: int, warmup: int,
            process_warmup: Contender | None = None) -> list[dict]:
    """Round r: every contender draws its next call (seeds r*batch ..), one after the other.

    `process_warmup` draws one untimed image first, so no contender's first image pays the
    process's one-off start-up (thread pools, kernel caches) for the others."""
    if process_warmup is not None:
        process_warmup.draw([0])
    times: dict[str, list[float]] = {c.name: [] for c in entries}
    cpu_times: dict[str, list[float]] = {c.name: [] for c in entries}
    drawn: dict[str, dict[int, np.ndarray]] = {c.name: {} for c in entries}
    first_call: dict[str, float] = {}
    for index in range(warmup + images):
        for entry in entries:
            seeds = list(range(index * entry.batch, (index + 1) * entry.batch))
            seconds, first, out, cpu = timed(entry, seeds, device)
            if index == 0:
                first_call[entry.name] = first
            if index >= warmup:
                times[entry.name].append(seconds / len(seeds))
                cpu_times[entry.name].append(cpu / len(seeds))
            drawn[entry.name].update(zip(seeds, out))
    reference = next(c for c in entries if c.kind == "baseline")
    exact_ours = next(c for c in entries if c.kind == "ours")
    window = region_of(task, size=next(iter(drawn[reference.name].values())).shape[0])
    seeds = sorted(drawn[reference.name])  # every contender drew at least these

    def crops(name):
        return [drawn[name][s][window].astype(int) for s in seeds]

    rows = []
    for entry in entries:
        stats = step_stats(times[entry.name])
        diff = max(int(np.abs(a - b).max()) for a, b in zip(crops(entry.name), crops(reference.name)))
        row = {"task": task, "variant": entry.name, "kind": entry.kind, "batch": entry.batch,
               "s_per_image": stats["median_s"], "mean_s": stats["mean_s"],
               "cpu_s_per_image": float(np.median(cpu_times[entry.name])), "images": stats["n"] * entry.batch,
               "load_s": entry.setup_s, "first_image_s": first_call[entry.name], "max_diff_vs_same_settings": diff,
               "compared_seeds": len(seeds), "ssim": None, "fidelity_delta": None}
        if entry.kind == "approx":
            row["ssim"] = mean_ssim([c.astype(np.uint8) for c in crops(entry.name)],
                                    [c.astype(np.uint8) for c in crops(exact_ours.name)])
        rows.append(row)
    same = rows[0]["s_per_image"]
    for row in rows:
        row["speedup_vs_same_settings"] = ratio(same, row["s_per_image"])
    return rows


def first_image_latency(makers: dict[str, Callable[[], Contender]], repeats: int, device: torch.device) -> dict:
    """Median seconds to the first image of freshly loaded contenders, loads taking turns
    (one first image is one sample: on a shared machine a single one is mostly noise)."""
    samples: dict[str, list[float]] = {name: [] for name in makers}
    for _ in range(repeats):
        for name, make in makers.items():
            samples[name].append(timed(make(), [0], device)[1])
    return {name: (float(np.median(values)), values) for name, values in samples.items()}


def summary_ratios(rows: list[dict], default_name: str = "ours") -> dict:
    ratios = {}
    for task in PROMPTS:
        mine = [r for r in rows if r["task"] == task]
        if not mine:
            continue
        by_name = {r["variant"]: r for r in mine}
        exact = [r for r in mine if r["kind"] == "ours" and r["equal_output"] == "exact"]
        best = min((r for r in mine if r["kind"] == "ours"), key=lambda r: r["s_per_image"])
        for r in mine:
            r["best_ours"] = r is best
        same, defaults = by_name["diffusers DPM++ (same settings)"], by_name["diffusers PNDM defaults"]
        ratios[f"{task}.ours_vs_same"] = ratio(same["s_per_image"], by_name["ours"]["s_per_image"])
        ratios[f"{task}.best_vs_same"] = ratio(same["s_per_image"], best["s_per_image"])
        ratios[f"{task}.ours_vs_defaults"] = ratio(defaults["s_per_image"], by_name["ours"]["s_per_image"])
        if exact:
            ratios[f"{task}.exact_vs_stock"] = ratio(same["s_per_image"], min(r["s_per_image"] for r in exact))
        approx = [r for r in mine if r["kind"] == "approx"]
        met = [r for r in approx if "not met" not in r["equal_output"]]
        if met or approx:  # the fastest that met the bars, else the fastest tried (its row says "not met")
            ratios[f"{task}.approx_vs_stock"] = ratio(same["s_per_image"], min(r["s_per_image"] for r in met or approx))
        if default_name in by_name:
            ratios[f"{task}.first_image_vs_stock"] = ratio(same["first_image_s"], by_name[default_name]["first_image_s"])
    return ratios


COLUMNS = [("task", "task"), ("variant", "variant"), ("s_per_image", "s/image"), ("speedup_vs_same_settings", "speed-up"),
           ("cpu_s_per_image", "cpu s/image"),
           ("first_image_s", "first image s"), ("load_s", "load s"), ("max_diff_vs_same_settings", "max |diff| vs stock"),
           ("equal_output", "equal output"), ("fidelity_delta", "fidelity delta"), ("best_ours", "fastest ours")]


def run(args) -> dict:
    device = resolve_device(args.device)
    facts = device_info(device)
    size = 32 if args.quick else args.size
    images, warmup = (1, 1) if args.quick else (args.images, args.warmup)
    tweaks = [] if args.quick else ["channels_last", "plain_attention"] + (["compile"] if args.compile else [])
    batches = [4] if args.quick else list(args.batches)
    intervals = [3] if args.quick else list(args.intervals)
    default = ours_name(default_batch())
    if default_batch() > 1 and default_batch() not in batches:
        batches.append(default_batch())
    fidelity_model = args.fidelity_model or (DEFAULT_FIDELITY_MODEL if DEFAULT_FIDELITY_MODEL.is_dir() else None)
    rows = []
    with quiet_warnings():
        for task in args.tasks:
            print(f"[infer] {task} ...", flush=True)
            folder = export_folder(args.work_dir, args.cache_dir, task, size)
            with torch.inference_mode():
                warm = baseline(folder, task, device, size, defaults=False)
                task_rows = measure(task, contenders(folder, task, device, size, tweaks, batches, intervals), device,
                                    images, warmup, process_warmup=warm)
                makers = {task_rows[0]["variant"]: lambda: baseline(folder, task, device, size, defaults=False),
                          default: lambda: ours(folder, task, device, size, batch=default_batch())}
                for name, (median, values) in first_image_latency(makers, args.first_repeats, device).items():
                    row = next(r for r in task_rows if r["variant"] == name)
                    row["first_image_s"], row["first_image_samples"] = median, [round(v, 4) for v in values]
                rows += task_rows
        if fidelity_model is not None and "text2image" in args.tasks:
            print(f"[infer] prompt fidelity with {fidelity_model} ...", flush=True)
            add_fidelity(rows, Path(fidelity_model), device, GUIDANCE)
    for row in rows:
        row["equal_output"] = equal_output(row)
    ratios = summary_ratios(rows, default)
    facts["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    table = format_table(rows, COLUMNS, title=f"Inference, 24 steps, tiny model at {size} px, on {device_label(facts)}")
    config = {"model": "tiny", "size": size, "steps": 24, "guidance": GUIDANCE, "images": images, "warmup": warmup,
              "tweaks": tweaks, "tasks": args.tasks, "quick": args.quick, "batches": batches,
              "deepcache_intervals": intervals, "default_variant": default, "ssim_bar": SSIM_BAR,
              "fidelity_model": str(fidelity_model) if fidelity_model else None}
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
    p.add_argument("--first-repeats", type=int, default=3,
                   help="fresh loads whose first image is timed (median) for stock and our default")
    p.add_argument("--batches", type=int, nargs="*", default=[4, 8], help="batch sizes of our path to try")
    p.add_argument("--intervals", type=int, nargs="*", default=[2, 3], help="deepcache intervals (at the largest batch)")
    p.add_argument("--fidelity-model", type=Path, default=None,
                   help=f"trained text2image export for the fidelity check (default: {DEFAULT_FIDELITY_MODEL} if present)")
    return p


def main(argv: list[str] | None = None) -> dict:
    return run(finish_args(parser().parse_args(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
