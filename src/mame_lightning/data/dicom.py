"""Read mammography DICOM files into display-ready float images and plain tag metadata.

Pixel values follow the DICOM display chain (PS3.3 C.11 and PS3.4 N.2): stored values →
Modality LUT (rescale) → VOI LUT (window or LUT sequence) → Presentation (MONOCHROME1 inverted),
so every vendor's file ends up with a dark background and bright tissue. Error messages name the
file and the problem, never patient identifiers.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from mame_lightning.data.dicom_writer import VIEW_CODES

log = logging.getLogger(__name__)

PIXEL_DATA_TAG_BYTES = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
PHI_KEYWORDS = ("PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "AccessionNumber")


class DicomError(Exception):
    """A file that cannot be read or decoded; `path` and `reason` are kept for reports."""

    def __init__(self, path: str | os.PathLike | None, reason: str):
        self.path = str(path) if path is not None else "<in-memory dataset>"
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep picklable across DataLoader / multiprocessing workers
        return (type(self), (self.path, self.reason))


# ---------------------------------------------------------------------------------------------
# reading


def read_dicom(path: str | os.PathLike, *, max_pixels: int | None = None, limit_name: str = "max_pixels") -> Dataset:
    """Parse a DICOM file (with or without the 128-byte preamble) and check it holds an image.

    Pixel data is not decoded here; only its presence and, for native syntaxes, its length. With
    `max_pixels`, an image whose header declares more pixels (Rows x Columns x frames) is refused
    before anything decodes it: a few bytes of RLE can claim gigabytes (`limit_name` names the setting).
    """
    path = Path(path)
    if not path.is_file():
        raise DicomError(path, "file not found")
    ds = _parse(path)
    _ensure_transfer_syntax(ds)
    if max_pixels:
        check_pixel_count(ds, path, int(max_pixels), limit_name)
    _check_pixel_data(ds, path)
    return ds


def declared_pixels(ds: Dataset) -> tuple[int, int, int]:
    """(rows, columns, frames) as the header declares them."""
    frames = _int(ds, "NumberOfFrames") or 1
    return _int(ds, "Rows") or 0, _int(ds, "Columns") or 0, max(1, frames)


def check_pixel_count(ds: Dataset, path: Any, max_pixels: int, limit_name: str = "max_pixels") -> None:
    rows, columns, frames = declared_pixels(ds)
    count = rows * columns * frames
    if count > max_pixels:
        shape = f"{columns}x{rows}" + (f"x{frames} frames" if frames > 1 else "")
        raise DicomError(path, f"image too large to decode safely: {shape} is {count / 1e6:.0f} megapixels, above "
                               f"the limit of {max_pixels / 1e6:g} megapixels ({limit_name})")


def _parse(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        pass  # no preamble/'DICM': some archives store bare datasets; try once more leniently
    except Exception as exc:  # noqa: BLE001 - any parser failure is a bad file
        raise DicomError(path, f"cannot parse DICOM ({type(exc).__name__}: {_short(exc)})") from exc
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:  # noqa: BLE001
        raise DicomError(path, f"not a DICOM file ({type(exc).__name__}: {_short(exc)})") from exc
    if not any(k in ds for k in ("SOPClassUID", "Rows", "PixelData", "Modality")):
        raise DicomError(path, "not a DICOM file: no 'DICM' marker and no recognisable image elements")
    return ds


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Bare datasets lack file meta; record the encoding the parser found so pixels can decode."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit:
        uid = ImplicitVRLittleEndian
    else:
        uid = ExplicitVRLittleEndian if little in (True, None) else ExplicitVRBigEndian
    ds.file_meta = meta if meta is not None else FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid


def _check_pixel_data(ds: Dataset, path: Path) -> None:
    if "PixelData" not in ds:
        if _file_mentions_pixel_data(path):
            raise DicomError(path, "truncated: the Pixel Data element is cut off before its end")
        if _ends_inside_an_element(ds, path):
            raise DicomError(path, "truncated: the file ends inside an element, before any pixel data")
        raise DicomError(path, "no Pixel Data element (no image in this file, or the file is cut before it)")
    if "Rows" not in ds or "Columns" not in ds:
        raise DicomError(path, "missing Rows/Columns, so the pixel data cannot be shaped")
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        return
    expected = _native_pixel_bytes(ds)
    found = len(ds.PixelData)
    if expected and found < expected:
        raise DicomError(path, f"truncated: pixel data holds {found} of {expected} expected bytes")


def _native_pixel_bytes(ds: Dataset) -> int:
    bits = int(ds.get("BitsAllocated", 16) or 16)
    if bits < 8:
        return 0
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    return int(ds.Rows) * int(ds.Columns) * samples * frames * bits // 8


def _ends_inside_an_element(ds: Dataset, path: Path) -> bool:
    """True when the last parsed element does not end where the file does (parser stopped early)."""
    if not ds.keys():
        return True
    last = ds.get_item(max(ds.keys()))
    tell, length = getattr(last, "value_tell", None), getattr(last, "length", None)
    if tell is None or length is None or length == 0xFFFFFFFF:
        return False  # undefined length: its end is not recorded, so nothing to compare
    return tell + length != path.stat().st_size


def _file_mentions_pixel_data(path: Path) -> bool:
    with open(path, "rb") as handle:
        return PIXEL_DATA_TAG_BYTES in handle.read()


# ---------------------------------------------------------------------------------------------
# pixels


def to_float_image(ds: Dataset) -> np.ndarray:
    """Display-sense float32 HxW image in [0, 1]: background dark, tissue bright.

    Modality LUT, then the first VOI window or VOI LUT (LINEAR, LINEAR_EXACT, SIGMOID, LUT
    Sequence), then MONOCHROME1 inversion, then min-max scaling. A VOI module that cannot be
    applied (unknown function, zero width) is skipped with a warning rather than losing the image.
    """
    path = getattr(ds, "filename", None)
    return _display(_decode(ds, path), ds, path)


def to_display_uint8(ds: Dataset) -> np.ndarray:
    """``to_uint8(to_float_image(ds))``, the same bytes, from one decode and one table look-up.

    Every step of the chain but the final min-max is pointwise, and min-max only needs the
    extremes of the values present, so the chain runs once per distinct stored value (at most
    65536 for 16-bit data) instead of over millions of pixels in float64.
    """
    path = getattr(ds, "filename", None)
    stored = _decode(ds, path)
    if stored.dtype.kind not in "iub" or stored.size == 0:
        return to_uint8(_display(stored, ds, path))
    low, high = int(stored.min()), int(stored.max())
    if high - low >= TABLE_MAX_SPAN:
        return to_uint8(_display(stored, ds, path))
    index = stored.astype(np.intp)
    if low:
        index -= low
    present = np.flatnonzero(np.bincount(index.ravel(), minlength=high - low + 1))
    table = np.zeros(high - low + 1, dtype=np.uint8)
    table[present] = to_uint8(_display((present + low).astype(stored.dtype), ds, path))
    return table[index]


TABLE_MAX_SPAN = 1 << 20  # wider stored ranges (32-bit data) go through the plain chain


def _display(stored: np.ndarray, ds: Dataset, path: Any) -> np.ndarray:
    """The display chain on stored values (any shape: an image or its distinct values)."""
    values = apply_modality_lut(stored, ds)
    values = _apply_voi(values, ds, path)
    values = np.asarray(values, dtype=np.float64)
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        values = values.max() - values
    return _min_max(values)


def _decode(ds: Dataset, path: Any) -> np.ndarray:
    syntax = ds.file_meta.TransferSyntaxUID if "TransferSyntaxUID" in getattr(ds, "file_meta", {}) else None
    syntax_name = getattr(syntax, "name", None) or str(syntax)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - every decoder failure becomes a DicomError
        message = _scrub(f"{type(exc).__name__}: {_short(exc)}", ds)
        raise DicomError(path, f"cannot decode pixel data ({syntax_name}): {message}") from exc
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise DicomError(path, f"expected a grayscale image, found {samples} samples per pixel")
    if arr.ndim == 3:  # multi-frame: mammography keeps the image in the first frame
        arr = arr[0]
    return arr


def _apply_voi(values: np.ndarray, ds: Dataset, path: Any) -> np.ndarray:
    if "VOILUTSequence" in ds and np.all(np.mod(values, 1) == 0):
        values = values.astype(np.int64)  # a LUT indexes integers; avoid float lookup
    try:
        return apply_voi_lut(values, ds, index=0)
    except (ValueError, NotImplementedError, AttributeError, IndexError, TypeError) as exc:
        log.warning("%s: VOI LUT not applied (%s); using modality values", path, _short(exc))
        return values


def _min_max(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    return ((values - low) / (high - low)).astype(np.float32)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """8-bit image: floats are read as [0, 1] (clipped), other integer types are min-max scaled."""
    img = np.asarray(img)
    if img.dtype == np.uint8:
        return img
    if np.issubdtype(img.dtype, np.floating):
        return np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.rint(_min_max(img.astype(np.float64)) * 255.0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# tags

_CODE_TO_VIEW = {code: view for view, codes in VIEW_CODES.items() for code in codes[:2]}
_MEANING_TO_VIEW = {re.sub(r"[^a-z]", "", codes[2]): view for view, codes in VIEW_CODES.items()}
_MEANING_TO_VIEW.update({"craniocaudal": "CC", "mediolateraloblique": "MLO", "caudocranial": "FB"})


def tag_metadata(ds: Dataset) -> dict[str, Any]:
    """Plain, identifier-free acquisition metadata used by filters, prompts and reports."""
    manufacturer = _text(ds, "Manufacturer")
    implant = _text(ds, "BreastImplantPresent")
    return {
        "view": _view(ds),
        "laterality": _laterality(ds),
        "manufacturer": manufacturer,
        "vendor": normalise_vendor(manufacturer),
        "modality": _text(ds, "Modality"),
        "presentation_intent": _text(ds, "PresentationIntentType"),
        "implant": {"YES": True, "NO": False}.get((implant or "").upper()),
        "pixel_spacing": _pixel_spacing(ds),
        "rows": _int(ds, "Rows"),
        "columns": _int(ds, "Columns"),
        "photometric": _text(ds, "PhotometricInterpretation"),
    }


def normalise_vendor(manufacturer: str | None) -> str:
    """'hologic', 'siemens' or 'other' from the free-text Manufacturer tag."""
    text = (manufacturer or "").lower()
    if "hologic" in text or "lorad" in text:
        return "hologic"
    if "siemens" in text:
        return "siemens"
    return "other"


def _view(ds: Dataset) -> str | None:
    position = _text(ds, "ViewPosition")
    if position:
        return position.upper()
    for item in ds.get("ViewCodeSequence") or []:
        code = str(item.get("CodeValue", "") or "").strip()
        if code in _CODE_TO_VIEW:
            return _CODE_TO_VIEW[code]
        meaning = re.sub(r"[^a-z]", "", str(item.get("CodeMeaning", "") or "").lower())
        if meaning in _MEANING_TO_VIEW:
            return _MEANING_TO_VIEW[meaning]
    return None


def _laterality(ds: Dataset) -> str | None:
    for keyword in ("ImageLaterality", "Laterality"):
        value = (_text(ds, keyword) or "").upper()
        if value in ("L", "R"):
            return value
    return None


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        try:
            if value is not None and len(value) == 2:
                return float(value[0]), float(value[1])
        except (TypeError, ValueError):
            continue
    return None


def _text(ds: Dataset, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - a malformed optional tag reads as missing
        return None
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1", errors="replace")
    text = str(value).strip()
    return text or None


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        return int(ds.get(keyword)) if ds.get(keyword) is not None else None
    except (TypeError, ValueError):
        return None


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _scrub(message: str, ds: Dataset) -> str:
    """Remove any patient identifier value that a library message might have echoed."""
    for keyword in PHI_KEYWORDS:
        value = _text(ds, keyword)
        if value and len(value) > 1:
            message = message.replace(value, "<redacted>")
    return message


__all__ = ["DicomError", "read_dicom", "to_display_uint8", "to_float_image", "to_uint8", "tag_metadata", "normalise_vendor"]
