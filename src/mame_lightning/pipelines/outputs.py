"""Write a run's images into its output folder with an index and per-image timings.

`images.csv` lists every file with the parameters that reproduce it and the seconds it took;
`timings.json` summarises the speed (seconds per image), the figure sampling costs are quoted in.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from mame_lightning.io import write_text
from mame_lightning.pipelines.generation import Generated
from mame_lightning.pipelines.marking import save_dicom, save_png

INDEX_FILE = "images.csv"
TIMINGS_FILE = "timings.json"
INDEX_COLUMNS = ["file", "prompt", "seed", "guidance", "steps", "seconds", "negative_prompt", "scheduler", "task",
                 "model", "dicom_file"]


def csv_text(rows: Iterable[Mapping], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in columns})
    return buffer.getvalue()


def image_name(result: Generated, prefix: str = "") -> str:
    return f"{prefix}{result.index:04d}_seed{result.seed}"


def save_result(result: Generated, out: Path, *, dicom: bool = False, view: str | None = None,
                name: str | None = None, extra: Mapping | None = None) -> dict:
    """Save one image (PNG, and DICOM when asked) and return its index row."""
    name = name or image_name(result)
    params = {**result.params, **(extra or {})}
    png = save_png(result.image, out / f"{name}.png", params)
    row = {**params, "file": png.name, "seconds": round(result.seconds, 4)}
    if dicom:
        row["dicom_file"] = save_dicom(result.image, out / f"{name}.dcm", params, view=view).name
    return row


def write_index(out: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    return write_text(out / INDEX_FILE, csv_text(rows, columns or INDEX_COLUMNS))


def write_timings(out: Path, rows: list[dict], device: str = "") -> dict:
    """Seconds per image, each and on average, as `timings.json`."""
    seconds = [float(r["seconds"]) for r in rows]
    summary = {
        "n": len(seconds),
        "device": device,
        "total_seconds": round(sum(seconds), 4),
        "seconds_per_image": round(sum(seconds) / len(seconds), 4) if seconds else None,
        "images": [{"file": r["file"], "seconds": r["seconds"]} for r in rows],
    }
    write_text(out / TIMINGS_FILE, json.dumps(summary, indent=2))
    return summary


def save_results(results: list[Generated], out: str | os.PathLike, *, dicom: bool = False, view: str | None = None,
                 device: str = "") -> list[dict]:
    """Every image of a text-to-image or inpainting run, then the index and timings."""
    out = Path(out)
    rows = [save_result(r, out, dicom=dicom, view=view) for r in results]
    write_index(out, rows)
    write_timings(out, rows, device)
    return rows


__all__ = ["INDEX_FILE", "TIMINGS_FILE", "INDEX_COLUMNS", "save_result", "save_results", "write_index",
           "write_timings", "csv_text", "image_name"]
