"""Inpainting inputs: a mammogram (PNG or DICOM) and the region to repaint (mask PNG or box).

A DICOM goes through exactly the preparation path training used (display chain, 8-bit, resize,
centre crop, right breasts flipped), so the model sees an image like the ones it learned from,
and a box drawn on the ORIGINAL image is carried through the same geometry. A PNG already at the
model's size is taken as is, with boxes in its own pixels.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mame_lightning.data.records import Box

DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}


class InputError(ValueError):
    """An input image, mask or box that cannot be used; the message names the file and the problem."""


@dataclass
class PreparedInput:
    """An image at the model's size plus the geometry that produced it (None when taken as is)."""

    image: np.ndarray  # uint8 size×size
    source: str
    geometry: object | None = None  # data.geometry.Geometry
    tags: dict = field(default_factory=dict)  # view / laterality read from DICOM tags

    @property
    def size(self) -> int:
        return int(self.image.shape[0])


LABEL_SUFFIXES = DICOM_SUFFIXES | {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def input_label(path: str | Path) -> str:
    """How outputs name an input file: a short hash of its bytes plus its image suffix.

    Not its path (folders carry patient names) and not even its base name, which clinical exports
    often build from the patient name, ID or the SOP Instance UID; the hash still matches the file.
    """
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    suffix = path.suffix.lower() if path.suffix.lower() in LABEL_SUFFIXES else ""
    return f"sha256-{digest.hexdigest()[:16]}{suffix}"


def is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with open(path, "rb") as handle:
        head = handle.read(132)
    return head[128:132] == b"DICM"


def _prepare(pixels: np.ndarray, size: int, flip: bool, source: str, tags: dict) -> PreparedInput:
    from mame_lightning.data.geometry import apply_image, plan

    height, width = pixels.shape
    geometry = plan(height, width, size=size, flip=flip)
    return PreparedInput(apply_image(pixels, geometry), source, geometry, tags)


def load_dicom_input(path: Path, size: int, max_pixels: int | None = None) -> PreparedInput:
    from mame_lightning.data.dicom import read_dicom, tag_metadata, to_float_image, to_uint8

    ds = read_dicom(path, max_pixels=max_pixels)
    tags = tag_metadata(ds)
    laterality = str(tags.get("laterality") or "").upper()
    return _prepare(to_uint8(to_float_image(ds)), size, laterality == "R", str(path), tags)


def too_large(path: Path, width: int, height: int, max_pixels: int) -> InputError:
    return InputError(f"{path}: {width}x{height} is {width * height / 1e6:.0f} megapixels, above the limit of "
                      f"{max_pixels / 1e6:g} megapixels (max_pixels); refused before decoding")


def header_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file from its header, nothing decoded."""
    try:
        with Image.open(path) as img:
            return img.size
    except Image.DecompressionBombError as exc:  # PIL's own ceiling, far above any mammogram
        raise InputError(f"{path}: image too large to open safely ({exc})") from exc
    except OSError as exc:
        raise InputError(f"{path}: cannot read image ({exc})") from exc


def read_gray(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """An ordinary image file as uint8 gray, its size checked from the header before decoding."""
    width, height = header_size(path)
    if max_pixels and width * height > max_pixels:
        raise too_large(path, width, height, max_pixels)
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("L"))
    except OSError as exc:
        raise InputError(f"{path}: cannot read image ({exc})") from exc


def load_png_input(path: Path, size: int, max_pixels: int | None = None) -> PreparedInput:
    pixels = read_gray(path, max_pixels)
    if pixels.shape == (size, size):
        return PreparedInput(pixels.copy(), str(path))
    return _prepare(pixels, size, False, str(path), {})


def load_input_image(path: str | Path, size: int, max_pixels: int | None = None) -> PreparedInput:
    """A DICOM or ordinary image file, prepared to size×size for the inpainting model.

    `max_pixels` refuses larger images from their header, before anything is decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: input image not found")
    if is_dicom(path):
        return load_dicom_input(path, size, max_pixels)
    return load_png_input(path, size, max_pixels)


def parse_box(value) -> Box:
    """`"x0,y0,x1,y1"` or a 4-item sequence -> Box (x1/y1 exclusive, x1 > x0, y1 > y0)."""
    parts = value.replace(" ", "").split(",") if isinstance(value, str) else list(value)
    try:
        x0, y0, x1, y1 = (float(v) for v in parts)
    except (TypeError, ValueError) as exc:
        raise InputError(f"box={value!r}: expected four numbers x0,y0,x1,y1") from exc
    if x1 <= x0 or y1 <= y0:
        raise InputError(f"box={value!r}: needs x1 > x0 and y1 > y0 (x right, y down)")
    return Box(x0, y0, x1, y1)


def mask_from_box(box: Box, prepared: PreparedInput) -> np.ndarray:
    """255 inside the box after mapping it from original to prepared pixels, 0 elsewhere."""
    from mame_lightning.data.geometry import box_mask, map_box

    mapped = map_box(box, prepared.geometry) if prepared.geometry is not None else _clip(box, prepared.size)
    if mapped is None:
        raise InputError(
            f"box {box.x0:g},{box.y0:g},{box.x1:g},{box.y1:g} lies outside the part of {prepared.source} "
            "the model sees (the centre crop)"
        )
    return box_mask([mapped], prepared.size)


def _clip(box: Box, size: int) -> Box | None:
    x0, x1 = min(max(box.x0, 0.0), size), min(max(box.x1, 0.0), size)
    y0, y1 = min(max(box.y0, 0.0), size), min(max(box.y1, 0.0), size)
    return Box(x0, y0, x1, y1, box.category) if x1 > x0 and y1 > y0 else None


def load_mask(path: str | Path, prepared: PreparedInput) -> np.ndarray:
    """A mask PNG at the prepared size, or at the original image size (then prepared the same way)."""
    from mame_lightning.data.geometry import apply_image

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: mask file not found")
    geometry = prepared.geometry
    shapes = [(prepared.size, prepared.size)] + ([(geometry.height, geometry.width)] if geometry is not None else [])
    width, height = header_size(path)  # a mask of another size is refused before it is decoded
    if (height, width) not in shapes:
        raise InputError(
            f"{path}: mask is {width}x{height}; expected the prepared image size "
            f"{prepared.size}x{prepared.size}" + ("" if geometry is None else
                                                 f" or the original size {geometry.width}x{geometry.height}")
        )
    mask = read_gray(path)
    if mask.shape != (prepared.size, prepared.size):
        mask = apply_image(mask, geometry)
    binary = np.where(mask > 127, 255, 0).astype(np.uint8)
    if not binary.any():
        raise InputError(f"{path}: mask is empty (no pixel above 127), nothing to inpaint")
    return binary


def inpaint_mask(prepared: PreparedInput, *, mask: str | Path | None = None, box=None) -> np.ndarray:
    """The region to repaint from exactly one of a mask file or a box."""
    if (mask is None) == (box is None):
        raise InputError("inpainting needs exactly one of mask=FILE or box=x0,y0,x1,y1")
    return load_mask(mask, prepared) if mask is not None else mask_from_box(parse_box(box), prepared)


__all__ = ["InputError", "PreparedInput", "header_size", "input_label", "load_input_image", "parse_box", "mask_from_box", "load_mask",
           "inpaint_mask", "is_dicom"]
