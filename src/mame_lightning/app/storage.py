"""Where the app keeps request files, and the rule that it deletes and serves only its own.

`app.output_dir` may be a folder full of other things (`~/results`, even `~`). The app therefore
works inside a subfolder of its own (`<output_dir>/mame_app/`, marked by a file it writes), makes
one folder per request there with a name pattern and a marker file of its own, and prunes only
folders that carry both. Only that subfolder is handed to the web server, so nothing else under
`app.output_dir` can be downloaded.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from mame_lightning.io import write_text

APP_FOLDER = "mame_app"
ROOT_MARKER = ".mame_app_outputs"
REQUEST_MARKER = ".mame_request"
REQUEST_NAME = re.compile(r"^[a-z]+-\d{8}-\d{6}-[0-9a-f]{8}$")
MARKER_TEXT = "written by mame_lightning.app: this folder and the request folders in it may be deleted by the app\n"


def app_root(output_dir: str | Path | None) -> tuple[Path, bool]:
    """The app's own folder and whether it is temporary (removed when the app stops).

    A `mame_app/` subfolder that exists without our marker belongs to someone else: refused.
    """
    if not output_dir:
        root = Path(tempfile.mkdtemp(prefix="mame_app_")).resolve()
        write_text(root / ROOT_MARKER, MARKER_TEXT)
        return root, True
    root = Path(str(output_dir)).expanduser().resolve() / APP_FOLDER
    if root.is_symlink() or (root.exists() and not (root / ROOT_MARKER).is_file()):
        raise ValueError(f"app.output_dir: {root} exists and was not made by this app; the app keeps its files in "
                         f"a {APP_FOLDER}/ folder of its own, so choose another app.output_dir or remove {root}")
    root.mkdir(parents=True, exist_ok=True)
    write_text(root / ROOT_MARKER, MARKER_TEXT)
    return root, False


def new_request_dir(root: Path, kind: str) -> Path:
    """A fresh, marked folder for one request's files."""
    folder = root / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    write_text(folder / REQUEST_MARKER, MARKER_TEXT)
    return folder


def is_request_dir(path: Path) -> bool:
    """A folder the app made for a request: our name pattern and our marker, not a link."""
    return (REQUEST_NAME.match(path.name) is not None and not path.is_symlink() and path.is_dir()
            and (path / REQUEST_MARKER).is_file())


def prune(root: Path, max_age_s: float) -> list[Path]:
    """Delete the app's request folders older than `max_age_s`; nothing else is touched."""
    if max_age_s <= 0 or not (root / ROOT_MARKER).is_file():
        return []
    cutoff = time.time() - max_age_s
    removed = []
    for folder in root.iterdir():
        if is_request_dir(folder) and folder.stat().st_mtime < cutoff:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


__all__ = ["APP_FOLDER", "ROOT_MARKER", "REQUEST_MARKER", "app_root", "new_request_dir", "is_request_dir", "prune"]
