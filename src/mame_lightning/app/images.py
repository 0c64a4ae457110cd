"""Pixels in and out of the GUI: upload checks, brush masks from the image editor, mask outlines.

Uploads are checked before anything decodes them (size from the PNG/DICOM header), so a huge file
is refused with a message instead of exhausting memory. The editor hands back the background and
the brush layers as RGBA arrays, possibly at a different size than the image the model sees; the
brush becomes a binary mask at the background's size, which `pipelines.inputs.load_mask` then maps
like any mask file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mame_lightning.data.records import Box
from mame_lightning.pipelines.inputs import InputError, header_size, is_dicom

OUTLINE_RGB = (255, 40, 40)
DISPLAY_SIDE = 384  # small model outputs are enlarged (nearest) to about this side for display


def image_dimensions(path: Path) -> tuple[int, int]:
    """(width, height) from the header only: DICOM Rows/Columns, or what PIL reads before decoding."""
    if is_dicom(path):
        from mame_lightning.data.dicom import DicomError, read_dicom

        try:
            ds = read_dicom(path)
        except DicomError as exc:  # named by the file the user chose, not the server's temp path
            raise InputError(f"{path.name}: {exc.reason}") from exc
        return int(ds.get("Columns") or 0), int(ds.get("Rows") or 0)
    try:
        return header_size(path)
    except InputError as exc:  # said with the name the user chose, not the server's temp path
        if isinstance(exc.__cause__, Image.DecompressionBombError):
            raise InputError(f"{path.name}: image too large to open safely ({exc.__cause__})") from exc
        raise InputError(f"{path.name}: not an image this app can read (PNG, JPEG, TIFF or DICOM expected)") from exc


def check_upload(path: str | Path | None, max_pixels: int) -> Path:
    """The uploaded file, refused when missing, empty or above `max_pixels` (app.max_pixels)."""
    if path is None or str(path) == "":
        raise InputError("no image: upload a PNG or DICOM file first")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path.name}: the uploaded file is gone; upload it again")
    if path.stat().st_size == 0:
        raise InputError(f"{path.name}: the uploaded file is empty")
    width, height = image_dimensions(path)
    check_pixels(path.name, width, height, max_pixels)
    return path


def check_pixels(name: str, width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise InputError(f"{name}: the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InputError(
            f"{name}: {width}x{height} is {width * height / 1e6:.1f} megapixels, above this app's limit of "
            f"{max_pixels / 1e6:g} megapixels (app.max_pixels)"
        )


def to_gray(array: np.ndarray) -> np.ndarray:
    """uint8 grayscale from a gray, RGB or RGBA array (transparent pixels count as black)."""
    array = np.asarray(array)
    if array.ndim == 2:
        return array.astype(np.uint8)
    rgb = array[..., :3].astype(np.float32)
    gray = rgb.mean(axis=-1)
    if array.shape[-1] == 4:
        gray *= array[..., 3].astype(np.float32) / 255.0
    return np.clip(np.rint(gray), 0, 255).astype(np.uint8)


def painted(layer: np.ndarray) -> np.ndarray:
    """Where a brush layer has paint: alpha above 0 (RGBA), else any non-black pixel."""
    layer = np.asarray(layer)
    if layer.ndim == 3 and layer.shape[-1] == 4:
        return layer[..., 3] > 0
    return to_gray(layer) > 0


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to (height, width)."""
    if mask.shape == tuple(shape):
        return mask
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.Resampling.NEAREST)
    return np.asarray(img) > 127


def editor_background(editor: dict | None) -> np.ndarray | None:
    """The editor's background image as uint8 gray, or None when the editor is empty."""
    background = (editor or {}).get("background")
    return None if background is None else to_gray(background)


def editor_mask(editor: dict | None) -> np.ndarray | None:
    """The union of all brush layers at the background's size (uint8 0/255), or None when nothing is drawn."""
    editor = editor or {}
    layers = [np.asarray(layer) for layer in editor.get("layers") or [] if layer is not None]
    if not layers:
        return None
    background = editor.get("background")
    shape = np.asarray(background).shape[:2] if background is not None else layers[0].shape[:2]
    union = np.zeros(shape, dtype=bool)
    for layer in layers:
        union |= resize_mask(painted(layer), shape)
    return (union.astype(np.uint8) * 255) if union.any() else None


def mask_bbox(mask: np.ndarray, category: str = "Mass") -> Box:
    """Whole-pixel bounding box of a mask, xmax/ymax exclusive (the VinDr annotation box)."""
    rows, cols = np.nonzero(np.asarray(mask) > 0)
    if len(rows) == 0:
        raise InputError("the lesion mask is empty: nothing to annotate")
    return Box(float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1), category)


def outline_overlay(image: np.ndarray, mask: np.ndarray | None, display_side: int = DISPLAY_SIDE) -> np.ndarray:
    """RGB copy of `image`, enlarged by a whole factor for display, with the mask's outline drawn in red."""
    from skimage.segmentation import find_boundaries

    gray = to_gray(image)
    factor = max(1, display_side // max(gray.shape))
    big = np.kron(gray, np.ones((factor, factor), dtype=np.uint8))
    rgb = np.repeat(big[..., None], 3, axis=-1)
    if mask is not None and np.asarray(mask).any():
        big_mask = np.kron(np.asarray(mask) > 0, np.ones((factor, factor), dtype=bool))
        rgb[find_boundaries(big_mask, mode="thick")] = OUTLINE_RGB
    return rgb


__all__ = ["check_upload", "check_pixels", "image_dimensions", "to_gray", "painted", "resize_mask",
           "editor_background", "editor_mask", "mask_bbox", "outline_overlay"]
