"""One image through MAM-E's preparation: read, filter, orient, crop, describe, write.

Runs inside worker processes, so it takes plain arguments and returns a plain outcome dict:
``status`` kept / filtered / rejected, the ``kind`` and ``reason`` of a drop, the ``task`` and the
metadata ``line`` of a kept image, plus any orientation disagreement and lesions that fell
outside the crop. Bad files become rejections, never exceptions, so one broken DICOM cannot stop
a run over twenty thousand.
"""

from __future__ import annotations

import errno
import os
from dataclasses import replace
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mame_lightning.data.dicom import DicomError, normalise_vendor, read_dicom, to_display_uint8
from mame_lightning.data.prepare.filters import filter_reason, image_tags, merge_attributes, unlocalised_reason
from mame_lightning.data.geometry import Geometry, apply_image, box_mask, map_box, plan
from mame_lightning.data.prepare.identity import hidden_path, read_identity, redact, replace_strings, reveals_identity
from mame_lightning.data.prompts import density_word, render_prompt
from mame_lightning.data.records import Box, ImageRecord
from mame_lightning.data.prepare.report import TASKS, write_png
from mame_lightning.data.tissue import area_class, area_ratio, chest_wall_side, tissue_mask

# DicomError reasons -> the short kind counted in the report.
_REJECT_KINDS = (
    ("too large", "too large"),
    ("file not found", "missing file"),
    ("not a dicom", "not DICOM"),
    ("truncated", "truncated"),
    ("no pixel data", "no pixel data"),
    ("cannot decode", "undecodable pixel data"),
)
BOX_DECIMALS = 2


class BlankImage(ValueError):
    """The image holds no tissue to describe or orient (e.g. a constant frame)."""


def _drop(status: str, kind: str, reason: str, **extra) -> dict:
    return {"status": status, "task": None, "kind": kind, "reason": reason, **extra}


def reject_kind(reason: str) -> str:
    lowered = reason.lower()
    return next((kind for key, kind in _REJECT_KINDS if key in lowered), "unreadable")


def orient(img: np.ndarray, laterality: str | None, size: int, check: bool):
    """Resize + crop, flipping right breasts; the pixels overrule a tag that disagrees.

    Returns (image, geometry, tissue mask, disagreed) where ``disagreed`` is True when the
    laterality tag pointed the other way than the tissue.
    """
    height, width = img.shape[:2]
    geom = plan(height, width, size, flip=laterality == "R")
    out = apply_image(img, geom)
    mask = tissue_mask(out)
    if not mask.any():
        raise BlankImage("no breast tissue found (blank image)")
    if not check or chest_wall_side(mask) == "left":
        return out, geom, mask, False
    geom = replace(geom, flip=not geom.flip)  # the flip comes after the crop: no second resize
    out = np.ascontiguousarray(out[:, ::-1])
    return out, geom, tissue_mask(out), laterality is not None


def _rounded(box: Box) -> Box:
    return Box(*(round(float(v), BOX_DECIMALS) for v in (box.x0, box.y0, box.x1, box.y1)), box.category)


def map_boxes(record: ImageRecord, geom: Geometry, item_id: str) -> tuple[list[Box], list[dict]]:
    """Boxes in prepared coordinates, and the ones that fell outside the crop (for the report)."""
    inside, outside = [], []
    for box in record.boxes:
        mapped = map_box(box, geom)
        mapped = _rounded(mapped) if mapped is not None else None
        if mapped is None or mapped.area <= 0:  # nothing (or under 0.01 px) left inside the crop
            outside.append({"file": record.source, "id": item_id, "box": box.to_list()})
        else:
            inside.append(mapped)
    return inside, outside


def describe(attrs: Mapping, vendor: str, record: ImageRecord, mask: np.ndarray,
             settings: Mapping) -> dict:
    """Prompt attributes of a prepared image: view, density word, area class, vendor."""
    ratio = float(area_ratio(mask))
    return {
        "view": attrs["view"],
        "density": density_word(record.density, settings["density_words"]) if record.density else None,
        "area_ratio": round(ratio, 4),
        "area": area_class(ratio, tuple(settings["area_thresholds"]), tuple(settings["area_labels"])),
        "vendor": vendor,
    }


def prompt_for(task: str, described: Mapping, settings: Mapping) -> str:
    attrs = dict(described)
    if attrs.get("vendor") == "other":  # an unnamed vendor says nothing useful in a prompt
        attrs["vendor"] = None
    return render_prompt(settings["templates"][task], attrs)


def metadata_line(item_id: str, task: str, record: ImageRecord, attrs: Mapping, described: Mapping,
                  flipped: bool, boxes: list[Box], settings: Mapping) -> dict:
    line = {
        "id": item_id,
        "file_name": f"images/{item_id}.png",
        "source": record.source,
        "prompt": prompt_for(task, described, settings),
        "view": described["view"],
        "laterality": attrs["laterality"],
        "vendor": described["vendor"],
        "density": described["density"],
        "area_ratio": described["area_ratio"],
        "area": described["area"],
        "split": record.split,
        "flipped": bool(flipped),
    }
    if task == "inpaint":
        line["mask"] = f"masks/{item_id}.png"
        line["boxes"] = [box.to_list() for box in boxes]
    return line


def _missing(record: ImageRecord, settings: Mapping) -> dict:
    """A listed image without its file: filtered when its header (from the listing) fails a rule
    anyway, e.g. another vendor's image that was never downloaded; rejected otherwise."""
    header = record.extra.get("header")
    if header:
        attrs = merge_attributes(record, header)
        dropped = filter_reason(attrs, normalise_vendor(attrs["manufacturer"]), settings["filters"])
        if dropped:
            return _drop("filtered", *dropped)
    return _drop("rejected", "missing file", "listed in the metadata but missing on disk")


def link_problem(raw_dir: Path, path: Path, follow_symlinks: bool) -> tuple[str, str] | None:
    """(kind, reason) when the file is a symbolic link that must not or cannot be followed."""
    try:
        real = Path(os.path.realpath(path, strict=True))
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symlink loop", "symbolic link loop: the link leads back to itself and no file is at its end"
        if path.is_symlink():
            return "broken symlink", "symbolic link to a file that does not exist"
        return None  # simply missing: said below
    if not follow_symlinks and not real.is_relative_to(raw_dir):
        return ("symlink outside raw_dir", "symbolic link to a file outside raw_dir, not followed "
                "(dataset.follow_symlinks=true follows such links)")
    return None


def _prepare(record: ImageRecord, raw_dir: Path, out_dir: Path, settings: Mapping, item_id: str,
             shown: str) -> dict:
    path = raw_dir / record.source
    problem = link_problem(raw_dir, path, bool(settings.get("follow_symlinks", False)))
    if problem:
        return _drop("rejected", *problem)
    if path.exists() and not path.is_file():
        return _drop("rejected", "not a regular file", "not a regular file (a folder, pipe or device)")
    if not path.is_file():
        return _missing(record, settings)
    unlocalised = unlocalised_reason(record)
    if unlocalised:
        return _drop("filtered", *unlocalised)
    ds = read_dicom(path, max_pixels=settings.get("max_pixels"), limit_name="preparation.max_pixels")
    if shown != record.source:
        ds.filename = shown  # what any warning about this file will name
    attrs = merge_attributes(record, image_tags(ds))
    vendor = normalise_vendor(attrs["manufacturer"])
    dropped = filter_reason(attrs, vendor, settings["filters"])
    if dropped:
        return _drop("filtered", *dropped)

    try:
        pixels = to_display_uint8(ds)  # the pixels are decoded once, here
        image, geom, mask, disagreed = orient(pixels, attrs["laterality"], settings["size"],
                                              settings["check_orientation"])
    except BlankImage as err:
        return _drop("rejected", "no tissue", str(err))
    boxes, outside = map_boxes(record, geom, item_id)
    extra = {"lesions_outside_crop": outside}
    if disagreed:
        extra["orientation_disagreement"] = {
            "file": record.source, "id": item_id, "laterality": attrs["laterality"],
            "chest_wall_before_correction": "right"}
    if record.boxes and not boxes:
        return _drop("filtered", "lesions outside crop",
                     f"all {len(record.boxes)} lesion box(es) fall outside the crop", **extra)

    task = "inpaint" if boxes else "text2image"
    described = describe(attrs, vendor, record, mask, settings)
    line = metadata_line(item_id, task, record, attrs, described, geom.flip, boxes, settings)
    write_png(out_dir / task / line["file_name"], image)
    if task == "inpaint":
        write_png(out_dir / task / line["mask"], box_mask(boxes, settings["size"]))
    return {"status": "kept", "task": task, "kind": None, "reason": None, "line": line, **extra}


def shown_path(record: ImageRecord, raw_dir: Path, settings: Mapping) -> tuple[str, tuple]:
    """The path the outputs show for this record (a salted hash when it holds the file's own
    patient identity, see data/prepare/identity.py) and that identity."""
    identity = read_identity(raw_dir / record.source) if (raw_dir / record.source).is_file() else (set(), set())
    if reveals_identity(record.source, identity):
        return hidden_path(record.source, settings.get("path_salt", "")), identity
    return record.source, identity


def prepare_item(record: ImageRecord, raw_dir: Path, out_dir: Path, settings: Mapping, item_id: str) -> dict:
    """The outcome of one record; files of a kept image are written before returning.

    ``file`` is the path outputs show for the record; ``scrubbed`` says it replaces one that held
    the patient's identity (every echo of the real path in the outcome is replaced too).
    """
    shown, identity = shown_path(record, raw_dir, settings)
    try:
        outcome = _prepare(record, raw_dir, out_dir, settings, item_id, shown)
    except DicomError as err:
        outcome = _drop("rejected", reject_kind(err.reason), err.reason)
    except Exception as err:  # noqa: BLE001 - a broken file must not stop the whole run
        outcome = _drop("rejected", "processing error", f"{type(err).__name__}: {str(err)[:200]}")
    outcome = {"file": shown, **outcome}
    if shown == record.source:
        return outcome
    outcome = replace_strings(outcome, [(str(raw_dir / record.source), shown), (record.source, shown)])
    if outcome.get("reason"):
        outcome["reason"] = redact(outcome["reason"], identity)
    return {**outcome, "scrubbed": True}


__all__ = ["TASKS", "orient", "prepare_item", "reject_kind"]
