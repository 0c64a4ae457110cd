"""Build and save small mammography DICOM files (Digital Mammography X-Ray Image IOD).

Used by the synthetic raw-set generator and by tests to produce every pixel-path variant the
reader must handle (MONOCHROME1, 12-bit, VOI windows and LUTs, rescale, compressed syntaxes)
from one display-sense image. With the defaults (a window given, ViewPosition and
ImageLaterality written) the object passes the standard's IOD validator (dciodvfy) without errors.
The variants a reader must survive in real archives leave it on purpose: no VOI window on a
FOR PRESENTATION image (`window=None`), the view only as a legacy SRT code (`use_view_code_sequence`),
laterality only at series level (`use_series_laterality`).
"""

from __future__ import annotations

import copy
import datetime as dt
import os
from typing import Any

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from mame_lightning.io import atomic_path

MAMMO_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MAMMO_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"

BREAST_REGION = ("76752008", "SCT", "Breast")  # CID 4031 anatomic region of every mammogram
# CID 4014 "View for Mammography": view -> (legacy SRT code, SNOMED CT code, code meaning).
VIEW_CODES: dict[str, tuple[str, str, str]] = {
    "ML": ("R-10224", "399260004", "medio-lateral"),
    "MLO": ("R-10226", "399368009", "medio-lateral oblique"),
    "LM": ("R-10228", "399352003", "latero-medial"),
    "LMO": ("R-10230", "399099002", "latero-medial oblique"),
    "CC": ("R-10242", "399162004", "cranio-caudal"),
    "FB": ("R-10244", "399196006", "caudo-cranial (from below)"),
    "SIO": ("R-102D0", "399188001", "superolateral to inferomedial oblique"),
    "ISO": ("R-40AAA", "441555000", "inferomedial to superolateral oblique"),
    "XCCL": ("R-1024A", "399192008", "cranio-caudal exaggerated laterally"),
    "XCCM": ("R-1024B", "399101009", "cranio-caudal exaggerated medially"),
}

TRANSFER_SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg2000": JPEG2000Lossless,
}


def make_mammogram_dataset(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 16,
    window: tuple[float, float] | None = None,
    voi_function: str = "LINEAR",
    voi_lut: np.ndarray | None = None,
    rescale: tuple[float, float] = (1.0, 0.0),
    view: str = "CC",
    laterality: str = "L",
    use_view_code_sequence: bool = False,
    use_series_laterality: bool = False,
    manufacturer: str = "HOLOGIC, Inc.",
    pixel_spacing: tuple[float, float] = (0.07, 0.07),
    modality: str = "MG",
    presentation_intent: str = "FOR PRESENTATION",
    implant: bool = False,
    patient_name: str = "DOE^JANE",
    patient_id: str = "PID000",
    birth_date: str = "19600101",
    accession: str = "ACC000",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Dataset:
    """A Digital Mammography X-Ray image dataset holding `pixels` (uint16 HxW, tissue bright).

    Stored values: scaled into 0..2**bits_stored-1 when they exceed it, then inverted for
    MONOCHROME1 so a correct reader shows tissue bright again. `window` is (center, width)
    and `voi_lut` a LUT indexed from stored value 0, both in rescaled stored-value units as
    the standard defines them. `extra` sets further keywords last; a None value removes one.
    """
    stored = _stored_values(pixels, photometric, bits_stored)
    ds = Dataset()
    sop_class = MAMMO_FOR_PROCESSING if presentation_intent.upper() == "FOR PROCESSING" else MAMMO_FOR_PRESENTATION
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    _patient_and_study(ds, patient_name, patient_id, birth_date, accession)
    ds.Modality = modality
    ds.Manufacturer = manufacturer
    ds.PresentationIntentType = presentation_intent
    ds.BreastImplantPresent = "YES" if implant else "NO"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    _positioning(ds, view, laterality, use_view_code_sequence, use_series_laterality)
    _mammography_modules(ds, view, laterality, photometric)
    ds.PixelSpacing = [float(v) for v in pixel_spacing]
    ds.ImagerPixelSpacing = [float(v) for v in pixel_spacing]
    _pixel_module(ds, stored, photometric, bits_stored)
    ds.RescaleSlope = float(rescale[0])
    ds.RescaleIntercept = float(rescale[1])
    ds.RescaleType = "US"
    _voi_module(ds, window, voi_function, voi_lut)
    apply_extra(ds, extra)
    ds.file_meta = _file_meta(ds)
    return ds


def apply_extra(ds: Dataset, extra: dict[str, Any] | None) -> None:
    """Set each keyword of `extra` on `ds`; a None value removes the element."""
    for keyword, value in (extra or {}).items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)


def save_dataset(ds: Dataset, path: str | os.PathLike, transfer_syntax: str = "explicit") -> None:
    """Write `ds` as a DICOM file (preamble + file meta) in one of TRANSFER_SYNTAXES, atomically.

    Compression works on a copy, so the caller's dataset keeps its native pixel data; the
    syntaxes are lossless, so the SOP Instance UID is kept (the image is the same instance).
    """
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"unknown transfer syntax {transfer_syntax!r}; choose from {sorted(TRANSFER_SYNTAXES)}")
    uid = TRANSFER_SYNTAXES[transfer_syntax]
    out = copy.deepcopy(ds)
    if not hasattr(out, "file_meta") or "MediaStorageSOPClassUID" not in out.file_meta:
        out.file_meta = _file_meta(out)
    if uid.is_compressed:
        if "PixelData" not in out:
            raise ValueError(f"cannot write {path} as {transfer_syntax}: the dataset has no PixelData")
        out.compress(uid, generate_instance_uid=False)
    else:
        out.file_meta.TransferSyntaxUID = uid
    with atomic_path(path) as tmp:
        out.save_as(tmp, enforce_file_format=True)


def _stored_values(pixels: np.ndarray, photometric: str, bits_stored: int) -> np.ndarray:
    """Display-sense pixels -> stored values for the requested depth and photometric sense."""
    pixels = np.asarray(pixels)
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {pixels.shape}")
    if not 1 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must be in 1..16, got {bits_stored}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    max_value = 2**bits_stored - 1
    values = pixels.astype(np.float64)
    if values.min() < 0:
        raise ValueError("pixels must be non-negative")
    if values.max() > max_value:
        values = values * (max_value / values.max())
    values = np.rint(values).astype(np.uint16)
    if photometric == "MONOCHROME1":
        values = (max_value - values).astype(np.uint16)
    return values


def _patient_and_study(ds: Dataset, name: str, patient_id: str, birth_date: str, accession: str) -> None:
    now = dt.datetime(2020, 1, 1, 12, 0, 0)
    ds.PatientName = name
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth_date
    ds.PatientSex = "F"
    ds.AccessionNumber = accession
    ds.StudyID = "1"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""


def _positioning(ds: Dataset, view: str, laterality: str, use_code: bool, use_series: bool) -> None:
    """View and laterality in the primary tags, or only in their fallbacks when asked.

    The View Code Sequence (Type 1) is always written when the view has a code: SNOMED CT
    normally, the retired SRT code when the view is given by the code alone (older archives).
    """
    if use_code:
        ds.ViewPosition = ""
        ds.ViewCodeSequence = Sequence([_view_code_item(view, legacy=True)])
    else:
        ds.ViewPosition = view
        if view.upper() in VIEW_CODES:
            ds.ViewCodeSequence = Sequence([_view_code_item(view)])
    if use_series:
        ds.Laterality = laterality
    else:
        ds.ImageLaterality = laterality


def _view_code_item(view: str, legacy: bool = False) -> Dataset:
    if view.upper() not in VIEW_CODES:
        raise ValueError(f"no CID 4014 code for view {view!r}; known: {sorted(VIEW_CODES)}")
    srt_code, sct_code, meaning = VIEW_CODES[view.upper()]
    item = _code_item(srt_code, "SRT", meaning) if legacy else _code_item(sct_code, "SCT", meaning)
    item.ViewModifierCodeSequence = Sequence([])
    return item


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _orientation(view: str, laterality: str) -> list[str]:
    """Patient Orientation as acquired: a left breast's chest wall on the left edge, a right one's
    on the right; columns run across the body on cranio-caudal views, toward the feet on the others."""
    toward_nipple, across = ("A", "R") if laterality.upper() == "L" else ("P", "L")
    view = view.upper()
    if view in ("CC", "XCCL", "XCCM", "FB"):
        return [toward_nipple, across]
    return [toward_nipple, "F" + across if view in ("MLO", "LMO", "SIO", "ISO") else "F"]


def _mammography_modules(ds: Dataset, view: str, laterality: str, photometric: str) -> None:
    """The Type 1/2 attributes of the DX Image, DX Detector, Mammography Image and Acquisition
    Context modules that hold for every phantom (nothing about a detector is claimed)."""
    ds.PatientOrientation = _orientation(view, laterality)
    ds.AnatomicRegionSequence = Sequence([_code_item(*BREAST_REGION)])
    ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    ds.DetectorType = ""
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.OrganExposed = "BREAST"
    ds.AcquisitionContextSequence = Sequence([])


def _pixel_module(ds: Dataset, stored: np.ndarray, photometric: str, bits_stored: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = (int(n) for n in stored.shape)
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME2" else -1
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()


def _voi_module(ds: Dataset, window: tuple[float, float] | None, function: str, lut: np.ndarray | None) -> None:
    if window is not None:
        ds.WindowCenter = float(window[0])
        ds.WindowWidth = float(window[1])
        ds.VOILUTFunction = function
    if lut is not None:
        lut = np.asarray(lut)
        if lut.ndim != 1 or not 1 <= lut.size <= 65536:
            raise ValueError(f"voi_lut must be 1-D with 1..65536 entries, got shape {lut.shape}")
        item = Dataset()
        # 0 entries in the descriptor means 65536 (PS3.3 C.11.2.1.1).
        item.LUTDescriptor = [lut.size % 65536, 0, 16]
        item.LUTExplanation = "display"
        item.add(DataElement(0x00283006, "OW", np.asarray(lut, dtype="<u2").tobytes()))
        ds.VOILUTSequence = Sequence([item])


def _file_meta(ds: Dataset) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


__all__ = ["apply_extra", "make_mammogram_dataset", "save_dataset", "VIEW_CODES", "TRANSFER_SYNTAXES"]
