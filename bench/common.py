"""What every benchmark shares: where things live, the machine, step clocks, records and tables.

Each benchmark prints one table, then a last line `RATIOS <name>: key=value ...` that run_all.py
and the tests read back, and appends one JSON record (device, library versions, config,
figures, ratios, time) to bench/results/<name>.jsonl.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import psutil
import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
RATIO_PREFIX = "RATIOS"
LIBRARIES = ("torch", "lightning", "diffusers", "transformers", "bitsandbytes", "pydicom", "numpy")


# -- places ------------------------------------------------------------------------------------
def data_root() -> Path:
    """The project's data folder (paths.root/data); MAME_ROOT moves it, as in conf/paths."""
    return Path(os.environ.get("MAME_ROOT", REPO_ROOT)) / "data"


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags every benchmark takes, so run_all.py can pass them through unchanged."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda[:N]); cuda fails clearly without a GPU")
    parser.add_argument("--quick", action="store_true", help="smallest sizes and step counts: a smoke run")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--work-dir", type=Path, default=None, help="data and outputs (default: <data>/bench)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="built models (default: <data>/cache)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where <name>.jsonl records go")
    parser.add_argument("--no-record", action="store_true", help="print only, append no JSON record")
    return parser


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """Defaults that depend on the environment, applied once the flags are parsed."""
    args.work_dir = Path(args.work_dir or data_root() / "bench")
    args.cache_dir = Path(args.cache_dir or data_root() / "cache")
    if args.threads:
        torch.set_num_threads(int(args.threads))
    warn_if_busy()
    return args


def warn_if_busy(threshold: float = 1.0) -> bool:
    """Say so when other processes already keep the cores busy: wall-clock figures will be noisy."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load <= threshold * cores:
        return False
    print(f"note: load average {load:.1f} on {cores} cores before starting; other processes compete for the "
          f"CPU, so timings are noisy (CPU seconds per step are steadier; --threads 1 suffers least)", flush=True)
    return True


def resolve_device(name: str) -> torch.device:
    """The torch device asked for; asking for CUDA on a machine without one is an error, not a fallback."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine (run with --device cpu)")
    return device


# -- the machine -------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device | str) -> dict:
    """What the figures were measured on; the load average tells how busy the machine was."""
    device = torch.device(device)
    info = {
        "device": str(device),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        info["gpu"] = torch.cuda.get_device_name(index)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(index).total_memory / 1024**3, 1)
        info["cuda"] = torch.version.cuda
    return info


def device_label(info: Mapping) -> str:
    """One line naming the hardware: the GPU when there is one, else the CPU and its threads."""
    if "gpu" in info:
        return f"{info['gpu']} (CUDA {info.get('cuda')})"
    return f"{info['cpu']}, {info['cpu_count']} cores, {info['torch_threads']} torch threads"


def library_versions(names: Iterable[str] = LIBRARIES) -> dict:
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# -- time ------------------------------------------------------------------------------------
def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued GPU work so a clock reading means the work is done."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Timestamps taken at the end of every step; intervals between them are step times.

    Step i's time runs from the end of step i-1 to the end of step i, so it includes loading
    the batch and every per-step cost of the loop that drives it. The first `warmup` steps
    (allocations, first-call dispatch) are not counted. Process CPU time is kept alongside
    wall time: on a busy shared machine it shows the work done when the wall clock cannot.
    """

    def __init__(self, warmup: int, device: torch.device | str | None = None):
        if warmup < 1:
            raise ValueError(f"warmup must be at least 1 step (the first interval needs a start), got {warmup}")
        self.warmup = int(warmup)
        self.device = device
        self.marks: list[float] = []
        self.cpu_marks: list[float] = []

    def mark(self) -> None:
        synchronize(self.device)
        self.marks.append(time.perf_counter())
        self.cpu_marks.append(time.process_time())

    def _after_warmup(self, marks: list[float]) -> list[float]:
        kept = marks[self.warmup - 1 :]
        return [b - a for a, b in zip(kept, kept[1:])]

    def intervals(self) -> list[float]:
        """Wall times of the steps after warm-up (empty until warmup + 1 steps have been marked)."""
        return self._after_warmup(self.marks)

    def cpu_intervals(self) -> list[float]:
        """Process CPU seconds (all threads) of the same steps."""
        return self._after_warmup(self.cpu_marks)


def step_stats(seconds: Sequence[float]) -> dict:
    """Median (the headline: robust to a busy shared machine), mean, spread and count."""
    if not seconds:
        raise ValueError("no timed steps: run more steps than the warm-up")
    values = sorted(float(s) for s in seconds)
    return {
        "median_s": statistics.median(values),
        "mean_s": statistics.fmean(values),
        "min_s": values[0],
        "max_s": values[-1],
        "n": len(values),
    }


def per_second(items_per_step: float, seconds_per_step: float) -> float:
    return float(items_per_step) / seconds_per_step if seconds_per_step > 0 else float("inf")


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either side was not measured."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return float(numerator) / float(denominator)


def cycle(loader: Iterable) -> Iterator:
    """Batches forever, starting a new epoch (a new iterator) whenever one runs out."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the data loader yields no batches (fewer images than one batch with drop_last?)")


# -- records and printing --------------------------------------------------------------------
def make_record(name: str, device_facts: Mapping, config: Mapping, figures, ratios: Mapping) -> dict:
    return {
        "benchmark": name,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": dict(device_facts),
        "versions": library_versions(),
        "config": dict(config),
        "figures": figures,
        "ratios": dict(ratios),
    }


def append_record(path: Path, record: Mapping) -> Path:
    """Add one JSON line to `path` atomically: the old lines plus the new one go to a temporary
    file in the same folder, which then replaces the old file."""
    from mame_lightning.io import append_line

    return append_line(path, json.dumps(record, sort_keys=True, default=str))


def read_records(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def record_result(args: argparse.Namespace, name: str, record: Mapping) -> Path | None:
    if getattr(args, "no_record", False):
        return None
    return append_record(Path(args.results_dir) / f"{name}.jsonl", record)


def format_value(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def format_table(rows: Sequence[Mapping], columns: Sequence[tuple[str, str]], title: str = "") -> str:
    """A plain-text table: `columns` are (key, header); missing values print as '-'."""
    cells = [[header for _, header in columns]]
    cells += [[format_value(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = [title] if title else []
    for number, line in enumerate(cells):
        lines.append("  ".join(cell.rjust(width) if i else cell.ljust(width)
                               for i, (cell, width) in enumerate(zip(line, widths))))
        if number == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def ratio_line(name: str, ratios: Mapping[str, float | None]) -> str:
    """`RATIOS name: key=1.23x ...`, the last line each benchmark prints (n/a when not measured)."""
    parts = [f"{key}={'n/a' if value is None else f'{value:.3f}x'}" for key, value in ratios.items()]
    return f"{RATIO_PREFIX} {name}: " + (" ".join(parts) if parts else "(none measured)")


_RATIO_LINE = re.compile(rf"^{RATIO_PREFIX} (?P<name>[\w.-]+): (?P<body>.*)$")


def parse_ratio_line(line: str) -> tuple[str, dict[str, float | None]]:
    """Inverse of `ratio_line`; raises ValueError for any other line."""
    match = _RATIO_LINE.match(line.strip())
    if not match:
        raise ValueError(f"not a ratio line: {line!r}")
    ratios: dict[str, float | None] = {}
    for part in match["body"].split():
        if "=" not in part:
            continue
        key, value = part.split("=", 1)
        ratios[key] = None if value == "n/a" else float(value.rstrip("x"))
    return match["name"], ratios


@contextmanager
def quiet_warnings() -> Iterator[None]:
    """Lightning and diffusers warn about things a benchmark does on purpose (no logger, few steps)."""
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric", "diffusers")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def run_guarded(label: str, fn: Callable[[], dict]) -> dict:
    """Run one variant; a failure becomes a row saying why instead of ending the benchmark."""
    try:
        return fn()
    except (RuntimeError, ValueError, ImportError, NotImplementedError, MemoryError, OSError) as error:
        return {"variant": label, "skipped": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
