"""Small prepared sets, a tiny CLIP tokenizer and a tiny VAE for the data-module and cache tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

VIEWS = ("CC", "MLO")
AREAS = ("small", "medium", "big")
DENSITIES = ("very low", "low", "high", None)
VENDORS = ("hologic", "siemens")


def tiny_tokenizer():
    """A real CLIPTokenizer over the words of the test prompts (no downloaded files)."""
    from mame_lightning.models.tokenizer import build_tokenizer

    words = ["a", "mammogram", "in", "view", "with", "density", "area", *VIEWS, *AREAS, *VENDORS]
    words += [word for density in DENSITIES if density for word in density.split()]
    return build_tokenizer(words)


class CountingTokenizer:
    """Wraps a tokenizer and counts its calls (prompts must be tokenised once, not per item)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.model_max_length = tokenizer.model_max_length
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tokenizer(*args, **kwargs)


def half_ellipse(size: int, rng: np.random.Generator) -> np.ndarray:
    """A breast-like bright half-ellipse against the left edge, with texture noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    radius_x = rng.uniform(0.4, 0.9) * size
    radius_y = rng.uniform(0.35, 0.5) * size
    inside = (x / radius_x) ** 2 + ((y - size / 2) / radius_y) ** 2 <= 1.0
    tissue = rng.uniform(80, 230) + rng.normal(0, 20, (size, size))
    return np.clip(np.where(inside, tissue, rng.uniform(0, 10)), 0, 255).astype(np.uint8)


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode="L").save(path)


def write_prepared(root: Path, n: int = 24, size: int = 32, seed: int = 0) -> Path:
    """A prepared set with both task folders (layout of docs/architecture.md) -> root."""
    rng = np.random.default_rng(seed)
    rows = {"text2image": [], "inpaint": []}
    for number in range(n):
        image_id = f"img{number:04d}"
        image = half_ellipse(size, rng)
        x0, y0 = (int(v) for v in rng.integers(0, size // 2, 2))
        x1, y1 = x0 + int(rng.integers(4, size // 2)), y0 + int(rng.integers(4, size // 2))
        mask = np.zeros((size, size), np.uint8)
        mask[y0:y1, x0:x1] = 255
        view, area = VIEWS[number % 2], AREAS[number % 3]
        density, vendor = DENSITIES[number % 4], VENDORS[number % 2]
        density_text = f"{density} density " if density else ""
        row = {
            "id": image_id,
            "file_name": f"images/{image_id}.png",
            "source": f"raw/{image_id}.dcm",
            "prompt": f"a mammogram in {view} view with {density_text}{area} area",
            "view": view,
            "laterality": "L" if number % 2 else "R",
            "vendor": vendor,
            "density": density,
            "area_ratio": float(rng.uniform(0.2, 0.8)),
            "area": area,
            "split": "training",
            "flipped": bool(number % 2),
        }
        for task in rows:
            write_png(root / task / row["file_name"], image)
        write_png(root / "inpaint" / "masks" / f"{image_id}.png", mask)
        rows["text2image"].append(row)
        rows["inpaint"].append(
            {**row, "mask": f"masks/{image_id}.png", "boxes": [[x0, y0, x1, y1, "mass"]]}
        )
    for task, task_rows in rows.items():
        lines = [json.dumps(r) for r in sorted(task_rows, key=lambda r: r["id"])]
        (root / task / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def tiny_vae(seed: int = 0):
    """A two-level AutoencoderKL (one 2× downsampling, 4 latent channels) with seeded weights."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    ).eval()
