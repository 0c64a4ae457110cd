"""Preparation's worker processes (and the resource tracker) end when `prepare` is killed with SIGKILL."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from helpers.preparation import SIZE, write_dicom


@pytest.mark.timeout(240)
def test_kill_9_of_prepare_leaves_no_worker_behind(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    first = raw / "case000.dcm"
    write_dicom(first, height=1024, width=832, seed=1)  # big enough that the workers are still busy
    for i in range(1, 120):
        shutil.copy(first, raw / f"case{i:03d}.dcm")
    env = {**os.environ, "MAME_ROOT": str(tmp_path / "root"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mame_lightning.prepare", "dataset=folder", f"dataset.raw_dir={raw}",
         f"dataset.prepared_dir={out}", f"dataset.size={SIZE}", "preparation.num_workers=2",
         "preparation.chunk_size=1", "preparation.progress=false"],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(proc.pid)
    children: list[psutil.Process] = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:  # workers are at work: sidecars appear
            if (out / ".items").is_dir() and any((out / ".items").glob("*.json")):
                children = parent.children(recursive=True)
                break
            time.sleep(0.05)
        assert len(children) >= 2, "preparation finished or never started its workers"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(children, timeout=20)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, [" ".join(p.cmdline()[-3:]) for p in alive]
        assert len(list((out / ".items").glob("*.json"))) < 120  # it really was killed mid-run
    finally:
        for child in children:
            if child.is_running():
                child.kill()
        if proc.poll() is None:
            proc.kill()
