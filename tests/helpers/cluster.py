"""Shared pieces of the cluster tests: tiny-run overrides, sweep results read back, exported weights."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers.training import FAST, SMALL_SYNTHETIC, train_command

REPO = Path(__file__).resolve().parents[2]
SBATCH_TEMPLATE = REPO / "scripts" / "slurm" / "train_multinode.sbatch"

# a SLURM job of the tiny model: one CPU, 1 GB, ten minutes at most
SLURM_JOB = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
             "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10"]
TINY = ["trainer.max_steps=2", "callbacks.sample_grid=null", "export=false"]


def job_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run_entry(root: Path, prepared: Path, overrides: list[str], *, fixed_lr: bool = True,
              timeout: int = 600) -> subprocess.CompletedProcess:
    """The training entry point as a user types it; returns the process (the caller checks its code)."""
    cmd = train_command(root, prepared, overrides)
    if not fixed_lr:  # Optuna treats a fixed optimizer.lr on the command line as not searched
        cmd = [c for c in cmd if not c.startswith("optimizer.lr=")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=job_env())


def output_of(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def summary_rows(sweep: Path) -> list[dict]:
    return json.loads((sweep / "sweep_summary.json").read_text())


def logged_scalars(run_dir: Path, tag: str) -> list[float]:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def check_optuna_search(sweep: Path, n_trials: int) -> list[dict]:
    """Each trial returned what it logged; the best trial is the lowest; returns the summary rows."""
    rows = summary_rows(sweep)
    assert [r["job"] for r in rows] == list(range(n_trials))
    lrs = []
    for row in rows:
        assert row["status"] == "ok", row
        run_dir = Path(row["run_dir"])
        record = json.loads((run_dir / "result.json").read_text())
        assert record["optimized_metric"]["name"] == "val/loss"
        assert row["objective"] == record["optimized_metric"]["value"]
        assert row["objective"] == logged_scalars(run_dir, "val/loss")[-1], "the trial returns the logged val/loss"
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
        lrs.append(float(next(o for o in overrides if o.startswith("optimizer.lr=")).split("=", 1)[1]))
    assert len(set(lrs)) == n_trials and all(1e-7 <= lr <= 1e-3 for lr in lrs), f"Optuna asked for {lrs}"
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    lowest = min(rows, key=lambda r: r["objective"])
    assert best["best_value"] == lowest["objective"]
    assert best["best_params"]["optimizer.lr"] == lrs[lowest["job"]]
    return rows


def export_weights(export_dir: Path) -> dict[str, torch.Tensor]:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(export_dir, safety_checker=None)
    return {**{f"unet.{k}": v.detach().float().clone() for k, v in pipe.unet.state_dict().items()},
            **{f"text_encoder.{k}": v.detach().float().clone() for k, v in pipe.text_encoder.state_dict().items()}}


def worst_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def template_overrides(root: Path, prepared: Path, overrides: list[str]) -> list[str]:
    """Training overrides for the sbatch template (everything train_command adds after the module)."""
    return [f"paths.root={root}", f"dataset.prepared_dir={prepared}", *SMALL_SYNTHETIC, *FAST, *overrides]
