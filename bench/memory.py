"""Memory figures: peak memory over a block, free memory and disk, and freeing between variants."""

from __future__ import annotations

import ctypes
import gc
import threading
from pathlib import Path

import psutil
import torch

from common import synchronize

MIB = 1024 * 1024


def memory_available_mib() -> float:
    return psutil.virtual_memory().available / MIB


def disk_free_mib(path: Path) -> float:
    path = Path(path)
    while not path.exists():
        path = path.parent
    return psutil.disk_usage(str(path)).free / MIB


def release_memory() -> None:
    """Free what the last variant left, so the next one's peak is its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:  # glibc keeps freed small blocks; hand them back to the OS so RSS reflects live memory
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / MIB


class PeakMemory:
    """Peak memory over a block: CUDA's allocator peak on a GPU, sampled RSS on the CPU.

    On the CPU a thread samples the resident set every `interval` seconds; `delta_mib` is the
    peak above the value at entry, i.e. what the block itself needed.
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.01):
        self.device = torch.device(device)
        self.interval = interval
        self.baseline_mib = 0.0
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def delta_mib(self) -> float:
        return max(0.0, self.peak_mib - self.baseline_mib)

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.device.type == "cuda" else "rss_peak"

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, process.memory_info().rss / MIB)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_mib = torch.cuda.memory_allocated(self.device) / MIB
            self.peak_mib = self.baseline_mib
            return self
        self.baseline_mib = self.peak_mib = rss_mib()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / MIB
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_mib = max(self.peak_mib, rss_mib())
