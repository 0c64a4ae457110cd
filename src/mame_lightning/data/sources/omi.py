"""OMI-DB: one JSON client record per client, ``data/<ClientID>/<ClientID>.json``.

A client record lists studies, each study its images by SOP instance UID, with the view,
laterality, manufacturer, implant and special-protocol flags, the expert marks
(``X1, Y1, X2, Y2, LesionType`` in original pixels) and the image file. Images without marks are
healthy when the client's status is one of ``healthy_statuses`` (all statuses when it is None);
an unmarked image of a client with another status may hold an unmarked lesion, so it is flagged
and kept out of both tasks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

from mame_lightning.data.records import Box, ImageRecord
from mame_lightning.data.sources import SourceError, parse_flag


def parse_mark(mark: dict, where: str) -> Box:
    """An OMI mark -> Box in original pixels (corners in any order)."""
    try:
        x1, y1, x2, y2 = (float(mark[key]) for key in ("X1", "Y1", "X2", "Y2"))
    except (KeyError, TypeError, ValueError) as err:
        raise SourceError(where, f"mark {mark!r} lacks numeric X1, Y1, X2, Y2 ({err})") from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise SourceError(where, f"mark {mark!r} has non-finite coordinates")
    category = str(mark.get("LesionType") or "lesion")
    return Box(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2), category)


def _text(value) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text or None


class OmiSource:
    """Records for OMI-DB client records found under ``raw_dir/<data_dir>``."""

    def __init__(self, data_dir: str = "data", images_dir: str = "images",
                 healthy_statuses: list[str] | None = None):
        self.data_dir = data_dir
        self.images_dir = images_dir
        self.healthy_statuses = {s.upper() for s in healthy_statuses} if healthy_statuses else None

    def records(self, raw_dir: str | Path) -> Iterator[ImageRecord]:
        raw_dir = Path(raw_dir)
        data_dir = raw_dir / self.data_dir
        if not data_dir.is_dir():
            raise SourceError(data_dir, "OMI-DB client records folder not found")
        for path in sorted(data_dir.rglob("*.json")):
            yield from self._client_records(path, raw_dir)

    def _client_records(self, path: Path, raw_dir: Path) -> Iterator[ImageRecord]:
        try:
            client = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SourceError(path, f"unreadable client record ({err})") from None
        if not isinstance(client, dict) or not isinstance(client.get("Studies"), dict):
            raise SourceError(path, "client record has no 'Studies' mapping")
        client_id = _text(client.get("ClientID")) or path.stem
        status = (_text(client.get("Status")) or "").upper()
        where = str(path.relative_to(raw_dir))
        for study_uid, study in sorted(client["Studies"].items()):
            images = (study or {}).get("Images") or {}
            for sop_uid, image in sorted(images.items()):
                yield self._record(client_id, status, study_uid, sop_uid, image or {}, where)

    def _record(self, client_id: str, status: str, study_uid: str, sop_uid: str,
                image: dict, where: str) -> ImageRecord:
        boxes = [parse_mark(mark, f"{where} image {sop_uid}") for mark in image.get("Marks") or []]
        healthy_client = self.healthy_statuses is None or status in self.healthy_statuses
        extra = {"status": status} if status else {}
        if not boxes and not healthy_client:
            extra["unlocalised_findings"] = [f"unmarked image of a client with status {status}"]
        source = _text(image.get("File")) or f"{self.images_dir}/{client_id}/{study_uid}/{sop_uid}.dcm"
        return ImageRecord(
            source=Path(source).as_posix(),
            image_id=sop_uid,
            view=_text(image.get("ViewPosition")),
            laterality=(_text(image.get("ImageLaterality")) or "").upper() or None,
            manufacturer=_text(image.get("Manufacturer")),
            boxes=boxes,
            implant=parse_flag(image.get("BreastImplantPresent")),
            special_protocol=parse_flag(image.get("SpecialProtocol")),
            extra=extra,
        )
