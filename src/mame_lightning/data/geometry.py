"""The one geometric transform from a source image to a square training image, and its boxes.

Resize (bilinear) so the shorter side equals `size`, centre-crop to size×size, then optionally
flip horizontally. Images and boxes go through the same `Geometry`, so lesion masks stay on
their lesions; `unmap_box` takes a box drawn on a prepared image back to the original pixels.
Box coordinates are continuous: pixel i covers [i, i+1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
from PIL import Image

from mame_lightning.data.records import Box


@dataclass(frozen=True)
class Geometry:
    """Everything needed to replay (or invert) the resize-crop-flip of one image."""

    height: int  # input size
    width: int
    size: int  # output side
    scale: float  # nominal resize factor (size / shorter input side)
    resized_height: int
    resized_width: int
    crop_y: int  # offset of the crop inside the resized image
    crop_x: int
    flip: bool = False

    @property
    def scale_y(self) -> float:
        """Exact vertical factor after rounding the resized size to whole pixels."""
        return self.resized_height / self.height

    @property
    def scale_x(self) -> float:
        return self.resized_width / self.width


def plan(height: int, width: int, size: int, flip: bool = False) -> Geometry:
    """Geometry for an input of height×width becoming size×size (see module docstring)."""
    if min(height, width, size) <= 0:
        raise ValueError(f"height, width and size must be positive, got {height}, {width}, {size}")
    scale = size / min(height, width)
    resized_height = size if height <= width else max(size, round(height * scale))
    resized_width = size if width < height else max(size, round(width * scale))
    return Geometry(
        height=int(height),
        width=int(width),
        size=int(size),
        scale=scale,
        resized_height=resized_height,
        resized_width=resized_width,
        crop_y=(resized_height - size) // 2,
        crop_x=(resized_width - size) // 2,
        flip=bool(flip),
    )


def apply_image(img: np.ndarray, geom: Geometry) -> np.ndarray:
    """Resize, crop and flip an HxW or HxWxC image; the dtype is kept (uint8 stays uint8)."""
    img = np.asarray(img)
    if img.shape[:2] != (geom.height, geom.width):
        raise ValueError(f"image is {img.shape[:2]}, the geometry expects {(geom.height, geom.width)}")
    if img.ndim == 3:
        out = np.stack([_apply_plane(img[..., c], geom) for c in range(img.shape[2])], axis=-1)
    elif img.ndim == 2:
        out = _apply_plane(img, geom)
    else:
        raise ValueError(f"expected an HxW or HxWxC image, got shape {img.shape}")
    return np.ascontiguousarray(out)


def _apply_plane(plane: np.ndarray, geom: Geometry) -> np.ndarray:
    resized = _resize(plane, geom.resized_height, geom.resized_width)
    crop = resized[geom.crop_y : geom.crop_y + geom.size, geom.crop_x : geom.crop_x + geom.size]
    return crop[:, ::-1] if geom.flip else crop


def _resize(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of one plane with PIL (8-bit directly, everything else as float32)."""
    if plane.shape == (height, width):
        return plane
    if plane.dtype == np.uint8:
        return np.asarray(Image.fromarray(plane).resize((width, height), Image.Resampling.BILINEAR))
    resized = np.asarray(
        Image.fromarray(plane.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR)
    )
    if plane.dtype == np.bool_:
        return resized >= 0.5
    if np.issubdtype(plane.dtype, np.integer):
        info = np.iinfo(plane.dtype)
        return np.clip(np.rint(resized), info.min, info.max).astype(plane.dtype)
    return resized.astype(plane.dtype)


def map_box(box: Box, geom: Geometry) -> Box | None:
    """Original-pixel box -> prepared-pixel box, clipped to the crop; None if nothing is left."""
    x0 = min(max(box.x0 * geom.scale_x - geom.crop_x, 0.0), geom.size)
    x1 = min(max(box.x1 * geom.scale_x - geom.crop_x, 0.0), geom.size)
    y0 = min(max(box.y0 * geom.scale_y - geom.crop_y, 0.0), geom.size)
    y1 = min(max(box.y1 * geom.scale_y - geom.crop_y, 0.0), geom.size)
    if x1 <= x0 or y1 <= y0:
        return None
    if geom.flip:
        x0, x1 = geom.size - x1, geom.size - x0
    return Box(x0, y0, x1, y1, box.category)


def unmap_box(box: Box, geom: Geometry) -> Box:
    """Prepared-pixel box -> original-pixel box (clipped to the original image)."""
    x0, x1 = (geom.size - box.x1, geom.size - box.x0) if geom.flip else (box.x0, box.x1)
    x0 = min(max((x0 + geom.crop_x) / geom.scale_x, 0.0), geom.width)
    x1 = min(max((x1 + geom.crop_x) / geom.scale_x, 0.0), geom.width)
    y0 = min(max((box.y0 + geom.crop_y) / geom.scale_y, 0.0), geom.height)
    y1 = min(max((box.y1 + geom.crop_y) / geom.scale_y, 0.0), geom.height)
    return Box(x0, y0, x1, y1, box.category)


def box_mask(boxes: Iterable[Box], size: int | tuple[int, int]) -> np.ndarray:
    """uint8 mask, 255 on every pixel a box overlaps and 0 elsewhere (inpainting covers the whole lesion)."""
    height, width = (size, size) if isinstance(size, int) else size
    eps = 1e-6  # float noise from mapping must not add a whole row or column
    mask = np.zeros((height, width), dtype=np.uint8)
    for box in boxes:
        c0, c1 = max(math.floor(box.x0 + eps), 0), min(math.ceil(box.x1 - eps), width)
        r0, r1 = max(math.floor(box.y0 + eps), 0), min(math.ceil(box.y1 - eps), height)
        if c1 > c0 and r1 > r0:
            mask[r0:r1, c0:c1] = 255
    return mask


__all__ = ["Geometry", "plan", "apply_image", "map_box", "unmap_box", "box_mask"]
