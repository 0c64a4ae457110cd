"""The prepared set on disk: the files assembled at the end of a run.

Every file goes through `mame_lightning.io`, so a run killed at any moment leaves either the old
file or the new one, never half of one. From the per-item outcomes this module assembles
``<task>/metadata.jsonl`` (sorted by id), ``report.json`` (what was kept, filtered, rejected and
why) and ``attributes.json`` (the prompt attributes present, which training records in the
exported model).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from mame_lightning import io as durable

TASKS = ("text2image", "inpaint")
ATTRIBUTE_FIELDS = {"views": "view", "densities": "density", "areas": "area", "vendors": "vendor"}


def printable(value):
    """Strings as valid Unicode: a file name that is not UTF-8 keeps its odd bytes as `\\xNN` text.

    Such names reach Python with surrogate escapes, which strict JSON readers refuse.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if isinstance(value, Mapping):
        return {printable(k): printable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [printable(v) for v in value]
    return value


def write_json(path: str | Path, obj) -> None:
    durable.write_json(path, printable(obj), sort_keys=True)


# zlib level of prepared PNGs: 3 writes a 512 px mammogram ~3x faster than PIL's default 6 for
# ~10 % more bytes (the pixels are the same; writing was a fifth of an image's preparation).
PNG_COMPRESS_LEVEL = 3


def write_png(path: str | Path, image: np.ndarray) -> None:
    """8-bit grayscale PNG; PIL writes no timestamps, so equal pixels give equal bytes."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D uint8 image, got {image.dtype} {image.shape}")
    durable.write_png(path, image, compress_level=PNG_COMPRESS_LEVEL)


def write_metadata(out_dir: Path, task: str, lines: list[dict]) -> None:
    """``<task>/metadata.jsonl``: one JSON object per kept image, sorted by id."""
    text = "".join(json.dumps(printable(line), sort_keys=True) + "\n"
                   for line in sorted(lines, key=lambda l: l["id"]))
    durable.write_text(out_dir / task / "metadata.jsonl", text)


def _ordered(values: Iterable, order: list | None = None) -> list:
    """Distinct non-null values, in ``order`` where given (e.g. density words), else sorted."""
    present = {v for v in values if v is not None}
    ranked = [v for v in (order or []) if v in present]
    return ranked + sorted(present - set(ranked), key=str)


def attribute_values(lines: list[dict], orders: Mapping[str, list]) -> dict:
    """Attribute values present in ``lines`` (views, densities, areas, vendors)."""
    return {key: _ordered((line.get(field) for line in lines), orders.get(key))
            for key, field in ATTRIBUTE_FIELDS.items()}


def build_attributes(lines_by_task: Mapping[str, list[dict]], templates: Mapping,
                     orders: Mapping[str, list]) -> dict:
    """attributes.json: values over the whole set at the top level, and per task."""
    all_lines = [line for lines in lines_by_task.values() for line in lines]
    per_task = {task: {**attribute_values(lines, orders), "count": len(lines)}
                for task, lines in lines_by_task.items()}
    return {**attribute_values(all_lines, orders), "templates": dict(templates), "tasks": per_task}


def _entry(outcome: Mapping) -> dict:
    return {"file": outcome["file"], "id": outcome["id"], "kind": outcome["kind"],
            "reason": outcome["reason"]}


def build_report(outcomes: list[Mapping], config: Mapping, run: Mapping, elapsed_s: float) -> dict:
    """report.json from every item's outcome; lists sorted by file for stable diffs."""
    outcomes = sorted(outcomes, key=lambda o: (o["file"], o["id"]))
    kept = [o for o in outcomes if o["status"] == "kept"]
    filtered = [_entry(o) for o in outcomes if o["status"] == "filtered"]
    rejected = [_entry(o) for o in outcomes if o["status"] == "rejected"]
    disagreements = [o["orientation_disagreement"] for o in outcomes if o.get("orientation_disagreement")]
    outside = [item for o in outcomes for item in o.get("lesions_outside_crop") or []]
    counts = {
        "in": len(outcomes),
        "kept": {task: sum(o["task"] == task for o in kept) for task in TASKS},
        "filtered": dict(sorted(Counter(e["kind"] for e in filtered).items())),
        "rejected": dict(sorted(Counter(e["kind"] for e in rejected).items())),
        "orientation_disagreements": len(disagreements),
        "lesions_outside_crop": len(outside),
        # paths shown as hidden/<hash> because they held the file's own patient identity
        "scrubbed_paths": sum(bool(o.get("scrubbed")) for o in outcomes),
    }
    return {
        "kept": len(kept),
        "filtered": filtered,
        "rejected": rejected,
        "counts": counts,
        "orientation_disagreements": disagreements,
        "lesions_outside_crop": outside,
        "config": dict(config),
        "elapsed_s": round(elapsed_s, 3),
        "run": dict(run),
    }


def write_prepared_set(out_dir: Path, outcomes: list[Mapping], config: Mapping, run: Mapping,
                       elapsed_s: float, orders: Mapping[str, list]) -> dict:
    """Write metadata.jsonl per task, attributes.json and report.json (last); return the report."""
    lines_by_task = {task: [o["line"] for o in outcomes
                            if o["status"] == "kept" and o["task"] == task] for task in TASKS}
    for task, lines in lines_by_task.items():
        write_metadata(out_dir, task, lines)
    write_json(out_dir / "attributes.json", build_attributes(lines_by_task, config["templates"], orders))
    report = build_report(outcomes, config, run, elapsed_s)
    write_json(out_dir / "report.json", report)
    return report
