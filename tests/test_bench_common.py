"""The benchmark harness helpers (bench/common.py), and two benchmarks run as smoke runs.

No timing is asserted: the smoke runs only have to finish and end with a parsable ratio line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402


def test_step_clock_drops_warmup_and_measures_intervals(monkeypatch):
    ticks = iter([10.0, 11.0, 13.0, 16.0, 20.0])
    cpu = iter([1.0, 1.5, 2.5, 4.0, 6.0])
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(ticks))
    monkeypatch.setattr(common.time, "process_time", lambda: next(cpu))
    clock = common.StepClock(warmup=2)
    for _ in range(5):
        clock.mark()
    # marks after step 2 (index 1) start the timed part: steps 3, 4, 5
    assert clock.intervals() == [2.0, 3.0, 4.0]
    assert clock.cpu_intervals() == [1.0, 1.5, 2.0]


def test_step_clock_needs_a_warmup_step():
    with pytest.raises(ValueError, match="warmup"):
        common.StepClock(warmup=0)


def test_step_clock_with_too_few_steps_has_no_intervals():
    clock = common.StepClock(warmup=3)
    clock.mark()
    clock.mark()
    assert clock.intervals() == []
    with pytest.raises(ValueError, match="no timed steps"):
        common.step_stats(clock.intervals())


def test_step_stats_uses_the_median():
    stats = common.step_stats([0.1, 0.2, 5.0])
    assert stats["median_s"] == pytest.approx(0.2)
    assert stats["mean_s"] == pytest.approx(5.3 / 3)
    assert (stats["min_s"], stats["max_s"], stats["n"]) == (0.1, 5.0, 3)


def test_ratio_and_rate():
    assert common.ratio(3.0, 2.0) == 1.5
    assert common.ratio(None, 2.0) is None
    assert common.ratio(1.0, 0) is None
    assert common.per_second(8, 0.5) == 16.0


def test_ratio_line_round_trips():
    line = common.ratio_line("train", {"tiny.cache_vs_ref": 1.4567, "sd15_arch.cache_vs_ref": None})
    assert line.startswith("RATIOS train: ")
    name, ratios = common.parse_ratio_line(line)
    assert name == "train"
    assert ratios == {"tiny.cache_vs_ref": pytest.approx(1.457), "sd15_arch.cache_vs_ref": None}
    with pytest.raises(ValueError):
        common.parse_ratio_line("Training throughput on ...")


def test_format_table_aligns_and_marks_missing_values():
    rows = [{"variant": "reference", "img_s": 12.3456, "ok": True}, {"variant": "ours+cache", "img_s": None}]
    text = common.format_table(rows, [("variant", "variant"), ("img_s", "img/s"), ("ok", "ok")], title="T")
    lines = text.splitlines()
    assert lines[0] == "T"
    assert len({len(line) for line in lines[1:]}) == 1  # every row as wide as the header
    assert "12.3" in lines[3] and "yes" in lines[3]
    assert lines[4].split()[1:] == ["-", "-"]


def test_append_record_adds_lines_and_keeps_old_ones(tmp_path):
    path = tmp_path / "results" / "train.jsonl"
    path.parent.mkdir()
    path.write_text('{"old": 1}')  # an earlier record without its final newline
    common.append_record(path, {"new": 2})
    common.append_record(path, {"new": 3})
    assert common.read_records(path) == [{"old": 1}, {"new": 2}, {"new": 3}]
    assert [p.name for p in path.parent.iterdir()] == ["train.jsonl"]  # no temporary left behind


def test_make_record_holds_device_versions_and_time():
    facts = common.device_info("cpu")
    record = common.make_record("x", facts, {"batch": 8}, [{"img_s": 1.0}], {"a": 1.2})
    assert record["device"]["cpu_count"] == os.cpu_count()
    assert record["versions"]["torch"] and record["versions"]["python"]
    assert record["config"] == {"batch": 8} and record["ratios"] == {"a": 1.2}
    json.dumps(record)  # serialisable as one JSON line
    assert "cores" in common.device_label(facts)


def test_peak_memory_sees_a_temporary_allocation():
    import numpy as np

    import memory as memory_module

    with memory_module.PeakMemory("cpu", interval=0.001) as memory:
        block = np.ones(64 * 1024 * 1024 // 8)  # 64 MiB, touched
        time.sleep(0.05)
        del block
    assert memory.kind == "rss_peak"
    assert memory.delta_mib > 40


def test_cycle_restarts_and_rejects_empty_loaders():
    batches = common.cycle([1, 2])
    assert [next(batches) for _ in range(5)] == [1, 2, 1, 2, 1]
    with pytest.raises(ValueError, match="no batches"):
        next(common.cycle([]))


def test_cuda_request_without_cuda_fails_clearly():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match="CUDA is not available"):
        common.resolve_device("cuda")


def test_run_guarded_turns_failures_into_a_note():
    def broken():
        raise RuntimeError("bitsandbytes has no CPU kernel\nmore")

    assert common.run_guarded("8bit", broken) == {"variant": "8bit", "skipped": "RuntimeError: bitsandbytes has no CPU kernel"}


def run_quick(script: str, tmp_path: Path) -> str:
    env = {**os.environ, "MAME_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(BENCH / script), "--quick", "--threads", "1", "--results-dir",
                           str(tmp_path / "results")], capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_overhead_quick_run_prints_a_ratio_line(tmp_path):
    out = run_quick("bench_overhead.py", tmp_path)
    name, ratios = common.parse_ratio_line(out.strip().splitlines()[-1])
    assert name == "overhead" and ratios["trainer_vs_bare"] > 0
    (record,) = common.read_records(tmp_path / "results" / "overhead.jsonl")
    assert record["ratios"]["trainer_vs_bare"] == pytest.approx(ratios["trainer_vs_bare"], rel=1e-2)


@pytest.mark.slow
def test_prepare_quick_run_prints_a_ratio_line(tmp_path):
    out = run_quick("bench_prepare.py", tmp_path)
    name, ratios = common.parse_ratio_line(out.strip().splitlines()[-1])
    assert name == "prepare" and ratios["workers2_vs_1"] > 0
    (record,) = common.read_records(tmp_path / "results" / "prepare.jsonl")
    assert {row["workers"] for row in record["figures"]} == {1, 2}
    assert all(row["prepared"] > 0 for row in record["figures"])


def test_train_rows_are_compared_with_the_matching_reference():
    import bench_train

    rows = [
        {"model": "tiny", "variant": "reference", "path": "reference", "checkpointing": False, "optimizer": "adamw",
         "images_per_s": 10.0, "step_s": 0.8, "cpu_s_per_image": 0.1, "peak_delta_mib": 200.0},
        {"model": "tiny", "variant": "reference+ckpt", "path": "reference", "checkpointing": True,
         "optimizer": "adamw", "images_per_s": 5.0, "step_s": 1.6, "cpu_s_per_image": 0.2, "peak_delta_mib": 100.0},
        {"model": "tiny", "variant": "ours+cache", "path": "ours", "checkpointing": False, "optimizer": "adamw",
         "images_per_s": 16.0, "step_s": 0.5, "cpu_s_per_image": 0.05, "cache_build_s": 3.0},
        {"model": "tiny", "variant": "ours+cache+ckpt", "path": "ours", "checkpointing": True, "optimizer": "adamw",
         "images_per_s": 4.0, "step_s": 2.0, "cpu_s_per_image": 0.25, "cache_build_s": 3.0},
        {"model": "tiny", "variant": "ours+cache 8bit", "skipped": "RuntimeError: no kernel"},
    ]
    bench_train.compare(rows)
    assert rows[2]["vs_reference"] == pytest.approx(1.6) and rows[2]["vs_reference_cpu"] == pytest.approx(2.0)
    assert rows[2]["break_even_steps"] == pytest.approx(10.0)  # 3 s of cache / 0.3 s saved per step
    assert rows[3]["vs_reference"] == pytest.approx(0.8) and "break_even_steps" not in rows[3]  # never pays off
    ratios = bench_train.summary_ratios(rows)
    assert ratios["tiny.cache_vs_ref"] == pytest.approx(1.6)
    assert ratios["tiny.ckpt_cache_vs_ref_ckpt"] == pytest.approx(0.8)
    assert ratios["tiny.8bit_cache_vs_ref_8bit"] is None
    assert ratios["tiny.ckpt_memory_saving"] == pytest.approx(2.0)


def test_train_ratios_pair_the_rounds_so_a_slow_round_hits_both_sides():
    import bench_train

    def row(path, variant, rounds):
        runs = [{"wall": [step] * 4, "cpu": [step] * 4, "peak_mib": 1.0, "peak_delta_mib": 1.0, "memory_kind": "rss"}
                for step in rounds]
        setup = bench_train.Setup("tiny", 64, 8, 1, 4, Path("."), True, "32")
        return bench_train.summarise(setup, bench_train.Variant(variant, path), runs)

    # the machine slowed 3x during round 2, after the reference's turn; pooled medians would say 0.37x
    reference, ours = row("reference", "reference", [1.0, 1.0, 3.0]), row("ours", "ours", [0.9, 2.7, 2.7])
    bench_train.compare([reference, ours])
    assert ours["round_step_s"] == [0.9, 2.7, 2.7]
    assert ours["images_per_s"] / reference["images_per_s"] == pytest.approx(1 / 2.7)
    assert ours["vs_reference"] == pytest.approx(1 / 0.9)  # the median of 1.11, 0.37 and 1.11
    # a variant that missed a round cannot be paired: the pooled medians decide
    partial = row("ours", "ours+cache", [0.5, 0.5])
    bench_train.compare([reference, partial])
    assert partial["vs_reference"] == pytest.approx(partial["images_per_s"] / reference["images_per_s"])


def test_full_size_run_is_skipped_without_the_memory(tmp_path):
    import bench_train

    setup = bench_train.Setup("sd15_arch", 256, 1, 1, 2, tmp_path, False, "32")
    assert "free memory" in bench_train.sd15_fits(setup, tmp_path, budget_mib=8 * 1024)
    enough = bench_train.sd15_fits(setup, tmp_path, budget_mib=64 * 1024)
    assert enough is None or "disk" in enough  # memory is no longer the reason


def test_run_all_summary_marks_goals():
    import run_all

    rows = run_all.summary_rows({
        "train": {"ratios": {"tiny.cache_vs_ref": 1.2, "sd15_arch.cache_vs_ref": None}},
        "overhead": {"ratios": {"trainer_vs_bare": 0.97}},
        "infer": {"ratios": {}, "error": "boom"},
    })
    met = {row["ratio"]: row["met"] for row in rows}
    assert met == {"train.tiny.cache_vs_ref": False, "train.sd15_arch.cache_vs_ref": None,
                   "overhead.trainer_vs_bare": True, "infer (failed)": None}
    line = run_all.goal_report(rows, {"train", "overhead"})
    assert line.startswith("GOALS met: 1 of 2; not met: train.tiny.cache_vs_ref 1.20x < 1.30x")
    assert "not measured: train.sd15_arch.cache_vs_ref, train.tiny.nocache_vs_ref" in line
    assert "prepare." not in line and "infer." not in line  # benchmarks not run are not counted as missing
