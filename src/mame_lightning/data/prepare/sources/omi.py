"""OMI-DB as it is downloaded, read the way the ``omidb`` package parses it.

    data/<client>/imagedb_<client>.json   (or IMAGEDB_...) {"Site": ..., "STUDIES": {<study UID>:
                                           {"StudyDate", "EpisodeID", <series UID>: {<image UID>:
                                           {<mark id>: {"MarkID", "X1", "Y1", "X2", "Y2", "Mass", ...}}}}}}
    data/<client>/nbss_<client>.json      (or NBSS_...) per episode its events and LESION entries per side
    data/<client>/<study>/<image>.json    (or <image>.dcm.json) the image's DICOM header (DICOM JSON model)
    images/<client>/<study>/<image>.dcm

Client folders start with ``demd`` or ``optm``. Boxes are the marks' X1..Y2 in original pixels and
their category comes from the mark's flags (Mass, SuspiciousCalcifications, ...). Laterality, view,
manufacturer, implant and protocol are DICOM header attributes: preparation reads them from the
``.dcm``; for an image whose ``.dcm`` is not there yet they come from its JSON header, so an image
the filters would drop anyway is counted as filtered rather than missing.

An image with marks goes to the inpainting set. An unmarked image is healthy when its client has no
lesion in NBSS (``healthy: no_nbss_lesion``, the default), or always (``healthy: unmarked``); an
unmarked image of a client with lesions may show an unmarked lesion, so it goes to neither set and
is counted in the report. A client folder or JSON that cannot be read (missing, not JSON, wrong
shape) and an image with a mark that has no coordinates are rejections; the rest goes on.

The ``omidb`` package itself is the judge of this layout in the tests. It is not used here because
it skips a client it cannot parse, and a mark without coordinates, with a log line only, and drops
studies it cannot link to an NBSS episode: preparation must report each of those instead.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

from mame_lightning.data.records import Box, ImageRecord, Rejection
from mame_lightning.data.prepare.sources import MALFORMED, SourceError, read_json, relative_to

log = logging.getLogger(__name__)

CLIENT_PREFIXES = ("demd", "optm")
UID = re.compile(r"^[\d.]+$")
# Mark flags (the names omidb reads) -> the category words boxes carry, in this order.
MARK_FLAGS = (
    ("Mass", "Mass"),
    ("SuspiciousCalcifications", "Suspicious Calcification"),
    ("ArchitecturalDistortion", "Architectural Distortion"),
    ("FocalAsymmetry", "Focal Asymmetry"),
    ("WithCalcification", "Calcification"),
    ("Dystrophic", "Dystrophic Calcification"),
    ("FatNecrosis", "Fat Necrosis"),
    ("MilkOfCalcium", "Milk of Calcium"),
    ("OtherBenignCluster", "Other Benign Cluster"),
    ("PlasmaCellMastitis", "Plasma Cell Mastitis"),
    ("Skin", "Benign Skin Feature"),
    ("SutureCalcification", "Suture Calcification"),
    ("Vascular", "Vascular Feature"),
)
HEALTHY_RULES = ("no_nbss_lesion", "unmarked")
NOT_HEALTHY_KIND = "unmarked image, client has lesions"
_FALSE = {"", "0", "n", "no", "false", "none", "null"}


def client_file(folder: Path, stem: str) -> Path:
    """``<stem>_<client>.json``, lower case as documented, else the upper-case spelling."""
    lower = folder / f"{stem}_{folder.name}.json"
    upper = folder / f"{stem.upper()}_{folder.name}.json"
    return upper if not lower.is_file() and upper.is_file() else lower


def header_file(data_dir: Path, client: str, study: str, image: str) -> Path | None:
    """The image's JSON header, ``<image>.json`` or (another spelling in the release) ``<image>.dcm.json``."""
    for name in (f"{image}.json", f"{image}.dcm.json"):
        path = data_dir / client / study / name
        if path.is_file():
            return path
    return None


def _flag(value) -> bool:
    """Mark flags arrive as 1/0, the flag's own name, or empty."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, (int, float)):
        return value != 0
    return str(value).strip().lower() not in _FALSE


def mark_category(mark: Mapping) -> str:
    """The mark's set flags as words (``"Mass, Suspicious Calcification"``); ``lesion`` when none is set."""
    words = [word for key, word in MARK_FLAGS if _flag(mark.get(key))]
    return ", ".join(words) or "lesion"


def parse_mark(mark) -> Box:
    """An OMI-DB mark -> Box in original pixels (corners in any order); ValueError when unusable."""
    if not isinstance(mark, Mapping):
        raise ValueError(f"{mark!r} is not an object")
    try:
        x1, y1, x2, y2 = (float(mark[key]) for key in ("X1", "Y1", "X2", "Y2"))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"no numeric X1, Y1, X2, Y2 ({type(err).__name__}: {err})") from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError("non-finite coordinates")
    return Box(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2), mark_category(mark))


def nbss_lesions(nbss, where: str) -> list[str]:
    """``<episode>/<side>/<lesion id>`` of every LESION entry in a client's NBSS record."""
    if not isinstance(nbss, Mapping):
        raise SourceError(where, "NBSS record is not an object of episodes")
    found = []
    for episode_id, episode in nbss.items():
        lesions = episode.get("LESION") if isinstance(episode, Mapping) else None
        if lesions is None:
            continue
        if not isinstance(lesions, Mapping):
            raise SourceError(where, f"episode {episode_id}: LESION is not an object of sides")
        for side in ("L", "R"):
            entries = lesions.get(side) or {}
            if not isinstance(entries, Mapping):
                raise SourceError(where, f"episode {episode_id}: LESION {side} is not an object of lesions")
            found += [f"{episode_id}/{side}/{lesion_id}" for lesion_id in entries]
    return found


def image_entries(imagedb, where: str) -> Iterator[tuple[str, str, object]]:
    """(study UID, image UID, marks) for every image of a client's IMAGEDB record.

    Series and images are the keys that look like UIDs (as omidb reads them); other study keys
    (StudyDate, EpisodeID) are study attributes.
    """
    if not isinstance(imagedb, Mapping) or not isinstance(imagedb.get("STUDIES"), Mapping):
        raise SourceError(where, "IMAGEDB record has no STUDIES object")
    for study_uid, study in sorted(imagedb["STUDIES"].items()):
        if not isinstance(study, Mapping):
            raise SourceError(where, f"study {study_uid} is not an object")
        for series_uid, series in sorted(study.items()):
            if not (isinstance(series, Mapping) and UID.match(str(series_uid))):
                continue
            for image_uid, marks in sorted(series.items()):
                if UID.match(str(image_uid)):
                    yield str(study_uid), str(image_uid), marks


class OmiSource:
    """Records for the OMI-DB clients under ``raw_dir/<data_dir>``, images under ``raw_dir/<images_dir>``."""

    def __init__(self, data_dir: str = "data", images_dir: str = "images", healthy: str = "no_nbss_lesion"):
        if healthy not in HEALTHY_RULES:
            raise ValueError(f"healthy={healthy!r}: choose one of {', '.join(HEALTHY_RULES)}")
        self.data_dir = data_dir
        self.images_dir = images_dir
        self.healthy = healthy

    def records(self, raw_dir: str | Path) -> Iterator[ImageRecord | Rejection]:
        raw_dir = Path(raw_dir)
        data_dir = raw_dir / self.data_dir
        if not data_dir.is_dir():
            raise SourceError(data_dir, "OMI-DB data folder (data/<client>/imagedb_<client>.json) not found")
        clients = sorted(p for p in data_dir.iterdir() if p.is_dir() and p.name.startswith(CLIENT_PREFIXES))
        if not clients:
            log.warning("%s holds no client folder (demd*/optm*)", data_dir)
        for folder in clients:
            try:
                yield from self._client(folder, raw_dir)
            except SourceError as err:
                yield err.rejection(raw_dir)

    def _client(self, folder: Path, raw_dir: Path) -> Iterator[ImageRecord | Rejection]:
        client = folder.name
        imagedb_path = client_file(folder, "imagedb")
        images = list(image_entries(read_json(imagedb_path, "IMAGEDB record"), str(imagedb_path)))
        lesions: list[str] = []
        if self.healthy == "no_nbss_lesion":
            nbss_path = client_file(folder, "nbss")
            lesions = nbss_lesions(read_json(nbss_path, "NBSS record"), str(nbss_path))
        where = relative_to(imagedb_path, raw_dir)
        for study, image, marks in images:
            try:
                yield self._record(raw_dir, client, study, image, marks, where, lesions)
            except SourceError as err:
                yield err.rejection(raw_dir, image)

    def _record(self, raw_dir: Path, client: str, study: str, image: str, marks, where: str,
                lesions: list[str]) -> ImageRecord:
        if marks is None:
            marks = {}
        if not isinstance(marks, Mapping):
            raise SourceError(raw_dir / where, f"image {image}: marks are not an object")
        boxes = []
        for mark_id, mark in sorted(marks.items()):
            try:
                boxes.append(parse_mark(mark))
            except ValueError as err:
                raise SourceError(raw_dir / where, f"image {image}, mark {mark_id}: {err}") from None
        source = f"{self.images_dir}/{client}/{study}/{image}.dcm"
        extra: dict = {"client": client}
        if not boxes and lesions:
            extra["unlocalised_findings"] = [f"client {client} has {len(lesions)} lesion(s) in NBSS"]
            extra["unlocalised_kind"] = NOT_HEALTHY_KIND
        if not (raw_dir / source).is_file():
            header = header_file(raw_dir / self.data_dir, client, study, image)
            if header is not None:
                extra["header"] = header_attributes(read_json(header, "image header"), header)
        return ImageRecord(source=source, image_id=image, boxes=boxes, extra=extra)


def header_attributes(header, path: Path) -> dict:
    """The filter attributes of a DICOM header in the DICOM JSON model (as preparation reads a .dcm)."""
    import pydicom

    from mame_lightning.data.prepare.filters import image_tags

    if not isinstance(header, Mapping):
        raise SourceError(path, "image header is not a DICOM JSON object", MALFORMED)
    try:
        ds = pydicom.Dataset.from_json(dict(header))
    except Exception as err:  # noqa: BLE001 - any parser failure is a bad header file
        raise SourceError(path, f"image header is not DICOM JSON ({type(err).__name__}: {err})") from None
    tags = image_tags(ds)
    keys = ("view", "laterality", "manufacturer", "modality", "presentation_intent", "implant",
            "view_modifiers", "special_protocol")
    return {key: tags.get(key) for key in keys}


__all__ = ["CLIENT_PREFIXES", "HEALTHY_RULES", "MARK_FLAGS", "NOT_HEALTHY_KIND", "OmiSource", "client_file",
           "header_attributes", "header_file", "image_entries", "mark_category", "nbss_lesions", "parse_mark"]
