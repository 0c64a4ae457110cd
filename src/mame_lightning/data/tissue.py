"""Breast tissue mask and what is derived from it: area ratio, area class, chest-wall side.

Otsu separates tissue from the dark background; keeping the largest connected component drops
burnt-in labels and markers, and filling holes keeps dark structures inside the breast.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.measure import label


def tissue_mask(img_uint8: np.ndarray) -> np.ndarray:
    """Boolean HxW mask of the breast; empty for a flat image (nothing to separate)."""
    img = np.asarray(img_uint8)
    if img.ndim != 2:
        raise ValueError(f"expected an HxW grayscale image, got shape {img.shape}")
    if img.size == 0 or img.min() == img.max():
        return np.zeros(img.shape, dtype=bool)
    foreground = img > threshold_otsu(img)
    components = label(foreground, connectivity=2)
    if components.max() == 0:
        return np.zeros(img.shape, dtype=bool)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0  # background label
    largest = components == int(np.argmax(sizes))
    return ndimage.binary_fill_holes(largest)


def area_ratio(mask: np.ndarray) -> float:
    """Fraction of the image covered by tissue."""
    mask = np.asarray(mask, dtype=bool)
    return float(mask.mean()) if mask.size else 0.0


def area_class(
    ratio: float,
    thresholds: Sequence[float] = (0.4, 0.6),
    labels: Sequence[str] = ("small", "medium", "big"),
) -> str:
    """Class of an area ratio; a value on a threshold goes to the middle class.

    With the defaults: small < 0.4 <= medium <= 0.6 < big.
    """
    thresholds, labels = list(thresholds), list(labels)
    if len(labels) != len(thresholds) + 1:
        raise ValueError(f"need one more label than thresholds, got {labels} for {thresholds}")
    if thresholds != sorted(thresholds):
        raise ValueError(f"thresholds must be increasing, got {thresholds}")
    index = 0
    for position, threshold in enumerate(thresholds):
        is_last = position == len(thresholds) - 1 and position > 0
        if ratio > threshold or (ratio == threshold and not is_last):
            index = position + 1
    return labels[index]


def chest_wall_side(mask: np.ndarray) -> str:
    """'left' or 'right': the half of the image holding more tissue (ties say 'left')."""
    mask = np.asarray(mask, dtype=bool)
    half = mask.shape[1] // 2
    left = int(mask[:, :half].sum())
    right = int(mask[:, mask.shape[1] - half :].sum())
    return "left" if left >= right else "right"


__all__ = ["tissue_mask", "area_ratio", "area_class", "chest_wall_side"]
