"""Shared pieces of the training-entry tests: a small prepared phantom set and config composition."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import mame_lightning

CONF_DIR = Path(mame_lightning.CONF_DIR)

# Small phantoms (128x104 raw, 64 px prepared): about 30 healthy and 10 lesion images.
SMALL_SYNTHETIC = [
    "dataset.source.n=48",
    "dataset.source.height=128",
    "dataset.source.width=104",
    "dataset.source.progress=false",
]

# Fast settings for runs of a few steps on CPU.
FAST = [
    "dataset.batch_size=4",
    "dataset.val_max=4",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "callbacks.sample_grid.num_inference_steps=2",
    "callbacks.sample_grid.seeds=[0]",
    "callbacks.sample_grid.every_n_steps=2",
    "callbacks.checkpoint.every_n_train_steps=2",
    "optimizer.lr=1e-3",
]


def prepare_small_synthetic(root: Path) -> Path:
    """Generate and prepare the small set once; returns its prepared_dir."""
    from mame_lightning.data.prepare.preparation import prepare_from_config

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("prepare", overrides=[f"paths.root={root}", *SMALL_SYNTHETIC,
                                            "preparation.num_workers=0", "preparation.progress=false"])
    prepare_from_config(cfg, echo=False)
    return Path(cfg.dataset.prepared_dir)


def compose_train(run_dir: Path, root: Path, prepared: Path, overrides: list[str] = (),
                  synthetic: bool = True) -> OmegaConf:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[
            f"run_dir={run_dir}", f"paths.root={root}", f"dataset.prepared_dir={prepared}",
            *(SMALL_SYNTHETIC if synthetic else []), *FAST, *overrides,
        ])


def train_command(root: Path, prepared: Path, overrides: list[str]) -> list[str]:
    """The real entry point as a user runs it (flags such as -m go before the overrides)."""
    flags = [o for o in overrides if o.startswith("-")]
    rest = [o for o in overrides if not o.startswith("-")]
    return [sys.executable, "-m", "mame_lightning.train", *flags, f"paths.root={root}",
            f"dataset.prepared_dir={prepared}", *SMALL_SYNTHETIC, *FAST, *rest]


def run_train(root: Path, prepared: Path, overrides: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(train_command(root, prepared, overrides), capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc
