"""The synthetic phantom set: written on first use, then read like the real data sets.

The raw set is generated into raw_dir (``vindr/`` in the VinDr-Mammo layout, ``omi/`` in the
OMI-DB layout) and read back through the same adapters real data goes through, so the default
pipeline exercises every code path without restricted data. A ``synthetic.json`` marker holds
the generator settings; a raw folder written with other settings is regenerated, a folder
without the marker is never touched.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

from mame_lightning.data.records import ImageRecord, Rejection
from mame_lightning.data.prepare.sources import CombinedSource, SourceError
from mame_lightning.data.prepare.sources.omi import OmiSource
from mame_lightning.data.prepare.sources.vindr import VinDrSource
from mame_lightning.io import atomic_folder, write_json

log = logging.getLogger(__name__)

MARKER = "synthetic.json"
# Version of the raw layouts written; part of the marker, so a set in an older layout is rewritten.
RAW_LAYOUT = 2


class SyntheticSource:
    """Generate ``n`` phantoms of ``height``×``width`` (seeded) and list them.

    ``options`` go to ``write_synthetic_set`` (e.g. ``lesion_fraction``) and, like the size and
    seed, decide whether an existing raw set can be reused; ``progress`` only shows a bar.
    """

    def __init__(self, n: int = 1024, height: int = 256, width: int = 208, seed: int = 0,
                 options: dict | None = None, progress: bool = True):
        self.settings = {"n": int(n), "height": int(height), "width": int(width),
                         "seed": int(seed), "options": dict(options or {}), "layout": RAW_LAYOUT}
        self.progress = bool(progress)
        self.parts = CombinedSource({"vindr": VinDrSource(), "omi": OmiSource()})

    def records(self, raw_dir: str | Path) -> Iterator[ImageRecord | Rejection]:
        ensure_raw_set(Path(raw_dir), self.settings, self.progress)
        yield from self.parts.records(raw_dir)


def _marker_settings(raw_dir: Path) -> dict | None:
    try:
        return json.loads((raw_dir / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def ensure_raw_set(raw_dir: Path, settings: dict, progress: bool = True) -> bool:
    """Write the raw set unless raw_dir already holds one made with these settings.

    Generation goes to a temporary sibling folder that replaces raw_dir only when complete,
    so an interrupted run never leaves a half-written raw set behind. Returns True when written.
    """
    if _marker_settings(raw_dir) == settings:
        return False
    if raw_dir.exists() and any(raw_dir.iterdir()) and _marker_settings(raw_dir) is None:
        raise SourceError(raw_dir, f"not empty and has no {MARKER}; refusing to overwrite it "
                                   "with a synthetic set (choose another dataset.raw_dir)")
    from mame_lightning.data.synthetic.phantom_set import write_synthetic_set

    log.info("writing synthetic raw set (%d images) to %s", settings["n"], raw_dir)
    # an old synthetic set there is removed once the new one is in place
    with atomic_folder(raw_dir) as staging:
        write_synthetic_set(staging, n=settings["n"], height=settings["height"],
                            width=settings["width"], seed=settings["seed"], progress=progress,
                            **settings["options"])
        write_json(staging / MARKER, settings, sort_keys=True)
    return True
