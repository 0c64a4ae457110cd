"""Tiny Stable Diffusion parts, toy batches and a quiet Trainer for the LightningModule tests.

Models come from conf/model/tiny.yaml through `tiny_components` (32-px images, 8x8 latents),
built once per session; every test loads its own copy because training changes the weights.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

TINY_CONFIG = Path(__file__).resolve().parents[2] / "src" / "mame_lightning" / "conf" / "model" / "tiny.yaml"
SIZE = 32
PROMPTS = [
    "a mammogram in cc view with small area",
    "a mammogram in mlo view with big area",
    "a mammogram in cc view with big area",
    "a mammogram in mlo view with small area",
]


def tiny(cache: Path, *, inpaint: bool = False, frozen_dtype: str | None = None, train_text_encoder: bool = True):
    from mame_lightning.models.components import tiny_components

    cfg = OmegaConf.load(TINY_CONFIG)
    words = sorted({word for prompt in PROMPTS for word in prompt.split()})
    return tiny_components(
        cache, words=words, unet=OmegaConf.to_container(cfg.unet), vae=OmegaConf.to_container(cfg.vae),
        text_encoder=OmegaConf.to_container(cfg.text_encoder), sample_size=SIZE, seed=0, inpaint=inpaint,
        frozen_dtype=frozen_dtype, train_text_encoder=train_text_encoder,
    )


def breast(size: int, seed: int) -> np.ndarray:
    """A bright half-ellipse against one edge on a dark background, float in [-1, 1]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    width = 0.5 + 0.3 * (seed % 2)
    inside = (x / (width * size)) ** 2 + ((y - size / 2) / (0.45 * size)) ** 2 <= 1.0
    image = np.where(inside, 0.5, -0.9) + rng.normal(0, 0.05, (size, size))
    return np.clip(image, -1, 1).astype(np.float32)


def toy_items(components, n: int = 4, inpaint: bool = False) -> list[dict]:
    """Dataset items shaped like the datamodule's (pixel form)."""
    tokenizer = components.tokenizer
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    items = []
    for i in range(n):
        pixels = torch.from_numpy(breast(SIZE, i)).unsqueeze(0).repeat(3, 1, 1)
        item = {"pixel_values": pixels, "input_ids": ids[i], "prompt": prompts[i], "id": f"img{i}", "index": i}
        if inpaint:
            mask = torch.zeros(1, SIZE, SIZE)
            mask[:, 8 + i : 20 + i, 10:22] = 1.0
            item["mask"] = mask
            item["masked_pixel_values"] = pixels * (mask < 0.5)
        items.append(item)
    return items


def collate(items: list[dict]) -> dict:
    return torch.utils.data.default_collate(items)


def loader(items: list[dict], batch_size: int = 2) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(items, batch_size=batch_size, shuffle=False)


def adamw(lr: float = 1e-3, **kwargs):
    return functools.partial(torch.optim.AdamW, lr=lr, **kwargs)


def trainer(**kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    options.update(kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return L.Trainer(**options)


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
