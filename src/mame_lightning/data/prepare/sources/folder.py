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
from mame_lightning.data.prepare.sources import SourceError

log = logging.getLogger(__name__)

PREAMBLE_LENGTH = 128
MAGIC = b"DICM"
DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic")


def has_dicom_marker(path: str | Path) -> bool:
    """True when the file holds ``DICM`` right after its 128-byte preamble.

    Only regular files are opened: opening a FIFO would wait forever for a writer.
    """
    if not os.path.isfile(path):
        return False
    try:
        with open(path, "rb") as handle:
            head = handle.read(PREAMBLE_LENGTH + len(MAGIC))
    except OSError:
        return False
    return head[PREAMBLE_LENGTH:] == MAGIC


def path_id(relative_path: str, salt: str) -> str:
    """A stable id that does not reveal the path it came from.

    File names that are not valid UTF-8 arrive with surrogate escapes; they hash by their bytes.
    """
    return hashlib.sha256(f"{salt}\0{relative_path}".encode("utf-8", "surrogateescape")).hexdigest()[:24]


def walk_files(root: Path, follow_symlinks: bool = False) -> Iterator[Path]:
    """Every file under root in a stable (sorted) order, hidden names skipped.

    Symlinked folders are entered only with `follow_symlinks`, and then each real folder once, so
    a link loop ends the descent instead of recursing; unreadable folders are logged and skipped.
    """
    seen: set[tuple[int, int]] = set()

    def unreadable(error: OSError) -> None:
        log.warning("folder source: cannot list a folder below %s (%s)", root, error.strerror or error)

    for folder, dirs, files in os.walk(root, onerror=unreadable, followlinks=follow_symlinks):
        if follow_symlinks:
            try:
                stat = os.stat(folder)
            except OSError:
                dirs[:] = []
                continue
            if (stat.st_dev, stat.st_ino) in seen:
                log.warning("folder source: a symlink loop leads back into a folder already listed; not entered again")
                dirs[:] = []
                continue
            seen.add((stat.st_dev, stat.st_ino))
        linked = [d for d in dirs if os.path.islink(os.path.join(folder, d))]
        if linked and not follow_symlinks:
            log.info("folder source: %d symlinked folder(s) not entered (dataset.follow_symlinks=true enters them)",
                     len(linked))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(folder) / name


def is_dead_link(path: Path) -> bool:
    """A symbolic link whose target cannot be reached (a loop or a missing file)."""
    return path.is_symlink() and not os.path.exists(path)


class FolderSource:
    """Records for every DICOM file below raw_dir."""

    def __init__(self, id_salt: str = "mame-folder", extensions: list[str] | None = None,
                 follow_symlinks: bool = False):
        self.id_salt = id_salt
        self.extensions = tuple(e.lower() for e in (extensions or DICOM_EXTENSIONS))
        self.follow_symlinks = bool(follow_symlinks)

    def records(self, raw_dir: str | Path) -> Iterator[ImageRecord]:
        raw_dir = Path(raw_dir)
        if not raw_dir.is_dir():
            raise SourceError(raw_dir, "DICOM folder not found")
        skipped = 0
        for path in walk_files(raw_dir, self.follow_symlinks):
            # a link that leads nowhere (loop, dangling) is listed so the report says what it is
            if path.suffix.lower() in self.extensions or has_dicom_marker(path) or is_dead_link(path):
                relative = path.relative_to(raw_dir).as_posix()
                yield ImageRecord(source=relative, image_id=path_id(relative, self.id_salt))
            else:
                skipped += 1
        if skipped:
            log.info("folder source: %d file(s) without a DICOM marker or extension skipped", skipped)
