"""Durable writes: a file or a folder appears complete or not at all.

Every writer here puts its content under a temporary name in the target's own folder
(`.<name>.<random>.tmp`, so the rename never crosses a file system and a killed run's leftovers
are recognisable), flushes it to disk, then renames it over the target. On any failure the
temporary is removed and the target keeps what it held before. Nothing else in the package
renames a temporary into place: code that needs another writer (pydicom, safetensors, a YAML
dump) writes into `atomic_path` or `atomic_folder` and this module does the rest.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".tmp"


def _file_mode() -> int:
    """The permissions a plain open() would give (mkstemp creates owner-only files)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def _temp_name(target: Path) -> tuple[int, Path]:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    return fd, Path(name)


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """A temporary path beside `path` for any writer; renamed onto `path` when the block ends without error."""
    path = Path(path)
    fd, tmp = _temp_name(path)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> Path:
    """Write `data` to `path` durably (temporary in the same folder, fsync, rename)."""
    path = Path(path)
    fd, tmp = _temp_name(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8", fsync: bool = True) -> Path:
    """Text as written (no newline translation), durably."""
    return write_bytes(path, text.encode(encoding), fsync=fsync)


def json_default(value: Any) -> Any:
    """numpy scalars and arrays, paths, and anything else as its text: the values results hold."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = False,
               fsync: bool = True) -> Path:
    """`obj` as JSON (numpy values and paths converted), ending in a newline."""
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=json_default) + "\n",
                      fsync=fsync)


def png_bytes(image, text: Mapping[str, str] | None = None, compress_level: int = 6) -> bytes:
    """A PNG of a PIL image or a uint8 array (grey HxW or RGB HxWx3); `text` as UTF-8 iTXt chunks.

    PIL writes no timestamps, so equal pixels, text and `compress_level` (zlib 0-9) give equal bytes.
    """
    import numpy as np
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    info = None
    if text:
        info = PngInfo()
        for key, value in text.items():
            info.add_itxt(str(key), str(value))
    buffer = BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=compress_level)
    return buffer.getvalue()


def write_png(path: str | os.PathLike, image, *, text: Mapping[str, str] | None = None, fsync: bool = True,
              compress_level: int = 6) -> Path:
    """A PNG (see `png_bytes`), durably."""
    return write_bytes(path, png_bytes(image, text, compress_level), fsync=fsync)


def append_line(path: str | os.PathLike, line: str, *, fsync: bool = True) -> Path:
    """`path` with one more line: the old lines plus the new one replace the file at once."""
    path = Path(path)
    old = path.read_bytes() if path.is_file() else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    return write_bytes(path, old + line.rstrip("\n").encode("utf-8") + b"\n", fsync=fsync)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


def replace_folder(new: str | os.PathLike, folder: str | os.PathLike, *, keep_existing: bool = False) -> Path:
    """Put the finished folder `new` at `folder`.

    An existing `folder` is moved aside first and removed after the swap, unless `keep_existing`:
    then one that appeared meanwhile (another process built the same thing) is kept and `new` is
    removed. `new` must sit in the same parent folder as `folder`.
    """
    new, folder = Path(new), Path(folder)
    if keep_existing:
        try:
            os.replace(new, folder)
        except OSError:
            if not folder.is_dir():
                raise
            shutil.rmtree(new, ignore_errors=True)
        _fsync(folder.parent)
        return folder
    old = None
    if folder.exists():
        old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-", suffix=TEMP_SUFFIX))
        os.replace(folder, old / folder.name)
    try:
        os.replace(new, folder)
    except BaseException:
        if old is not None:  # put the previous folder back
            os.replace(old / folder.name, folder)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    _fsync(folder.parent)
    return folder


@contextmanager
def atomic_folder(folder: str | os.PathLike, *, keep_existing: bool = False, fsync: bool = True) -> Iterator[Path]:
    """A temporary folder beside `folder` to fill; it replaces `folder` when the block ends without error
    (see `replace_folder` for `keep_existing`), and is removed on any failure."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=TEMP_SUFFIX))
    try:
        yield tmp
        if fsync:
            _fsync_tree(tmp)
        replace_folder(tmp, folder, keep_existing=keep_existing)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def move(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Rename a finished file into a folder that is still being assembled (same file system)."""
    os.replace(source, target)
    return Path(target)


__all__ = ["FILE_MODE", "TEMP_SUFFIX", "append_line", "atomic_folder", "atomic_path", "json_default", "move",
           "png_bytes", "replace_folder", "write_bytes", "write_json", "write_png", "write_text"]
