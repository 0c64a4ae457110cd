"""Metadata sources: each turns a raw data set folder into a stream of ImageRecords.

A source only reads listings and annotations (CSV, JSON, directory walks); it never decodes
pixels, so listing twenty thousand images takes seconds and preparation can skip finished items
without opening their DICOMs. Sources are built by ``hydra.utils.instantiate`` from the
``source:`` block of a dataset config and share one method, ``records(raw_dir)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

from mame_lightning.data.records import ImageRecord


class SourceError(Exception):
    """A listing or annotation file is missing or malformed; names the file and the problem."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@runtime_checkable
class Source(Protocol):
    def records(self, raw_dir: str | Path) -> Iterator[ImageRecord]: ...


def require_file(path: Path, what: str) -> Path:
    """Fail early, naming the file, when an annotation file a source needs is absent."""
    if not path.is_file():
        raise SourceError(path, f"{what} not found")
    return path


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


def with_prefix(record: ImageRecord, prefix: str) -> ImageRecord:
    """The same record, its source path seen from a parent folder (raw_dir/prefix/...)."""
    return dataclasses.replace(record, source=f"{prefix}/{record.source}")


class CombinedSource:
    """Several sources, each reading its own subfolder of raw_dir (e.g. ``omi/`` and ``vindr/``).

    Record paths are prefixed with the subfolder name, so they stay relative to the combined
    raw_dir and the first path component tells which part an image came from (the per-part
    vendor filter relies on it).
    """

    def __init__(self, parts: Mapping[str, Source]):
        if not parts:
            raise ValueError("CombinedSource needs at least one part")
        self.parts = dict(parts)

    def records(self, raw_dir: str | Path) -> Iterator[ImageRecord]:
        raw_dir = Path(raw_dir)
        for name, part in self.parts.items():
            for record in part.records(raw_dir / name):
                yield with_prefix(record, name)


__all__ = ["CombinedSource", "Source", "SourceError", "parse_flag", "require_file", "with_prefix"]
