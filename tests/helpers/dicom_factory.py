"""Synthetic mammogram phantoms for tests: known tissue, lesion and background regions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mame_lightning.data.dicom_writer import make_mammogram_dataset, save_dataset

BACKGROUND = 1000
TISSUE = 40000
LESION = 50000


@dataclass
class Phantom:
    pixels: np.ndarray  # uint16, display sense
    tissue: np.ndarray  # bool, tissue without the lesion
    lesion: np.ndarray  # bool
    background: np.ndarray  # bool


def half_disc_phantom(height: int = 96, width: int = 80, side: str = "left") -> Phantom:
    """A bright half-disc of tissue against one vertical edge, a brighter lesion inside it."""
    yy, xx = np.mgrid[:height, :width]
    edge_x = 0 if side == "left" else width - 1
    radius = 0.45 * height
    breast = (xx - edge_x) ** 2 + (yy - height / 2) ** 2 < radius**2
    lesion_x = edge_x + (radius / 3 if side == "left" else -radius / 3)
    lesion = (xx - lesion_x) ** 2 + (yy - height / 2) ** 2 < (radius / 6) ** 2
    pixels = np.full((height, width), BACKGROUND, dtype=np.uint16)
    pixels[breast] = TISSUE
    pixels[lesion] = LESION
    return Phantom(pixels, breast & ~lesion, lesion, ~breast)


def write_phantom(path: Path, phantom: Phantom | None = None, transfer_syntax: str = "explicit", **kwargs) -> Path:
    """Write a phantom DICOM file with `make_mammogram_dataset(**kwargs)` and return its path."""
    phantom = phantom or half_disc_phantom()
    save_dataset(make_mammogram_dataset(phantom.pixels, **kwargs), path, transfer_syntax)
    return path
