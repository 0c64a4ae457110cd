"""Generated images as DICOM Secondary Capture objects.

A generated mammogram was never acquired: no detector, positioner or exposure took part, so the
Digital Mammography X-Ray IOD (whose modules describe exactly those) would have to be filled with
invented acquisition facts. The Secondary Capture Image IOD is the standard's class for images
that no modality acquired, and its SC Equipment module has the defined term ConversionType "SYN"
(Synthetic Image) for this case. What the image depicts stays machine-readable in the attributes
the SC IOD does carry: Modality MG, BodyPartExamined BREAST, Image Laterality, a coded View Code
Sequence (CID 4014, SNOMED CT), the Anatomic Region Sequence (breast) and Patient Orientation.

Built with highdicom's `SCImage` (UIDs, file meta, person-name checks, pixel encoding).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

import numpy as np

from mame_lightning.data.dicom_writer import VIEW_CODES, apply_extra

CONVERSION_TYPE = "SYN"  # SC Equipment: Synthetic Image
BREAST_CODE = ("76752008", "SCT", "Breast")
# Views drawn from above (the column direction runs across the body) vs from the side (toward the feet).
_CRANIO_CAUDAL = {"CC", "XCCL", "XCCM", "FB"}
_OBLIQUE = {"MLO", "LMO", "SIO", "ISO"}


def patient_orientation(view: str | None, laterality: str) -> list[str]:
    """Row and column directions of an image with the chest wall on the left edge.

    Rows run from the chest wall to the nipple (anterior); columns run from the lateral side
    toward the other breast on cranio-caudal views, toward the feet (and across) on oblique ones.
    Empty (Type 2) when the view is unknown.
    """
    view = (view or "").upper()
    across = "R" if laterality.upper() == "L" else "L"
    if view in _CRANIO_CAUDAL:
        return ["A", across]
    if view in _OBLIQUE:
        return ["A", "F" + across]
    if view in ("ML", "LM"):
        return ["A", "F"]
    return []


def _coded(value: str, scheme: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value, scheme, meaning)


def secondary_capture_dataset(
    image: np.ndarray,
    *,
    view: str | None,
    laterality: str = "L",
    statement: str,
    manufacturer: str,
    software_version: str,
    patient_name: str,
    patient_id: str,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    now: dt.datetime | None = None,
    extra: Mapping[str, Any] | None = None,
):
    """An 8-bit MONOCHROME2 Secondary Capture dataset of `image` (uint8 HxW, stored unchanged).

    `statement` goes into DerivationDescription (ST, 1024 chars) and ImageComments (LT, 10240);
    `extra` sets further keywords last. Patient identity is only `patient_name` / `patient_id`;
    birth date, sex and accession number are present and empty (Type 2).
    """
    from highdicom.sc import SCImage
    from pydicom.uid import generate_uid

    pixels = np.asarray(image)
    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 grayscale image, got {pixels.dtype} with shape {pixels.shape}")
    view = (view or "").upper() or None
    if view is not None and view not in VIEW_CODES:
        raise ValueError(f"no CID 4014 code for view {view!r}; known: {sorted(VIEW_CODES)}")
    laterality = laterality.upper()
    if laterality not in ("L", "R"):
        raise ValueError(f"laterality must be L or R, got {laterality!r}")
    now = now or dt.datetime.now()
    ds = SCImage(
        pixel_array=np.ascontiguousarray(pixels), photometric_interpretation="MONOCHROME2", bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=("A", "R"),  # replaced below (compound values)
        study_instance_uid=study_uid or generate_uid(), series_instance_uid=series_uid or generate_uid(),
        sop_instance_uid=sop_uid or generate_uid(), series_number=1, instance_number=1,
        manufacturer=manufacturer, manufacturer_model_name=manufacturer, software_versions=software_version,
        patient_name=patient_name, patient_id=patient_id, patient_birth_date=None, patient_sex=None,
        accession_number=None, referring_physician_name=None, study_id="1",
        study_date=now.date(), study_time=now.time(), series_date=now.date(), series_time=now.time(),
        content_date=now.date(), content_time=now.time(), series_description="SYNTHETIC",
    )
    ds.PatientOrientation = patient_orientation(view, laterality)
    ds.ConversionType = CONVERSION_TYPE
    ds.SecondaryCaptureDeviceManufacturer = manufacturer
    ds.SecondaryCaptureDeviceSoftwareVersions = software_version
    ds.Modality = "MG"
    ds.BodyPartExamined = "BREAST"
    ds.ImageLaterality = laterality
    ds.AnatomicRegionSequence = [_coded(*BREAST_CODE)]
    if view is not None:
        _, sct_code, meaning = VIEW_CODES[view]
        ds.ViewCodeSequence = [_coded(sct_code, "SCT", meaning)]
    ds.DerivationDescription = statement[:1024]
    ds.ImageComments = statement[:10240]
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    ds.LossyImageCompression = "00"
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 128, 256, "LINEAR"  # identity for 8 bits
    apply_extra(ds, dict(extra or {}))
    return ds


__all__ = ["CONVERSION_TYPE", "patient_orientation", "secondary_capture_dataset"]
