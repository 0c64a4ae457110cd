"""Any folder of DICOM files: every attribute comes from the tags during preparation.

Files are found by the ``DICM`` marker after the 128-byte preamble, whatever their extension
(clinical exports often have none). Files with a DICOM-like extension are listed even without
the marker, so a damaged or mislabelled one shows up in the report as rejected instead of
vanishing. Ids are a salted hash of the relative path: folder names often carry patient names
or numbers, and an id must never reveal them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from mame_lightning.data.records import ImageRecord
from mame_lightning.data.sources import SourceError

log = logging.getLogger(__name__)

PREAMBLE_LENGTH = 128
MAGIC = b"DICM"
DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic")


def has_dicom_marker(path: str | Path) -> bool:
    """True when the file holds ``DICM`` right after its 128-byte preamble."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(PREAMBLE_LENGTH + len(MAGIC))
    except OSError:
        return False
    return head[PREAMBLE_LENGTH:] == MAGIC


def path_id(relative_path: str, salt: str) -> str:
    """A stable id that does not reveal the path it came from."""
    return hashlib.sha256(f"{salt}\0{relative_path}".encode()).hexdigest()[:24]


def walk_files(root: Path) -> Iterator[Path]:
    """Every regular file under root in a stable (sorted) order, hidden names skipped."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(folder) / name


class FolderSource:
    """Records for every DICOM file below raw_dir."""

    def __init__(self, id_salt: str = "mame-folder", extensions: list[str] | None = None):
        self.id_salt = id_salt
        self.extensions = tuple(e.lower() for e in (extensions or DICOM_EXTENSIONS))

    def records(self, raw_dir: str | Path) -> Iterator[ImageRecord]:
        raw_dir = Path(raw_dir)
        if not raw_dir.is_dir():
            raise SourceError(raw_dir, "DICOM folder not found")
        skipped = 0
        for path in walk_files(raw_dir):
            if path.suffix.lower() in self.extensions or has_dicom_marker(path):
                relative = path.relative_to(raw_dir).as_posix()
                yield ImageRecord(source=relative, image_id=path_id(relative, self.id_salt))
            else:
                skipped += 1
        if skipped:
            log.info("folder source: %d file(s) without a DICOM marker or extension skipped", skipped)
