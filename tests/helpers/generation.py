"""Tiny exported model folders (text-to-image and inpainting) for the generation tests.

Built once per test session from conf/model/tiny.yaml under the session's base temp folder, with
the `mame_lightning.json` sidecar an export would write beside them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from helpers.modules import TINY_CONFIG
SIZE = 64
TEMPLATES = {
    "text2image": "a {vendor} mammogram in {view} view with {density} density and {area} area",
    "inpaint": "a mammogram with a lesion",
}
ATTRIBUTES = {
    "views": ["CC", "MLO"],
    "densities": ["very low", "low", "high", "very high"],
    "areas": ["small", "medium", "big"],
    "vendors": ["hologic", "siemens"],
}


def sidecar(task: str) -> dict:
    return {"task": task, "templates": TEMPLATES, "attributes": ATTRIBUTES, "train_config": {"model": "tiny"},
            "data_counts": {"kept": 0}, "prepare_size": SIZE}


def tiny_export(root: Path, task: str) -> Path:
    """An exported tiny pipeline folder for `task` ("text2image" or "inpaint"), built once under root."""
    from mame_lightning.models.components import tiny_components

    folder = Path(root) / f"export_{task}"
    if (folder / "mame_lightning.json").is_file():
        return folder
    cfg = OmegaConf.load(TINY_CONFIG)
    parts = tiny_components(
        Path(root) / "cache", words=list(cfg.words), unet=OmegaConf.to_container(cfg.unet),
        vae=OmegaConf.to_container(cfg.vae), text_encoder=OmegaConf.to_container(cfg.text_encoder),
        sample_size=SIZE, seed=1 if task == "inpaint" else 0, inpaint=task == "inpaint",
    )
    parts.save_pretrained(folder)
    (folder / "mame_lightning.json").write_text(json.dumps(sidecar(task)))
    return folder


def breast_image(size: int = SIZE, seed: int = 0) -> np.ndarray:
    """A bright half-ellipse of tissue against the left edge on a dark background (uint8)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    inside = (x / (0.7 * size)) ** 2 + ((y - size / 2) / (0.45 * size)) ** 2 <= 1.0
    img = np.where(inside, 170 + rng.normal(0, 12, (size, size)), 8 + rng.normal(0, 2, (size, size)))
    return np.clip(img, 0, 255).astype(np.uint8)


# Fixtures shared by the generation test files (import them by name into a test module).


