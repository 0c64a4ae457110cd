"""Preparation: prepared images per second on full-size synthetic DICOMs, by worker count.

The raw set (≈3328×2560 phantoms in the VinDr and OMI-DB layouts, every transfer syntax and
photometric variant) is generated once and not timed. Each timed run prepares it from scratch
into a fresh folder with `prepare_from_config`, the code `python -m mame_lightning.prepare`
runs, with the content filters off so every image goes through the whole pipeline.

    python bench/bench_prepare.py [--images 40] [--workers 1 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import setups
from common import (add_common_args, device_info, device_label, finish_args, format_table, make_record, ratio,
                    ratio_line, record_result)

NAME = "prepare"
FULL_SIZE = (3328, 2560)


def raw_set(work_dir: Path, n: int, height: int, width: int) -> Path:
    """Generate (or reuse) the synthetic raw set; returns its folder."""
    from mame_lightning.data.prepare.sources.synthetic import SyntheticSource

    raw = Path(work_dir) / f"prepare_raw_{n}_{height}x{width}"
    began = time.perf_counter()
    records = list(SyntheticSource(n=n, height=height, width=width, seed=0, progress=True).records(raw))
    print(f"[prepare] raw set: {len(records)} DICOMs of {height}x{width} in {raw} "
          f"({time.perf_counter() - began:.1f} s, not timed)", flush=True)
    return raw


def prepare_once(raw: Path, work_dir: Path, *, n: int, height: int, width: int, size: int, workers: int,
                 chunk_size: int) -> dict:
    """One timed `python -m mame_lightning.prepare` from scratch, as a user runs it.

    A separate process, so worker processes start exactly as they do for the command (forked
    from it, or started by a forkserver when it runs other threads). `seconds` is the preparation's
    own clock (report.json elapsed_s: records, items, pool start-up, writing the set);
    `command_s` adds interpreter start-up and config composition.
    """
    with tempfile.TemporaryDirectory(prefix="prepared_", dir=work_dir) as out:
        overrides = setups.prepare_overrides(raw, Path(out) / "set", size=size, n=n, height=height, width=width,
                                             workers=workers, keep_all=True, chunk_size=chunk_size)
        command = [sys.executable, "-m", "mame_lightning.prepare", *overrides, f"hydra.run.dir={out}/hydra"]
        began = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        command_s = time.perf_counter() - began
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command[:3])} failed ({done.returncode}): {done.stderr[-2000:]}")
        report = json.loads((Path(out) / "set" / "report.json").read_text())
    return {"seconds": float(report["elapsed_s"]), "command_s": command_s, "files": report["counts"]["in"],
            "prepared": report["kept"], "rejected": len(report["rejected"])}


def run(args) -> dict:
    facts = device_info("cpu")
    n, (height, width) = (2, (256, 208)) if args.quick else (args.images, (args.height, args.width))
    rounds = 1 if args.quick else args.rounds
    args.work_dir.mkdir(parents=True, exist_ok=True)
    raw = raw_set(args.work_dir, n, height, width)
    runs: dict[int, list[dict]] = {w: [] for w in args.workers}
    for number in range(rounds):
        for workers in args.workers:
            print(f"[prepare] {workers} worker(s), round {number + 1}/{rounds} ...", flush=True)
            runs[workers].append(prepare_once(raw, args.work_dir, n=n, height=height, width=width, size=args.size,
                                              workers=workers, chunk_size=args.chunk_size))
    rows = []
    for workers, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        last = results[-1]
        rows.append({"workers": workers, "files": last["files"], "prepared": last["prepared"],
                     "rejected": last["rejected"], "seconds": seconds,
                     "command_s": statistics.median(r["command_s"] for r in results),
                     "images_per_s": last["prepared"] / seconds, "files_per_s": last["files"] / seconds,
                     "rounds": len(results)})
    single = next((r for r in rows if r["workers"] == min(args.workers)), rows[0])
    for row in rows:
        row["scaling"] = ratio(row["images_per_s"], single["images_per_s"])
    ratios = {f"workers{r['workers']}_vs_{single['workers']}": r["scaling"] for r in rows if r is not single}
    facts["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    columns = [("workers", "workers"), ("files", "files"), ("prepared", "prepared"), ("seconds", "seconds"),
               ("command_s", "command s"), ("images_per_s", "prepared img/s"), ("files_per_s", "files/s"), ("scaling", "scaling")]
    title = (f"Preparation of {n} synthetic {height}x{width} DICOMs to {args.size} px "
             f"on {device_label(facts)}")
    table = format_table(rows, columns, title=title)
    config = {"images": n, "height": height, "width": width, "size": args.size, "workers": args.workers,
              "chunk_size": args.chunk_size, "rounds": rounds, "filters": "implant/special-protocol off",
              "quick": args.quick}
    record_result(args, NAME, make_record(NAME, facts, config, rows, ratios))
    print(table)
    print(ratio_line(NAME, ratios), flush=True)
    return {"name": NAME, "rows": rows, "ratios": ratios, "table": table}


def parser() -> argparse.ArgumentParser:
    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--images", type=int, default=40, help="full-size DICOMs in the raw set")
    p.add_argument("--height", type=int, default=FULL_SIZE[0])
    p.add_argument("--width", type=int, default=FULL_SIZE[1])
    p.add_argument("--size", type=int, default=512, help="prepared side in pixels (MAM-E: 512)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--chunk-size", type=int, default=1, help="items handed to a worker at a time")
    p.add_argument("--rounds", type=int, default=2, help="timed runs per worker count (median)")
    return p


def main(argv: list[str] | None = None) -> dict:
    return run(finish_args(parser().parse_args(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
