"""Shared pieces of the utility-study tests: the composed config, a crafted separable image set."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import mame_lightning
from mame_lightning.utility.images import ImageSet
from mame_lightning.utility.split import Sample

CONF_DIR = mame_lightning.CONF_DIR
# Few steps, no progress bars, a lesion box every tiny (untrained) model can paint into.
FAST = ["classifier.steps=3", "classifier.batch_size=8", "classifier.val_every=2", "synthesis.steps=2",
        "synthesis.box=[24,24,32,32]", "synthesis.device=cpu", "trainer.enable_progress_bar=false",
        "trainer.accelerator=cpu", "report.bootstrap=50", "report.overlays=2", "split.min_per_class=1"]


def utility_config(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("utility", overrides=list(overrides))


def crafted_set(n: int, size: int = 32, seed: int = 0, side: int = 8) -> ImageSet:
    """Dark noise; every second image carries a bright side×side square (its box): trivially separable."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, size, size, generator=generator) * 0.3
    labels = (torch.arange(n) % 2).float()
    boxes = []
    for i in range(n):
        if labels[i]:
            x, y = torch.randint(0, size - side, (2,), generator=generator).tolist()
            images[i, 0, y:y + side, x:x + side] = 1.0
            boxes.append(((float(x), float(y), float(x + side), float(y + side)),))
        else:
            boxes.append(())
    samples = [Sample(f"crafted/{i}.png", int(labels[i]), f"g{i}", "real", str(i), boxes[i]) for i in range(n)]
    return ImageSet(images, labels, samples, boxes)


