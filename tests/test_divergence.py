"""A run whose loss keeps going NaN stops as diverged: no export, the reason in result.json, exit status 1."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from helpers.modules import adamw, loader, tiny, toy_items, trainer
from helpers.training import prepare_small_synthetic, train_command

from mame_lightning.models.text2image import Text2ImageModule

pytestmark = pytest.mark.usefixtures("one_thread")


def nan_after_first(monkeypatch) -> list[int]:
    """Every loss after the first call is NaN (a model that blew up after step one)."""
    calls = []
    real = Text2ImageModule.compute_loss

    def compute_loss(self, batch, generator, prompt_dropout):
        calls.append(1)
        loss = real(self, batch, generator, prompt_dropout)
        return loss if len(calls) == 1 else loss * float("nan")

    monkeypatch.setattr(Text2ImageModule, "compute_loss", compute_loss)
    return calls


def test_skipping_every_step_stops_the_fit(model_cache, monkeypatch):
    calls = nan_after_first(monkeypatch)
    module = Text2ImageModule(tiny(model_cache), adamw(), nonfinite="skip", max_consecutive_skipped=5)
    fit = trainer(max_steps=40)
    with pytest.raises(RuntimeError, match=r"diverged .*last 5 steps were all skipped"):
        fit.fit(module, loader(toy_items(module.components, n=8), batch_size=2))
    assert len(calls) == 6 and fit.global_step < 40


def test_a_rare_bad_batch_is_skipped_but_too_many_stop_the_run(model_cache):
    from mame_lightning.models.text2image import TrainingDiverged

    module = Text2ImageModule(tiny(model_cache), adamw(), nonfinite="skip", max_skipped_fraction=0.05)
    module.attempted_steps, module.skipped_steps = 200, 10
    module.check_skipped()  # 5 % of 200: still rare
    module.skipped_steps = 11
    with pytest.raises(TrainingDiverged, match="11 of 200 steps were skipped"):
        module.check_skipped()
    module.attempted_steps, module.skipped_steps = 8, 3  # early on the share is taken over 100 steps
    module.check_skipped()
    with pytest.raises(ValueError, match="max_skipped_fraction"):
        Text2ImageModule(tiny(model_cache), adamw(), max_skipped_fraction=1.5)


@pytest.mark.slow
def test_a_diverged_run_writes_no_export_and_says_why(tmp_path):
    """The real thing: a learning rate of 1e30 blows the weights up at step one, every later loss is NaN."""
    root = tmp_path / "root"
    prepared = prepare_small_synthetic(root)
    run_dir = tmp_path / "run"
    overrides = [f"hydra.run.dir={run_dir}", "task.module.nonfinite=skip", "task.module.max_consecutive_skipped=4",
                 "trainer.max_steps=12", "optimizer.lr=1e30", "callbacks.sample_grid=null",
                 "callbacks.checkpoint.every_n_train_steps=100"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(train_command(root, prepared, overrides), capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: training diverged at global step") and "last 4 steps" in last_line
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "diverged" and "last 4 steps were all skipped" in result["reason"]
    assert result["skipped_steps"] == 4 and result["train_loss"] is None and result["global_step"] < 12
    assert not (run_dir / "export").exists()
