"""The full synthetic flow: a healthy mammogram from text, then a lesion painted into it.

Each image gets a box (the user's, or one sampled fully inside the breast tissue of the generated
image), its mask, and one row in a VinDr-Mammo style `finding_annotations.csv`, so a detection
model can train on the folder directly. Box coordinates are prepared-image pixels, xmax/ymax
exclusive, and always whole pixels so the CSV box is exactly the mask's bounding box.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mame_lightning.data.records import Box
from mame_lightning.io import write_text
from mame_lightning.pipelines.generation import GenerationSettings, inpaint, text2image
from mame_lightning.pipelines.inputs import parse_box
from mame_lightning.pipelines.loading import LoadedModel
from mame_lightning.pipelines.marking import save_dicom, save_png
from mame_lightning.pipelines.outputs import csv_text, write_index, write_timings

FINDINGS_FILE = "finding_annotations.csv"
FINDING_COLUMNS = ["image_id", "study_id", "series_id", "laterality", "view_position", "height", "width",
                   "breast_birads", "breast_density", "finding_categories", "finding_birads", "xmin", "ymin", "xmax",
                   "ymax", "split"]
DEFAULT_LESION_PROMPT = "a mammogram with a lesion"


def box_side(lesion_box_size: float, image_size: int) -> int:
    """Box side in pixels: values below 1 are a fraction of the image side, others are pixels."""
    value = float(lesion_box_size)
    if value <= 0:
        raise ValueError(f"lesion_box_size must be positive, got {lesion_box_size}")
    side = round(value * image_size) if value < 1 else round(value)
    if not 1 <= side <= image_size:
        raise ValueError(f"lesion_box_size={lesion_box_size} gives a {side}-pixel box for a {image_size}-pixel image")
    return side


def fitting_corners(tissue: np.ndarray, side: int) -> np.ndarray:
    """(row, col) of every top-left corner whose side×side box holds tissue only (summed-area table)."""
    outside = np.pad((~np.asarray(tissue, dtype=bool)).astype(np.int64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    counts = outside[side:, side:] - outside[:-side, side:] - outside[side:, :-side] + outside[:-side, :-side]
    return np.argwhere(counts == 0)


def sample_lesion_box(image: np.ndarray, side: int, seed: int, category: str = "Mass") -> Box:
    """A side×side box fully inside the breast tissue of `image`, drawn uniformly with `seed`."""
    from mame_lightning.data.tissue import tissue_mask

    corners = fitting_corners(tissue_mask(np.asarray(image, dtype=np.uint8)), side)
    if len(corners) == 0:
        raise ValueError(f"no {side}x{side} box fits inside the breast tissue of the generated image; "
                         "lower lesion_box_size or give box=x0,y0,x1,y1")
    row, col = corners[np.random.default_rng(seed).integers(len(corners))]
    return Box(float(col), float(row), float(col + side), float(row + side), category)


def snap_box(box: Box, size: int, category: str) -> Box:
    """Whole-pixel box covering `box`, clipped to the image (what the mask will cover)."""
    x0, y0 = max(0, math.floor(box.x0)), max(0, math.floor(box.y0))
    x1, y1 = min(size, math.ceil(box.x1)), min(size, math.ceil(box.y1))
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {box.x0:g},{box.y0:g},{box.x1:g},{box.y1:g} lies outside the {size}x{size} image")
    return Box(float(x0), float(y0), float(x1), float(y1), category)


def vindr_density(density: str | None) -> str:
    """A density word back in VinDr's spelling ("high" -> "DENSITY C"); other text as it is."""
    from mame_lightning.data.prompts import DENSITY_WORDS

    letters = {word.lower(): letter for letter, word in DENSITY_WORDS.items()}
    if not density:
        return ""
    letter = letters.get(str(density).lower())
    return f"DENSITY {letter}" if letter else str(density)


def finding_row(image_id: str, box: Box, size: int, *, view: str | None, density: str | None,
                birads: str) -> dict:
    """One VinDr-Mammo finding line (categories as a Python-list string, as VinDr writes them)."""
    return {
        "image_id": image_id, "study_id": image_id, "series_id": image_id, "laterality": "L",
        "view_position": view or "", "height": size, "width": size, "breast_birads": birads or "",
        "breast_density": vindr_density(density),
        "finding_categories": repr([box.category]), "finding_birads": birads or "",
        "xmin": int(box.x0), "ymin": int(box.y0), "xmax": int(box.x1), "ymax": int(box.y1), "split": "training",
    }


def run_full(t2i: LoadedModel, inpainter: LoadedModel, prompt: str, out: str | os.PathLike, *, n: int = 1,
             settings: GenerationSettings | None = None, lesion_prompt: str = DEFAULT_LESION_PROMPT,
             box=None, lesion_box_size: float = 0.125, category: str = "Mass", birads: str = "",
             view: str | None = None, density: str | None = None, dicom: bool = False) -> list[dict]:
    """Generate `n` healthy images, paint one lesion into each, write images, masks and the CSVs.

    Layout: images/<id>.png (with lesion), healthy/<id>.png, masks/<id>.png, finding_annotations.csv,
    images.csv and timings.json. Image i uses seed+i for generation, box sampling and inpainting.
    """
    from mame_lightning.data.geometry import box_mask

    settings = settings or GenerationSettings()
    out = Path(out)
    given_box = parse_box(box) if box is not None else None
    rows, findings = [], []
    for i in tqdm(range(int(n)), desc="full", unit="image", disable=not settings.progress):
        seed = int(settings.seed) + i
        one = dataclasses.replace(settings, seed=seed, progress=False)
        healthy = text2image(t2i, prompt, 1, one)[0]
        size = healthy.image.shape[0]
        lesion_box = snap_box(given_box, size, category) if given_box else sample_lesion_box(
            healthy.image, box_side(lesion_box_size, size), seed, category)
        mask = box_mask([lesion_box], size)
        painted = inpaint(inpainter, healthy.image, mask, lesion_prompt, 1, one)[0]
        image_id = f"{i:04d}_seed{seed}"
        params = _full_params(healthy.params, painted.params, lesion_box, seed)
        save_png(healthy.image, out / "healthy" / f"{image_id}.png", healthy.params)
        save_png(mask, out / "masks" / f"{image_id}.png", {**params, "task": "mask"})
        save_png(painted.image, out / "images" / f"{image_id}.png", params)
        row = {**params, "file": f"images/{image_id}.png", "seconds": round(healthy.seconds + painted.seconds, 4)}
        if dicom:
            save_dicom(painted.image, out / "images" / f"{image_id}.dcm", params, view=view)
            row["dicom_file"] = f"images/{image_id}.dcm"
        rows.append(row)
        findings.append(finding_row(image_id, lesion_box, size, view=view, density=density, birads=birads))
    write_text(out / FINDINGS_FILE, csv_text(findings, FINDING_COLUMNS))
    write_index(out, rows)
    write_timings(out, rows, str(t2i.device))
    return findings


def _full_params(healthy: Mapping, painted: Mapping, box: Box, seed: int) -> dict:
    return {
        **healthy,
        "task": "full",
        "seed": seed,
        "lesion_prompt": painted.get("prompt", ""),
        "inpaint_model": painted.get("model", ""),
        "lesion_box": f"{int(box.x0)},{int(box.y0)},{int(box.x1)},{int(box.y1)}",
        "lesion_category": box.category,
    }


__all__ = ["FINDINGS_FILE", "FINDING_COLUMNS", "DEFAULT_LESION_PROMPT", "box_side", "fitting_corners",
           "sample_lesion_box", "snap_box", "finding_row", "run_full"]
