"""Run every benchmark (preparation, Lightning overhead, inference, training) and sum up the ratios.

CPU-sized defaults; `--device cuda` runs the GPU variants on a machine that has one, `--quick`
is a smoke run. Each benchmark still prints its own table and appends its own JSON record.

    python bench/run_all.py [--only train infer prepare overhead] [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

import bench_infer
import bench_overhead
import bench_prepare
import bench_train
from common import add_common_args, format_table, ratio_line
from memory import release_memory

BENCHMARKS = {"prepare": bench_prepare, "overhead": bench_overhead, "infer": bench_infer, "train": bench_train}
GOALS = {  # what each headline ratio should reach (docs/benchmarks.md explains them); ours / baseline, > 1 is better
    # training: ours with the settings a user gets (text-to-image: latent cache, fused AdamW) >= 1.3x the
    # diffusers-style reference loop, and no variant below it
    "train.tiny.cache_vs_ref": 1.3,
    "train.sd15_arch.cache_vs_ref": 1.3,
    "train.tiny.nocache_vs_ref": 1.0,
    "train.sd15_arch.nocache_vs_ref": 1.0,
    "train.tiny.ckpt_cache_vs_ref_ckpt": 1.0,
    "train.tiny.8bit_cache_vs_ref_8bit": 1.0,
    "overhead.trainer_vs_bare": 0.95,
    # generation, 24 steps with guidance: >= 1.25x stock pipeline images/s, exact (same images) and approximate
    # (SSIM / prompt fidelity bar) reported apart; first image no slower than 1.2x stock (stock / ours >= 1/1.2)
    "infer.text2image.exact_vs_stock": 1.25,
    "infer.inpaint.exact_vs_stock": 1.25,
    "infer.text2image.approx_vs_stock": 1.25,
    "infer.inpaint.approx_vs_stock": 1.25,
    "infer.text2image.first_image_vs_stock": 1 / 1.2,
    "infer.inpaint.first_image_vs_stock": 1 / 1.2,
    # preparation: 2 workers on 2 idle cores vs 1
    "prepare.workers2_vs_1": 1.6,
}


def passthrough(args: argparse.Namespace, name: str) -> list[str]:
    """The flags each benchmark understands, rebuilt from the parsed ones."""
    argv = ["--device", args.device, "--results-dir", str(args.results_dir)]
    for flag, value in (("--threads", args.threads), ("--work-dir", args.work_dir), ("--cache-dir", args.cache_dir)):
        if value is not None:
            argv += [flag, str(value)]
    argv += ["--quick"] if args.quick else []
    argv += ["--no-record"] if args.no_record else []
    if name == "train":
        argv += ["--model", args.model]
    if name == "infer" and args.compile:
        argv += ["--compile"]
    return argv


def summary_rows(results: dict[str, dict]) -> list[dict]:
    rows = []
    for name, result in results.items():
        for key, value in result.get("ratios", {}).items():
            full = f"{name}.{key}"
            goal = GOALS.get(full)
            met = None if goal is None or value is None else value >= goal
            rows.append({"ratio": full, "value": value, "goal": None if goal is None else round(goal, 2), "met": met})
        if "error" in result:
            rows.append({"ratio": f"{name} (failed)", "value": None, "goal": None, "met": None})
    return rows


def goal_report(rows: list[dict], benchmarks_run: set[str]) -> str:
    """One line: how many goals the run met, which it missed and which of the benchmarks run did not measure."""
    judged = [row for row in rows if row["met"] is not None]
    seen = {row["ratio"] for row in rows if row["value"] is not None}
    missing = [goal for goal in GOALS if goal.split(".")[0] in benchmarks_run and goal not in seen]
    missed = [f"{row['ratio']} {row['value']:.2f}x < {row['goal']:.2f}x" for row in judged if not row["met"]]
    return (f"GOALS met: {sum(bool(row['met']) for row in judged)} of {len(judged)}"
            + (f"; not met: {', '.join(missed)}" if missed else "")
            + (f"; not measured: {', '.join(missing)}" if missing else ""))


def run(args: argparse.Namespace) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for name in args.only:
        began = time.perf_counter()
        print(f"\n=== {name} ===", flush=True)
        try:
            results[name] = BENCHMARKS[name].main(passthrough(args, name))
        except (Exception, SystemExit) as error:  # one failing benchmark must not hide the others
            traceback.print_exc()
            results[name] = {"name": name, "ratios": {}, "table": f"{name}: failed ({error})", "error": str(error)}
        results[name]["seconds"] = time.perf_counter() - began
        release_memory()
    print("\n=== all tables ===")
    for name, result in results.items():
        print(f"\n{result.get('table', '')}\n({name}: {result['seconds']:.0f} s)")
    rows = summary_rows(results)
    print("\n" + format_table(rows, [("ratio", "ratio"), ("value", "value"), ("goal", "goal"), ("met", "met")],
                              title="Summary of ratios (ours / baseline; > 1 is better for ours)"))
    print(goal_report(rows, set(results)), flush=True)
    flat = {row["ratio"]: row["value"] for row in rows if not row["ratio"].endswith("(failed)")}
    print(ratio_line("all", flat), flush=True)
    return results


def parser() -> argparse.ArgumentParser:
    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--only", nargs="+", choices=tuple(BENCHMARKS), default=list(BENCHMARKS))
    p.add_argument("--model", choices=("tiny", "sd15_arch", "both"), default="both", help="training benchmark models")
    p.add_argument("--compile", action="store_true", help="inference: also try torch.compile (slow first image)")
    return p


def main(argv: list[str] | None = None) -> dict[str, dict]:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
