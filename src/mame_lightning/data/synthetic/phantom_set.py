"""Write a synthetic raw mammography set in the two layouts the metadata sources read.

Half the phantoms go to ``vindr/`` (VinDr-Mammo release layout: CSV annotations, mostly Siemens,
some XCCL views) and half to ``omi/`` (OMI-DB layout as the ``omidb`` package reads it: per client
``data/<client>/imagedb_<client>.json`` with the marks, ``nbss_<client>.json`` with the screening
episode and its lesions, one JSON DICOM header per image, ``images/<client>/<study>/<image>.dcm``;
mostly Hologic, some magnification images). Every acquisition variant a reader must handle (MONOCHROME1,
12-bit, VOI windows, compressed transfer syntaxes, view codes instead of ViewPosition, series
laterality instead of ImageLaterality) is spread over the set so that even 24 images cover each
one. The DICOMs carry fake but recognisable patient identifiers so de-identification is testable.

Which image gets what is decided in `synthetic_plan`; here each plan is drawn, encoded and filed.
Pixels follow from the seed too (each image has its own generator, seeded by (seed, index)), so a
seed gives byte-identical files. Files whose plan is unchanged since the last run are not redrawn.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import dictionary_description, tag_for_keyword
from pydicom.multival import MultiValue
from tqdm import tqdm

from mame_lightning.data.dicom import PHI_KEYWORDS, normalise_vendor
from mame_lightning.data.dicom_writer import TRANSFER_SYNTAXES, make_mammogram_dataset, save_dataset
from mame_lightning.data.synthetic.phantoms import PhantomSpec, render_phantom
from mame_lightning.data.synthetic.plan import (FORMAT_VERSION, ImagePlan, fingerprint, phi_of,
                                                plan_counts, plan_set)
from mame_lightning.io import write_bytes

FULL_HEIGHT = 3328  # detector rows the base pixel spacings refer to

MODELS = {"siemens": "Mammomat Inspiration", "hologic": "Selenia Dimensions",
          "Planmed": "Planmed Nuance", "IMS s.r.l.": "GIOTTO IMAGE 3DL",
          "GE MEDICAL SYSTEMS": "Senographe Essential",
          "Philips Digital Mammography Sweden AB": "MicroDose SI"}
BASE_SPACING_MM = {"siemens": 0.085, "hologic": 0.07, "other": 0.1}

# Phantom finding categories -> the OMI-DB mark flag that says so, and the NBSS lesion description.
OMI_MARK_FLAGS = {"Mass": "Mass", "Suspicious Calcification": "SuspiciousCalcifications"}
OMI_FLAG_NAMES = ("Mass", "SuspiciousCalcifications", "ArchitecturalDistortion", "FocalAsymmetry")
OMI_SITE = "SYN"

VINDR_BREAST_COLUMNS = ["study_id", "series_id", "image_id", "laterality", "view_position",
                        "height", "width", "breast_birads", "breast_density", "split"]
VINDR_FINDING_COLUMNS = ["image_id", "study_id", "series_id", "laterality", "view_position",
                         "height", "width", "breast_birads", "breast_density",
                         "finding_categories", "finding_birads", "xmin", "ymin", "xmax", "ymax",
                         "split"]
# metadata.csv holds these tags under their DICOM names (no patient fields, as in the release).
VINDR_METADATA_KEYWORDS = [
    "SOPInstanceUID", "SeriesInstanceUID", "Modality", "PresentationIntentType", "ViewPosition",
    "ImageLaterality", "PhotometricInterpretation", "Rows", "Columns", "BitsStored",
    "PixelSpacing", "ImagerPixelSpacing", "WindowCenter", "WindowWidth", "VOILUTFunction",
    "Manufacturer", "ManufacturerModelName", "BreastImplantPresent"]
VINDR_METADATA_COLUMNS = [dictionary_description(tag_for_keyword(k)) for k in VINDR_METADATA_KEYWORDS]


def _pixel_spacing(manufacturer: str, height: int) -> tuple[float, float]:
    spacing = round(BASE_SPACING_MM[normalise_vendor(manufacturer)] * FULL_HEIGHT / height, 6)
    return spacing, spacing


def _window(pixels: np.ndarray, plan: ImagePlan) -> tuple[float, float] | None:
    """A window over the stored values of the image (stored values are inverted for MONO1)."""
    if plan.voi == "none":
        return None
    max_value = 2**plan.bits_stored - 1
    centre = 0.5 * float(pixels.max())
    if plan.photometric == "MONOCHROME1":
        centre = max_value - centre
    return round(centre, 1), round(1.1 * float(pixels.max()) + 1, 1)


def render_file(plan: ImagePlan, root: Path, height: int, width: int, seed: int) -> dict:
    """Draw, encode and save one image; return what the annotation files need about it."""
    vendor = normalise_vendor(plan.manufacturer)
    spec = PhantomSpec(height=height, width=width, view="CC" if plan.view == "XCCL" else plan.view,
                       laterality=plan.laterality, density=plan.density, area=plan.area,
                       lesions=plan.lesions, vendor=vendor, implant=plan.implant)
    phantom = render_phantom(spec, np.random.default_rng([seed, 2, plan.index]))
    pixels = np.rint(phantom.image * (2**plan.bits_stored - 1)).astype(np.uint16)
    ds = make_mammogram_dataset(
        pixels, photometric=plan.photometric, bits_stored=plan.bits_stored,
        window=_window(pixels, plan), voi_function=plan.voi if plan.voi != "none" else "LINEAR",
        view=plan.view, laterality=plan.laterality, use_view_code_sequence=plan.view_code,
        use_series_laterality=plan.series_laterality, manufacturer=plan.manufacturer,
        pixel_spacing=_pixel_spacing(plan.manufacturer, height), implant=plan.implant,
        study_uid=plan.study_uid, series_uid=plan.series_uid, sop_uid=plan.sop_uid,
        **phi_of(plan.patient),
        extra={"ManufacturerModelName": MODELS.get(vendor, MODELS.get(plan.manufacturer, "")),
               "SeriesDescription": ("MAGNIFICATION " if plan.special_protocol else "")
               + f"{plan.laterality} {plan.view}",
               "InstitutionName": "SYNTHETIC PHANTOM CLINIC"})
    with _quiet("openjpeg"):  # the JPEG 2000 encoder logs every tile at INFO
        save_dataset(ds, root / plan.path, transfer_syntax=plan.compression)
    if TRANSFER_SYNTAXES[plan.compression].is_compressed:
        _restore_instance_uid(root / plan.path, plan.sop_uid)
    metadata = {column: _tag_text(ds, keyword)
                for column, keyword in zip(VINDR_METADATA_COLUMNS, VINDR_METADATA_KEYWORDS)}
    findings = [[round(b.x0, 2), round(b.y0, 2), round(b.x1, 2), round(b.y1, 2), list(cats)]
                for b, cats in zip(phantom.boxes, phantom.categories)]
    return {"findings": findings, "metadata": metadata}


@contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _restore_instance_uid(path: Path, sop_uid: str) -> None:
    """Compressing through pydicom gives the file a fresh, random SOP Instance UID; the layouts
    name files by the planned UID and a seed must give identical bytes, so put it back."""
    ds = pydicom.dcmread(path)
    if ds.SOPInstanceUID == sop_uid:
        return
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    write_bytes(path, buffer.getvalue())


def _tag_text(ds, keyword: str) -> str:
    value = ds.get(keyword, "")
    if isinstance(value, (list, tuple, MultiValue)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def _csv_text(columns: list[str], rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _vindr_rows(plans: list[ImagePlan], info: dict[str, dict]) -> tuple[list, list, list]:
    """Rows of breast-level_annotations.csv, finding_annotations.csv and metadata.csv."""
    breast, findings, metadata = [], [], []
    for plan in plans:
        row = {"study_id": plan.group, "series_id": plan.series_id, "image_id": plan.image_id,
               "laterality": plan.laterality, "view_position": plan.view,
               "height": info[plan.path]["metadata"]["Rows"],
               "width": info[plan.path]["metadata"]["Columns"],
               "breast_birads": f"BI-RADS {plan.birads}", "breast_density": f"DENSITY {plan.density}",
               "split": plan.split}
        breast.append(row)
        empty = {"finding_categories": "['No Finding']", "finding_birads": "",
                 "xmin": "", "ymin": "", "xmax": "", "ymax": ""}
        boxes = info[plan.path]["findings"] or [None]
        for box in boxes:
            finding = empty if box is None else {
                "finding_categories": str(list(box[4])), "finding_birads": f"BI-RADS {plan.birads}",
                "xmin": box[0], "ymin": box[1], "xmax": box[2], "ymax": box[3]}
            findings.append(row | finding)
        metadata.append(info[plan.path]["metadata"])
    return breast, findings, metadata


def _omi_date(patient: int) -> str:
    return f"2015-{1 + patient % 12:02d}-{1 + patient % 28:02d}"


def _omi_marks(findings: list, first_id: int) -> dict[str, dict]:
    """An image's marks as IMAGEDB writes them: keyed by MarkID, corners as text, flags 0/1."""
    marks = {}
    for number, (x0, y0, x1, y1, categories) in enumerate(findings, start=first_id):
        flags = {OMI_MARK_FLAGS[c] for c in categories}
        box = [int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x1)), int(np.ceil(y1))]
        marks[str(number)] = {
            "MarkID": number, "LesionID": number, "LinkedNBSSLesionNumber": "1",
            **dict(zip(("X1", "Y1", "X2", "Y2"), map(str, box))),
            "Width": str(box[2] - box[0]), "Height": str(box[3] - box[1]),
            **{name: int(name in flags) for name in OMI_FLAG_NAMES}, "Conspicuity": "Obvious"}
    return marks


def _omi_episode(plans: list[ImagePlan], info: dict[str, dict]) -> dict:
    """The client's NBSS screening episode; a side with marked images gets a lesion, an assessment
    and a wide-bore biopsy whose opinion follows the BI-RADS of the plan."""
    date = _omi_date(plans[0].patient)
    episode = {"EpisodeType": "R", "EpisodeIsClosed": "Y", "EpisodeOpenedDate": date,
               "SCREENING": {side: {"DateTaken": date, "Opinion": "RN"} for side in ("L", "R")}}
    lesions, assessment, biopsy = {}, {}, {}
    for side in ("L", "R"):
        marked = [p for p in plans if p.laterality == side and info[p.path]["findings"]]
        if not marked:
            continue
        kinds = {c for p in marked for box in info[p.path]["findings"] for c in box[4]}
        malignant = max(p.birads for p in marked) >= 4
        description = "MC" if len(kinds) > 1 else ("MA" if "Mass" in kinds else "CA")
        episode["SCREENING"][side]["Opinion"] = "RS"
        lesions[side] = {"1": {"LesionDescription": description}}
        assessment[side] = {"1": {"DatePerformed": date, "Opinion": "A5" if malignant else "A3"}}
        biopsy[side] = {"1": {"DatePerformed": date, "Opinion": "B5" if malignant else "B2"}}
        biopsy[f"{'left' if side == 'L' else 'right'}_opinion"] = "OM" if malignant else "OB"
    if lesions:
        episode |= {"LESION": lesions, "ASSESSMENT": assessment, "BIOPSYWIDE": biopsy}
    return episode


def _omi_header(path: Path) -> str:
    """The image's DICOM header (no pixel data) in the DICOM JSON model, as OMI-DB ships it; like
    the VinDr metadata.csv it leaves the patient identifiers out (they stay in the DICOM only)."""
    header = pydicom.dcmread(path, stop_before_pixels=True)
    for keyword in PHI_KEYWORDS:
        header.pop(keyword, None)
    return json.dumps(header.to_json_dict(), indent=1, sort_keys=True) + "\n"


def _omi_texts(plans: list[ImagePlan], info: dict[str, dict], root: Path) -> dict[str, str]:
    """Per client IMAGEDB and NBSS records, and a JSON header per image (some as <image>.dcm.json,
    as in the release), keyed by path relative to the set root."""
    clients: dict[str, list[ImagePlan]] = {}
    for plan in plans:
        clients.setdefault(plan.group, []).append(plan)
    texts = {}
    for client, own in clients.items():
        studies: dict[str, dict] = {}
        mark_id = 1
        for plan in own:
            study = studies.setdefault(plan.study_uid, {"StudyDate": _omi_date(plan.patient).replace("-", ""),
                                                        "EpisodeID": "1"})
            marks = _omi_marks(info[plan.path]["findings"], mark_id)
            mark_id += len(marks)
            study[plan.series_uid] = {plan.sop_uid: marks}
            suffix = ".dcm.json" if plan.index % 5 == 0 else ".json"
            texts[f"omi/data/{client}/{plan.study_uid}/{plan.sop_uid}{suffix}"] = _omi_header(root / plan.path)
        texts[f"omi/data/{client}/imagedb_{client}.json"] = json.dumps(
            {"Site": OMI_SITE, "STUDIES": studies}, indent=1, sort_keys=True) + "\n"
        texts[f"omi/data/{client}/nbss_{client}.json"] = json.dumps(
            {"1": _omi_episode(own, info)}, indent=1, sort_keys=True) + "\n"
    return texts


def _load_manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _reusable(entry: dict | None, print_: str, file: Path) -> bool:
    return bool(entry) and entry.get("fingerprint") == print_ and file.is_file() \
        and file.stat().st_size == entry.get("bytes")


def _remove_stale(root: Path, relatives: set[str]) -> None:
    """Delete files an earlier run wrote that this plan no longer has, and emptied folders."""
    for relative in sorted(relatives):
        path = root / relative
        path.unlink(missing_ok=True)
        for parent in path.parents:
            if parent == root or not parent.is_relative_to(root) or any(parent.iterdir()):
                break
            parent.rmdir()


def write_synthetic_set(out_dir: str | os.PathLike, n: int, height: int = 256, width: int = 208,
                        seed: int = 0, lesion_fraction: float = 0.3, calcifications: bool = True,
                        progress: bool = True) -> dict:
    """Write `n` phantoms under out_dir (``vindr/`` and ``omi/``) plus ``manifest.json``.

    Returns a summary: counts per attribute, how many files were written or reused, the
    annotation files, and ``phi_strings`` (the fake identifiers inside the DICOMs).
    """
    root = Path(out_dir)
    plans = plan_set(n, seed, lesion_fraction, calcifications)
    manifest_path = root / "manifest.json"
    previous = _load_manifest(manifest_path)
    old_images = previous.get("images", {})
    info: dict[str, dict] = {}
    written = 0
    for plan in tqdm(plans, desc="synthetic phantoms", unit="img", disable=not progress):
        print_ = fingerprint(plan, height, width, seed)
        file = root / plan.path
        if _reusable(old_images.get(plan.path), print_, file):
            info[plan.path] = old_images[plan.path]
            continue
        entry = render_file(plan, root, height, width, seed)
        info[plan.path] = {"fingerprint": print_, "bytes": file.stat().st_size} | entry
        written += 1

    vindr = [p for p in plans if p.layout == "vindr"]
    breast, findings, metadata = _vindr_rows(vindr, info)
    texts = {
        "vindr/breast-level_annotations.csv": _csv_text(VINDR_BREAST_COLUMNS, breast),
        "vindr/finding_annotations.csv": _csv_text(VINDR_FINDING_COLUMNS, findings),
        "vindr/metadata.csv": _csv_text(VINDR_METADATA_COLUMNS, metadata),
    }
    texts |= _omi_texts([p for p in plans if p.layout == "omi"], info, root)
    for relative, text in texts.items():
        write_bytes(root / relative, text.encode("utf-8"))

    stale = (set(old_images) | set(previous.get("annotations", []))) - set(info) - set(texts)
    _remove_stale(root, stale)

    counts = plan_counts(plans)
    settings = {"n": n, "height": height, "width": width, "seed": seed,
                "lesion_fraction": lesion_fraction, "calcifications": calcifications}
    manifest = {"format_version": FORMAT_VERSION, "settings": settings, "counts": counts,
                "annotations": sorted(texts), "images": dict(sorted(info.items()))}
    write_bytes(manifest_path, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    phi = sorted({value for p in plans for value in phi_of(p.patient).values()})
    return {"out_dir": str(root), "n": n, "written": written, "reused": n - written,
            "removed": len(stale), "counts": counts, "annotations": sorted(texts),
            "manifest": str(manifest_path), "phi_strings": phi}


__all__ = ["ImagePlan", "phi_of", "plan_set", "render_file", "write_synthetic_set"]  # plan names re-exported
