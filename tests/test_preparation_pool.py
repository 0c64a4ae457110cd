"""Preparation's worker pool: started once per run, forked when that is safe, one thread a worker."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

import mame_lightning.data.prepare.preparation as preparation
from mame_lightning.data.geometry import apply_image, plan
from mame_lightning.data.prepare.item import orient
from helpers.preparation import WORKER_LOG_ENV, compose_prepare, counting_worker_setup, phantom_dataset, snapshot

SYNTH = ("dataset.source.n=12", "dataset.source.height=128", "dataset.source.width=104",
         "dataset.source.progress=false")


def test_one_pool_of_two_single_threaded_workers_serves_the_whole_run(tmp_path, monkeypatch):
    log = tmp_path / "workers"
    log.mkdir()
    monkeypatch.setenv(WORKER_LOG_ENV, str(log))
    monkeypatch.setattr(preparation, "worker_setup", counting_worker_setup)
    # forked workers see this test's environment; a forkserver started earlier in the session would not
    monkeypatch.setattr(preparation, "start_method", lambda: "fork")
    report = preparation.prepare_dataset(compose_prepare("synthetic", tmp_path / "raw", tmp_path / "out", *SYNTH,
                                                         "preparation.num_workers=2", "preparation.chunk_size=1"))
    assert report["run"]["processed"] == 12
    workers = [json.loads(p.read_text()) for p in log.iterdir()]
    assert len(workers) == 2  # 12 items, one pool: each worker initialised once
    assert all(w["omp"] == "1" and w["torch"] in (None, 1) for w in workers)


def _idle_thread(name: str) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name=name, daemon=True)
    thread.start()
    return thread, stop


def test_workers_fork_unless_another_thread_runs(monkeypatch):
    # only this test's threads count (earlier tests of the session may leave threads of their own)
    mine = [threading.main_thread()]
    real_enumerate = threading.enumerate
    monkeypatch.setattr(threading, "enumerate", lambda: [t for t in real_enumerate() if t in mine])
    assert preparation.start_method() == "fork"  # Linux, no CUDA started: share the parent's imports
    thread, stop = _idle_thread("tqdm_monitor")  # a progress bar's monitor does not count
    mine.append(thread)
    try:
        assert preparation.start_method() == "fork"
        other, stop_other = _idle_thread("some-worker")
        mine.append(other)
        try:
            assert preparation.start_method() == "forkserver"
        finally:
            stop_other.set()
            other.join()
    finally:
        stop.set()
        thread.join()


@pytest.mark.parametrize("thread", [None, "some-worker"], ids=["fork", "forkserver"])
def test_outputs_are_the_same_with_one_and_two_workers(tmp_path, thread):
    one, two = tmp_path / "one", tmp_path / "two"
    preparation.prepare_dataset(compose_prepare("synthetic", tmp_path / "raw", one, *SYNTH))
    other, stop = _idle_thread(thread) if thread else (None, None)
    try:
        report = preparation.prepare_dataset(compose_prepare("synthetic", tmp_path / "raw", two, *SYNTH,
                                                             "preparation.num_workers=2", "preparation.chunk_size=1"))
    finally:
        if other:
            stop.set()
            other.join()
    assert report["run"]["num_workers"] == 2
    assert snapshot(one) == snapshot(two)


def test_a_tag_the_pixels_overrule_is_flipped_without_a_second_resize():
    _, phantom = phantom_dataset(laterality="R", drawn="L", height=200, width=150)
    img = np.rint(phantom.image * 255).astype(np.uint8)
    out, geom, _, disagreed = orient(img, "R", 64, check=True)
    assert disagreed and not geom.flip
    assert np.array_equal(out, apply_image(img, plan(200, 150, 64, flip=False)))
    assert out.flags["C_CONTIGUOUS"]
