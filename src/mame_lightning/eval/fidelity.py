"""Prompt fidelity: does a generated image show what its prompt asked for?

Each attribute is measured on the image with the same functions that described the training
images (so a mismatch is the generator's, not the ruler's), then compared with the prompt's value
in a confusion matrix per attribute.

- area: `data.tissue` mask -> area ratio -> area class, exactly as the preparation step does.
- view: MLO images show the pectoral muscle, a bright, homogeneous, roughly triangular region in
  the upper chest-wall corner (the chest wall is on the left in prepared images). `pectoral_score`
  searches corner triangles on a 64 px copy of the image and scores the best one by its contrast
  against the tissue just beyond its edge minus its inner roughness (dense glands in that corner
  are bright too, but textured), in units of the image's tissue contrast. Validated on the
  synthetic phantoms (CC vs MLO, all densities, areas, vendors, implants); real-image accuracy is
  unknown, so reports should say "measured by a pectoral heuristic".
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Sequence

import numpy as np
from PIL import Image
from skimage.filters import threshold_otsu

from mame_lightning.data.tissue import area_class, area_ratio, chest_wall_side, tissue_mask

AREA_THRESHOLDS = (0.4, 0.6)
AREA_LABELS = ("small", "medium", "big")
VIEW_LABELS = ("CC", "MLO")
VIEW_GRID = 64  # the view is judged on a 64 px copy: the pectoral is large, and the search stays cheap
PECTORAL_THRESHOLD = 0.12  # score above which the corner holds a pectoral muscle
ROUGHNESS_WEIGHT = 3.0  # how much inner texture counts against a candidate triangle
# Candidate triangles: legs along the top edge and the chest wall, as shares of the image side.
TOP_LEGS = tuple(np.round(np.arange(0.06, 0.75, 0.03), 3))
WALL_LEGS = tuple(np.round(np.arange(0.06, 0.9, 0.03), 3))
NOT_MEASURED = "not measured"


def to_grey_uint8(img: Any) -> np.ndarray:
    """HxW uint8 from an HxW or HxWx{1,3,4} uint8 image (colour channels averaged)."""
    img = np.asarray(img)
    if img.ndim == 3:
        img = img[..., :3].mean(axis=2).round().astype(np.uint8) if img.shape[2] > 1 else img[..., 0]
    if img.ndim != 2 or img.dtype != np.uint8:
        raise ValueError(f"expected an 8-bit HxW or HxWxC image, got {img.dtype} {img.shape}")
    return img


def measure_area_class(img_uint8: Any, thresholds: Sequence[float] = AREA_THRESHOLDS,
                       labels: Sequence[str] = AREA_LABELS) -> tuple[str, float]:
    """(area class, tissue area ratio) of an image, as the preparation step writes them."""
    ratio = area_ratio(tissue_mask(to_grey_uint8(img_uint8)))
    return area_class(ratio, thresholds, labels), ratio


@lru_cache(maxsize=4)
def _triangles(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flattened (candidates x pixels) masks: inside each triangle, its inner part away from the
    corner, and a band just beyond its hypotenuse."""
    centres = (np.arange(size) + 0.5) / size
    ys, xs = centres[:, None], centres[None, :]
    inside, inner, outer = [], [], []
    for top in TOP_LEGS:
        for wall in WALL_LEGS:
            r = (xs / top + ys / wall).ravel()
            inside.append(r < 1.0)
            inner.append((r > 0.4) & (r < 0.95))
            outer.append((r > 1.1) & (r < 1.6))
    return (np.array(inside, np.float64), np.array(inner, np.float64), np.array(outer, np.float64))


def pectoral_score(img_uint8: Any) -> float | None:
    """Best corner-triangle score (higher = more pectoral-like); None for an image with no tissue.

    Expects the chest wall on the left. Score = (mean just inside the hypotenuse - mean just beyond
    it - ROUGHNESS_WEIGHT * std inside) / (tissue 95th - 5th percentile), over triangles that are
    at least 90 % foreground. The foreground is the Otsu mask without keeping one component, so a
    pectoral cut off from the breast silhouette still counts.
    """
    grey = to_grey_uint8(img_uint8)
    if grey.min() == grey.max():
        return None
    small = np.asarray(Image.fromarray(grey).resize((VIEW_GRID, VIEW_GRID), Image.Resampling.BILINEAR))
    values = small.astype(np.float64).ravel() / 255.0
    foreground = values > threshold_otsu(small) / 255.0
    if foreground.sum() < 16:
        return None
    tissue = values[foreground]
    spread = float(np.quantile(tissue, 0.95) - np.quantile(tissue, 0.05)) + 1e-3
    inside, inner, outer = _triangles(VIEW_GRID)
    fg = foreground.astype(np.float64)
    n_inside, n_in_fg = inside.sum(1), inside @ fg
    n_inner, n_outer = inner @ fg, outer @ fg
    valid = (n_inside >= 6) & (n_in_fg >= 0.9 * n_inside) & (n_inner >= 3) & (n_outer >= 6)
    if not valid.any():
        return float("-inf")
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_inner = (inner @ (values * fg)) / n_inner
        mean_outer = (outer @ (values * fg)) / n_outer
        mean_in = (inside @ (values * fg)) / n_in_fg
        var_in = (inside @ (values**2 * fg)) / n_in_fg - mean_in**2
    scores = (mean_inner - mean_outer - ROUGHNESS_WEIGHT * np.sqrt(np.clip(var_in, 0, None))) / spread
    return float(np.max(scores[valid]))


def measure_view(img_uint8: Any, threshold: float = PECTORAL_THRESHOLD) -> str | None:
    """'MLO' when the upper chest-wall corner holds a pectoral muscle, else 'CC'; None when the
    image has no tissue to judge. An image whose tissue leans right is mirrored first."""
    grey = to_grey_uint8(img_uint8)
    mask = tissue_mask(grey)
    if not mask.any():
        return None
    if chest_wall_side(mask) == "right":
        grey = grey[:, ::-1]
    score = pectoral_score(grey)
    if score is None:
        return None
    return "MLO" if score >= threshold else "CC"


def measure_image(img_uint8: Any, thresholds: Sequence[float] = AREA_THRESHOLDS,
                  labels: Sequence[str] = AREA_LABELS, view: bool = True) -> dict:
    """The measurable prompt attributes of one image: {"area", "area_ratio", "view"}."""
    area, ratio = measure_area_class(img_uint8, thresholds, labels)
    return {"area": area, "area_ratio": ratio, "view": measure_view(img_uint8) if view else None}


def confusion_matrix(expected: Sequence[str], measured: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Counts with rows = expected (prompt) label and columns = measured label, in `labels` order."""
    if len(expected) != len(measured):
        raise ValueError(f"{len(expected)} expected values but {len(measured)} measured ones")
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for position, (want, got) in enumerate(zip(expected, measured)):
        for name, value in (("expected", want), ("measured", got)):
            if value not in index:
                raise ValueError(f"{name} value {value!r} at position {position} is not one of {list(labels)}")
        matrix[index[want], index[got]] += 1
    return matrix


def agreement(expected: Sequence[str], measured: Sequence[str]) -> float:
    """Share of positions where the measured value equals the expected one (nan when empty)."""
    if len(expected) != len(measured):
        raise ValueError(f"{len(expected)} expected values but {len(measured)} measured ones")
    if not expected:
        return float("nan")
    return float(np.mean([want == got for want, got in zip(expected, measured)]))


def fidelity_report(records: Sequence[dict], labels: dict[str, Sequence[str]] | None = None) -> dict:
    """Per attribute: {agreement, labels, matrix (list of rows), n, not_measured}.

    Each record is {"expected": {attr: value}, "measured": {attr: value}}. Pairs where either value
    is None are left out and counted in `not_measured`; an attribute never measured reports
    agreement None and note "not measured". Labels default to the sorted values seen.
    """
    labels = dict(labels or {})
    attributes = list(dict.fromkeys(a for r in records for a in r.get("expected", {})))
    report = {}
    for attribute in attributes:
        pairs = [(r["expected"].get(attribute), r.get("measured", {}).get(attribute)) for r in records]
        pairs = [(str(e), None if m is None else str(m)) for e, m in pairs if e is not None]
        kept = [(e, m) for e, m in pairs if m is not None]
        names = list(labels.get(attribute) or sorted({v for pair in kept for v in pair}))
        entry = {"labels": names, "n": len(kept), "not_measured": len(pairs) - len(kept)}
        if kept:
            expected, measured = [e for e, _ in kept], [m for _, m in kept]
            entry.update(agreement=agreement(expected, measured),
                         matrix=confusion_matrix(expected, measured, names).tolist())
        else:
            entry.update(agreement=None, matrix=None, note=NOT_MEASURED)
        report[attribute] = entry
    return report
