"""VinDr-Mammo as it is downloaded: ``images/<study_id>/<image_id>.dicom`` plus two CSV files.

``breast-level_annotations.csv`` lists every image once (view, laterality, density, split);
``finding_annotations.csv`` has one row per finding, its categories written as a Python list
(``['Mass', 'Suspicious Calcification']``) and its box in original pixel coordinates, or
``['No Finding']`` with empty coordinates. An image is healthy when its only finding is
No Finding; otherwise it carries every box its rows give. The vendor is not in the CSVs: it is
read from the DICOM Manufacturer tag during preparation. A finding row that cannot be parsed
rejects its image (reported with the file and line) and the other images go on.
"""

from __future__ import annotations

import ast
import csv
import math
import re
from collections.abc import Iterator
from pathlib import Path

from mame_lightning.data.records import Box, ImageRecord, Rejection
from mame_lightning.data.prepare.sources import SourceError, require_file

BREAST_LEVEL_CSV = "breast-level_annotations.csv"
FINDING_CSV = "finding_annotations.csv"
NO_FINDING = "no finding"
_DENSITY = re.compile(r"^(?:density\s*)?([abcd])$", re.IGNORECASE)


def parse_categories(text: str, where: str) -> list[str]:
    """``"['Mass', 'Architectural Distortion']"`` -> list; a bare word is a one-item list."""
    text = (text or "").strip()
    if not text:
        return []
    if not text.startswith("["):
        return [text]
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as err:
        raise SourceError(where, f"finding_categories {text!r} is not a list ({err})") from None
    if not isinstance(value, (list, tuple)):
        raise SourceError(where, f"finding_categories {text!r} is not a list")
    return [str(item).strip() for item in value if str(item).strip()]


def parse_density(text: str | None) -> str | None:
    """``"DENSITY C"`` -> ``"C"``; anything else (empty, unknown) -> None."""
    match = _DENSITY.match((text or "").strip())
    return match.group(1).upper() if match else None


def _number(text: str | None) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def parse_box(row: dict, categories: list[str]) -> Box | None:
    """The finding's box, or None when its coordinates are empty or not numbers."""
    coords = [_number(row.get(key)) for key in ("xmin", "ymin", "xmax", "ymax")]
    if any(value is None for value in coords):
        return None
    x0, y0, x1, y1 = coords
    return Box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1), ", ".join(categories))


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        return list(csv.DictReader(handle))


def _check_columns(path: Path, rows: list[dict], needed: set[str]) -> None:
    if rows and not needed <= rows[0].keys():
        missing = ", ".join(sorted(needed - rows[0].keys()))
        raise SourceError(path, f"missing column(s): {missing}")


class VinDrSource:
    """Records for VinDr-Mammo; ``splits`` keeps only some splits (e.g. ``["training"]``)."""

    def __init__(self, images_dir: str = "images", extension: str = ".dicom",
                 splits: list[str] | None = None):
        self.images_dir = images_dir
        self.extension = extension
        self.splits = set(splits) if splits else None

    def records(self, raw_dir: str | Path) -> Iterator[ImageRecord | Rejection]:
        raw_dir = Path(raw_dir)
        breast_path = require_file(raw_dir / BREAST_LEVEL_CSV, "VinDr breast-level annotations")
        finding_path = require_file(raw_dir / FINDING_CSV, "VinDr finding annotations")
        images = read_csv(breast_path)
        findings = read_csv(finding_path)
        _check_columns(breast_path, images, {"study_id", "image_id"})
        _check_columns(finding_path, findings, {"study_id", "image_id", "finding_categories"})

        by_image: dict[str, list[dict]] = {}
        for number, row in enumerate(findings, start=2):
            row["_where"] = f"{FINDING_CSV} line {number}"
            by_image.setdefault(row["image_id"], []).append(row)

        listed = {row["image_id"] for row in images}
        extra_rows = [rows[0] for image_id, rows in by_image.items() if image_id not in listed]
        for row in images + extra_rows:
            if self.splits is not None and (row.get("split") or "").strip() not in self.splits:
                continue
            try:
                yield self._record(row, by_image.get(row["image_id"], []))
            except SourceError as err:
                yield Rejection(FINDING_CSV, err.kind, str(err), row["image_id"])

    def _record(self, row: dict, finding_rows: list[dict]) -> ImageRecord:
        boxes: list[Box] = []
        unlocalised: list[str] = []
        for finding in finding_rows:
            categories = parse_categories(finding.get("finding_categories", ""), finding["_where"])
            lesions = [c for c in categories if c.lower() != NO_FINDING]
            if not lesions:
                continue
            box = parse_box(finding, lesions)
            if box is None:
                unlocalised.append(", ".join(lesions))
            else:
                boxes.append(box)
        extra = {"unlocalised_findings": unlocalised} if unlocalised else {}
        density = row.get("breast_density") or next(
            (f.get("breast_density") for f in finding_rows if f.get("breast_density")), None)
        return ImageRecord(
            source=f"{self.images_dir}/{row['study_id']}/{row['image_id']}{self.extension}",
            image_id=row["image_id"],
            view=(row.get("view_position") or "").strip() or None,
            laterality=(row.get("laterality") or "").strip().upper() or None,
            density=parse_density(density),
            boxes=boxes,
            split=(row.get("split") or "").strip() or None,
            extra=extra,
        )
