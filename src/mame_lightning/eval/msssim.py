"""Diversity of a set of images as the pairwise MS-SSIM over all unordered pairs (MAM-E Table 3).

A low mean pairwise MS-SSIM means the generator produces varied images; a mean close to 1 means
it repeats itself (mode collapse). The standard MS-SSIM uses 5 scales and an 11-px Gaussian window,
which needs images of at least 176 px as torchmetrics checks it; for smaller images (the 64 px
demo and test images) `msssim_settings` drops the coarsest scales first and only then shrinks the
window, and renormalises the remaining scale weights to sum to 1 so values stay on the same
0..1 footing. The settings used are returned with every result, so a table can say what it measured.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np
import torch
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure
from tqdm.auto import tqdm

from mame_lightning.eval.report import (format_mean_std, format_number, markdown_table, read_csv,
                                        write_csv)

# Scale weights of Wang, Simoncelli & Bovik (2003), finest scale first.
DEFAULT_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
DEFAULT_KERNEL = 11
SWEEP_FIELDS = ("model", "prompt", "guidance", "ms_ssim_mean", "ms_ssim_std", "seconds_per_image", "n")


class MsSsimResult(tuple):
    """(mean, std, values) that also carries `.settings` (kernel size, betas, scales used).

    Unpacks as the 3-tuple callers expect: ``mean, std, values = pairwise_ms_ssim(images)``.
    """

    def __new__(cls, mean: float, std: float, values: np.ndarray, settings: dict):
        result = super().__new__(cls, (mean, std, values))
        result.settings = settings
        return result

    mean = property(lambda self: self[0])
    std = property(lambda self: self[1])
    values = property(lambda self: self[2])


def _fits(size: int, scales: int, kernel: int) -> bool:
    """The size check torchmetrics applies before computing MS-SSIM."""
    return size >= 2**scales and size // max(1, scales - 1) ** 2 > kernel - 1


def msssim_settings(height: int, width: int, kernel_size: int = DEFAULT_KERNEL,
                    betas: Sequence[float] = DEFAULT_BETAS) -> dict[str, Any]:
    """The largest number of scales (then the largest odd window) that an image of this size allows.

    Returns {"kernel_size", "betas", "scales", "reduced"}; `reduced` is True when the standard
    settings did not fit and were cut down.
    """
    size = min(int(height), int(width))
    for kernel in range(int(kernel_size), 2, -2):
        for scales in range(len(betas), 0, -1):
            if _fits(size, scales, kernel):
                kept = [float(b) for b in betas[:scales]]
                total = sum(kept)
                weights = tuple(b / total for b in kept) if scales < len(betas) else tuple(kept)
                reduced = scales < len(betas) or kernel != kernel_size
                return {"kernel_size": kernel, "betas": weights, "scales": scales, "reduced": reduced}
    raise ValueError(f"images of {height}x{width} px are too small for MS-SSIM (need at least 3 px)")


def as_image_batch(images: Any) -> torch.Tensor:
    """Float NxCxHxW in [0, 1] from a tensor (float in [0, 1] or uint8), an array or a list of arrays.

    A list holds uint8 HxW or HxWxC images of one shape (an alpha channel is dropped).
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images given")
        arrays = [np.asarray(img) for img in images]
        first = arrays[0].shape
        for index, array in enumerate(arrays):
            if array.shape != first:
                raise ValueError(f"image {index} has shape {array.shape}, image 0 has {first}")
        images = np.stack(arrays)
        if images.ndim == 4:  # N x H x W x C -> N x C x H x W
            images = images.transpose(0, 3, 1, 2)
    tensor = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(1)
    if tensor.ndim != 4:
        raise ValueError(f"expected N x C x H x W images, got shape {tuple(tensor.shape)}")
    if tensor.shape[1] == 4:
        tensor = tensor[:, :3]
    if tensor.shape[1] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got {tensor.shape[1]}")
    if tensor.dtype == torch.uint8:
        return tensor.float() / 255.0
    tensor = tensor.float()
    low, high = float(tensor.min()), float(tensor.max())
    if low < -1e-6 or high > 1 + 1e-6:
        raise ValueError(f"float images must lie in [0, 1], got values in [{low:.3g}, {high:.3g}]")
    return tensor.clamp(0.0, 1.0)


def pairwise_ms_ssim(images: Any, batch_size: int = 32, kernel_size: int = DEFAULT_KERNEL,
                     betas: Sequence[float] = DEFAULT_BETAS, progress: bool = True) -> MsSsimResult:
    """Mean, population std and all N*(N-1)/2 values of MS-SSIM over unordered image pairs.

    Pairs go through torchmetrics in batches of `batch_size`; data range is fixed to [0, 1] so
    every pair is judged on the same intensity scale.
    """
    batch = as_image_batch(images)
    count = batch.shape[0]
    if count < 2:
        raise ValueError(f"pairwise MS-SSIM needs at least 2 images, got {count}")
    settings = msssim_settings(batch.shape[2], batch.shape[3], kernel_size, betas)
    settings.update(image_size=[int(batch.shape[2]), int(batch.shape[3])], data_range=1.0,
                    normalize="relu", pairs=count * (count - 1) // 2)
    first, second = torch.triu_indices(count, count, offset=1)
    values = []
    chunks = range(0, first.numel(), max(1, int(batch_size)))
    with torch.no_grad():
        for start in tqdm(chunks, desc="MS-SSIM pairs", unit="batch", disable=not progress or len(chunks) < 2):
            i, j = first[start:start + batch_size], second[start:start + batch_size]
            scores = multiscale_structural_similarity_index_measure(
                batch[i], batch[j], kernel_size=settings["kernel_size"], betas=settings["betas"],
                data_range=1.0, reduction="none", normalize="relu")
            values.append(scores.reshape(-1).double().cpu().numpy())
    values = np.concatenate(values)
    return MsSsimResult(float(values.mean()), float(values.std()), values, settings)


def guidance_sweep_table(rows: Sequence[dict], digits: int = 3) -> str:
    """Markdown table shaped like MAM-E Table 3: one row per (model, prompt), one column per
    guidance scale, cells 'mean ± std'; a last 's/image' column when timings are present."""
    scales = sorted({float(row["guidance"]) for row in rows})
    keys = list(dict.fromkeys((str(row["model"]), str(row.get("prompt", ""))) for row in rows))
    cells = {(str(r["model"]), str(r.get("prompt", "")), float(r["guidance"])): r for r in rows}
    timed = any(_number(row.get("seconds_per_image")) is not None for row in rows)
    header = ["model", "prompt"] + [f"w={format_number(s)}" for s in scales] + (["s/image"] if timed else [])
    body = []
    for model, prompt in keys:
        found = [cells.get((model, prompt, s)) for s in scales]
        line = [model, prompt] + [
            format_mean_std(_number(r["ms_ssim_mean"]), _number(r.get("ms_ssim_std")), digits) if r else "–"
            for r in found]
        if timed:
            seconds = [_number(r.get("seconds_per_image")) for r in found if r]
            seconds = [s for s in seconds if s is not None]
            line.append(f"{np.mean(seconds):.2f}" if seconds else "–")
        body.append(line)
    return markdown_table(header, body)


def _number(value: Any) -> float | None:
    """A float from a number or CSV text; None for blanks and non-finite values."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def write_guidance_sweep_csv(path: str | os.PathLike, rows: Sequence[dict]) -> os.PathLike:
    """Atomic CSV with the SWEEP_FIELDS columns (extra keys of the rows follow them)."""
    extra = [key for row in rows for key in row if key not in SWEEP_FIELDS]
    return write_csv(path, rows, list(SWEEP_FIELDS) + list(dict.fromkeys(extra)))


def read_guidance_sweep_csv(path: str | os.PathLike) -> list[dict]:
    """Rows written by `write_guidance_sweep_csv`, numbers parsed back (blanks become None)."""
    rows = []
    for line_no, row in enumerate(read_csv(path), start=2):
        try:
            parsed = dict(row)
            for key in ("guidance", "ms_ssim_mean", "ms_ssim_std", "seconds_per_image"):
                parsed[key] = _number(row.get(key))
            parsed["n"] = int(row["n"]) if row.get("n", "").strip() else None
        except ValueError as error:
            raise ValueError(f"{path}: line {line_no}: {error}") from error
        rows.append(parsed)
    return rows
