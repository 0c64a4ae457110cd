"""Metadata sources: each turns a raw data set folder into a stream of ImageRecords.

A source only reads listings and annotations (CSV, JSON, directory walks); it never decodes
pixels, so listing twenty thousand images takes seconds and preparation can skip finished items
without opening their DICOMs. Sources are built by ``hydra.utils.instantiate`` from the
``source:`` block of a dataset config and share one method, ``records(raw_dir)``.

A broken annotation entry (an unreadable client JSON, a malformed CSV row) is yielded as a
``Rejection``: preparation lists it in the report's ``rejected`` entries and goes on with the
rest. Only a source that has nothing to read at all (its folder or main listing missing) raises.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

from mame_lightning.data.records import ImageRecord, Rejection

log = logging.getLogger(__name__)

UNREADABLE = "unreadable metadata"
MALFORMED = "malformed metadata"


class SourceError(Exception):
    """A listing or annotation file is missing or malformed; names the file and the problem.

    ``kind`` is the short word the report counts it under when it becomes a rejection.
    """

    def __init__(self, path: str | Path, reason: str, kind: str = MALFORMED):
        self.path = str(path)
        self.reason = reason
        self.kind = kind
        super().__init__(f"{self.path}: {reason}")

    def rejection(self, raw_dir: str | Path, image_id: str = "") -> Rejection:
        """This error as a report entry, its file relative to raw_dir."""
        return Rejection(relative_to(self.path, raw_dir), self.kind, self.reason, image_id)


@runtime_checkable
class Source(Protocol):
    def records(self, raw_dir: str | Path) -> Iterator[ImageRecord | Rejection]: ...


def relative_to(path: str | Path, raw_dir: str | Path) -> str:
    """``path`` relative to raw_dir when it lies inside it (POSIX form), else as given."""
    try:
        return Path(path).relative_to(raw_dir).as_posix()
    except ValueError:
        return Path(path).as_posix()


def require_file(path: Path, what: str) -> Path:
    """Fail early, naming the file, when an annotation file a source needs is absent."""
    if not path.is_file():
        raise SourceError(path, f"{what} not found", UNREADABLE)
    return path


def read_json(path: Path, what: str):
    """The parsed JSON of an annotation file; a missing, unreadable or invalid one is a SourceError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SourceError(path, f"{what} not found", UNREADABLE) from None
    except (OSError, UnicodeDecodeError) as err:
        raise SourceError(path, f"{what} unreadable ({type(err).__name__}: {err})", UNREADABLE) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise SourceError(path, f"{what} is not valid JSON ({err})", UNREADABLE) from None


def parse_flag(value) -> bool | None:
    """Yes/no fields arrive as bools, 'YES'/'NO', 0/1 or a protocol name; None stays unknown."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return bool(value)
    text = str(value).strip().lower()
    if text in {"", "no", "n", "false", "f", "0", "none", "null"}:
        return False
    return True  # "yes", "true", "1" or the name of a protocol/implant type


def with_prefix(item: ImageRecord | Rejection, prefix: str) -> ImageRecord | Rejection:
    """The same record or rejection, its path seen from a parent folder (raw_dir/prefix/...)."""
    if isinstance(item, Rejection):
        return dataclasses.replace(item, file=f"{prefix}/{item.file}")
    return dataclasses.replace(item, source=f"{prefix}/{item.source}")


class CombinedSource:
    """Several sources, each reading its own subfolder of raw_dir (e.g. ``omi/`` and ``vindr/``).

    Record paths are prefixed with the subfolder name, so they stay relative to the combined
    raw_dir and the first path component tells which part an image came from (the per-part
    vendor filter relies on it). A part that cannot be read at all becomes one rejection and the
    other parts go on; only when every part fails is it an error.
    """

    def __init__(self, parts: Mapping[str, Source]):
        if not parts:
            raise ValueError("CombinedSource needs at least one part")
        self.parts = dict(parts)

    def records(self, raw_dir: str | Path) -> Iterator[ImageRecord | Rejection]:
        raw_dir = Path(raw_dir)
        failures: list[SourceError] = []
        for name, part in self.parts.items():
            try:
                for item in part.records(raw_dir / name):
                    yield with_prefix(item, name)
            except SourceError as err:
                log.warning("%s part skipped: %s", name, err)
                failures.append(err)
                yield err.rejection(raw_dir)
        if len(failures) == len(self.parts):
            raise SourceError(raw_dir, "no part could be read: " + "; ".join(str(f) for f in failures),
                              failures[0].kind)


__all__ = ["CombinedSource", "MALFORMED", "Rejection", "Source", "SourceError", "UNREADABLE", "parse_flag",
           "read_json", "relative_to", "require_file", "with_prefix"]
