"""`mode=sweep`: pairwise MS-SSIM of the images of one prompt at each guidance scale (MAM-E Table 3).

Every (prompt, scale) cell draws `guidance.images_per_prompt` images with the same seeds at every
scale, so a row of the table shows what guidance alone does to diversity. Writes sweep.csv,
sweep.md, msssim_vs_guidance.png, samples/<model>/w<scale>.png and TensorBoard scalars.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from omegaconf import DictConfig
from tqdm.auto import tqdm

from mame_lightning.eval.report import format_number
from mame_lightning.io import write_text
from mame_lightning.pipelines.generation import text2image
from mame_lightning.pipelines.loading import LoadedModel
from mame_lightning.runs.evaluation.grids import sample_grid, save_sample_grid
from mame_lightning.runs.evaluation.inputs import generation_settings, sweep_prompts


def guidance_step_factor(scales: Sequence[float]) -> int:
    """TensorBoard steps are integers: guidance x this factor (1 for whole-number scales, 10 for 7.5, ...)."""
    for factor in (1, 10, 100, 1000):
        if all(abs(s * factor - round(s * factor)) < 1e-9 for s in scales):
            return factor
    return 1000


def sweep_cell(model: LoadedModel, label: str, prompt: str, scale: float, cfg: DictConfig) -> tuple[dict, list]:
    """Generate images_per_prompt images of one prompt at one scale; their MS-SSIM row and the images."""
    from mame_lightning.eval.msssim import pairwise_ms_ssim

    count = int(cfg.guidance.images_per_prompt)
    results = text2image(model, prompt, count, generation_settings(cfg, scale))
    images = [r.image for r in results]
    mean, std, values = result = pairwise_ms_ssim(images, progress=False)
    row = {"model": label, "prompt": prompt, "guidance": float(scale), "ms_ssim_mean": mean, "ms_ssim_std": std,
           "seconds_per_image": float(np.mean([r.seconds for r in results])), "n": len(images),
           "pairs": len(values), "steps": int(cfg.guidance.steps), "scheduler": model.scheduler,
           "seed": int(cfg.seed), "image_size": images[0].shape[0], "msssim_scales": result.settings["scales"],
           "msssim_kernel": result.settings["kernel_size"], "model_path": model.path}
    return row, images


def warm_up(model: LoadedModel, cfg: DictConfig, scale: float) -> None:
    """One untimed image: CUDA kernels and caches are set up before the first timed cell."""
    if cfg.get("warmup", True):
        text2image(model, "a mammogram", 1, generation_settings(cfg, scale))


def sweep_model(model: LoadedModel, label: str, cfg: DictConfig, scales: Sequence[float], out: Path) -> list[dict]:
    """Every (prompt, scale) cell of one model; sample grids per scale and TensorBoard scalars."""
    from torch.utils.tensorboard import SummaryWriter

    prompts = sweep_prompts(cfg, model.metadata)
    warm_up(model, cfg, scales[0])
    factor = guidance_step_factor(scales)
    writer = SummaryWriter(log_dir=str(out / "tensorboard" / label))
    writer.add_text("guidance_step", f"TensorBoard step = guidance scale x {factor}")
    rows = []
    bar = tqdm(total=len(prompts) * len(scales), desc=f"sweep {label}", unit="cell", disable=not cfg.progress)
    try:
        for scale in scales:
            step = int(round(scale * factor))
            grid_rows = []
            for prompt in prompts:
                row, images = sweep_cell(model, label, prompt, scale, cfg)
                rows.append(row)
                grid_rows.append(images[: int(cfg.grid_columns)])
                writer.add_scalar(f"msssim/{prompt}", row["ms_ssim_mean"], step)
                writer.add_scalar(f"msssim_std/{prompt}", row["ms_ssim_std"], step)
                writer.add_scalar(f"seconds_per_image/{prompt}", row["seconds_per_image"], step)
                bar.update(1)
                bar.set_postfix(w=format_number(scale), msssim=f"{row['ms_ssim_mean']:.3f}",
                                s_per_image=f"{row['seconds_per_image']:.2f}")
            mine = [r for r in rows if r["guidance"] == scale]
            writer.add_scalar("msssim/mean_over_prompts", float(np.mean([r["ms_ssim_mean"] for r in mine])), step)
            writer.add_scalar("seconds_per_image/mean", float(np.mean([r["seconds_per_image"] for r in mine])), step)
            grid = sample_grid(grid_rows)
            save_sample_grid(grid, out / "samples" / label / f"w{format_number(scale)}.png", model, scale, prompts)
            writer.add_image("samples", grid, step, dataformats="HW")
    finally:
        bar.close()
        writer.close()
    return rows


def write_sweep_outputs(rows: list[dict], out: Path) -> dict:
    """sweep.csv, sweep.md (Table 3 shape) and msssim_vs_guidance.png from the rows of every model."""
    from mame_lightning.eval.msssim import guidance_sweep_table, write_guidance_sweep_csv
    from mame_lightning.eval.plots import plot_guidance_sweep

    rows = sorted(rows, key=lambda r: (str(r["model"]), float(r["guidance"])))
    table = guidance_sweep_table(rows)
    first = rows[0]
    seed = int(first.get("seed") or 0)
    caption = (f"Pairwise MS-SSIM (mean ± std over all pairs; lower = more diverse) of {first['n']} images per "
               f"prompt (seeds {seed}..{seed + int(first['n']) - 1} at every scale), {first.get('steps', '?')} "
               f"{first.get('scheduler', '')} steps, {first.get('image_size', '?')} px; s/image averaged over the row."
               "\n\n")
    write_guidance_sweep_csv(out / "sweep.csv", rows)
    write_text(out / "sweep.md", caption + table)
    plot = plot_guidance_sweep(rows, out / "msssim_vs_guidance.png")
    return {"csv": str(out / "sweep.csv"), "table": str(out / "sweep.md"), "plot": str(plot),
            "markdown": table, "rows": rows}


__all__ = ["guidance_step_factor", "sweep_cell", "warm_up", "sweep_model", "write_sweep_outputs"]
