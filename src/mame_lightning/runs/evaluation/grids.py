"""Sample grids: the images of an evaluation laid out a row per prompt (or per case), as one picture."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from mame_lightning.pipelines.loading import LoadedModel
from mame_lightning.pipelines.marking import save_png


def sample_grid(rows: Sequence[Sequence[np.ndarray]], gap: int = 2) -> np.ndarray:
    """One uint8 picture: a row of images per prompt, separated by `gap` black pixels."""
    rows = [list(r) for r in rows if len(r)]
    if not rows:
        raise ValueError("no images for the sample grid")
    height, width = rows[0][0].shape[:2]
    columns = max(len(r) for r in rows)
    grid = np.zeros((len(rows) * (height + gap) - gap, columns * (width + gap) - gap), np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            y, x = i * (height + gap), j * (width + gap)
            grid[y:y + height, x:x + width] = np.asarray(image, dtype=np.uint8).reshape(height, width)
    return grid


def save_sample_grid(grid: np.ndarray, path: Path, model: LoadedModel, scale: float, prompts: list[str]) -> Path:
    """The grid as a PNG marked synthetic, naming the model, the guidance scale and each row's prompt."""
    return save_png(grid, path, {"model": model.path, "guidance": scale, "rows": " | ".join(prompts)})


__all__ = ["sample_grid", "save_sample_grid"]
