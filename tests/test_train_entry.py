"""The training entry point end to end on CPU: tiny model, small synthetic phantom set."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline
from hydra.utils import instantiate
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mame_lightning.runs.training import train
from helpers.training import compose_train, prepare_small_synthetic, run_train, train_command

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("train_root")


@pytest.fixture(scope="module")
def prepared(root):
    return prepare_small_synthetic(root)


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().float() for k, v in module.state_dict().items()}


def changed(before: dict, after: dict) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before)


def events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


@pytest.mark.parametrize("task", ["text2image", "inpaint"])
def test_training_run_freezes_vae_trains_unet_and_text_encoder_and_exports(task, root, prepared, tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_train(run_dir, root, prepared, [f"task={task}", "trainer.max_steps=4"])
    initial = instantiate(cfg.model, inpaint=task == "inpaint")
    result = train(cfg)

    assert result["global_step"] == 4
    export = Path(result["export_dir"])
    pipeline_cls = StableDiffusionInpaintPipeline if task == "inpaint" else StableDiffusionPipeline
    pipe = pipeline_cls.from_pretrained(export, safety_checker=None)
    assert state(pipe.vae).keys() == state(initial.vae).keys()
    assert not changed(state(initial.vae), state(pipe.vae)), "the frozen VAE must be bit-identical"
    assert changed(state(initial.unet), state(pipe.unet))
    assert changed(state(initial.text_encoder), state(pipe.text_encoder))

    sidecar = json.loads((export / "mame_lightning.json").read_text())
    assert sidecar["task"] == task
    assert sidecar["data_counts"]["train"] > 0
    if task == "text2image":
        assert set(sidecar["attributes"]["views"]) == {"CC", "MLO"}
        assert "{area}" in sidecar["templates"]["text2image"]
        kwargs = {}
    else:
        image = torch.zeros(1, 3, 64, 64)
        kwargs = {"image": image, "mask_image": torch.ones(1, 1, 64, 64)}
    out = pipe("a mammogram in CC view with big area", num_inference_steps=2, height=64, width=64,
               output_type="np", **kwargs).images
    assert out.shape == (1, 64, 64, 3) and float(out.std()) > 0

    if task == "text2image":  # `python -m mame_lightning.export ckpt=...` rebuilds the same pipeline
        from mame_lightning.models.export import export_checkpoint

        again = export_checkpoint(run_dir / "checkpoints" / "last.ckpt", tmp_path / "from_ckpt")
        rebuilt = StableDiffusionPipeline.from_pretrained(again, safety_checker=None)
        assert not changed(state(pipe.unet), state(rebuilt.unet))
        assert json.loads((again / "mame_lightning.json").read_text())["task"] == "text2image"

    acc = events(run_dir)
    assert "train/loss" in acc.Tags()["scalars"]
    assert len(acc.Scalars("train/loss")) >= 3
    assert acc.Tags()["images"], "the sample grid is logged as TensorBoard images"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((run_dir / "result.json").read_text())["global_step"] == 4


def test_accumulation_counts_optimizer_steps(root, prepared, tmp_path):
    cfg = compose_train(tmp_path / "run", root, prepared, [
        "trainer.max_steps=2", "trainer.accumulate_grad_batches=3", "export=false",
        "callbacks.sample_grid=null", "callbacks.checkpoint=null"])
    result = train(cfg)
    assert result["global_step"] == 2
    assert result["micro_batches"] == 6
    steps = [e.step for e in events(tmp_path / "run").Scalars("train/loss")]
    assert sorted(set(steps)) == [0, 1]


def test_cosine_lr_schedule_with_warmup_from_the_command_line(root, prepared, tmp_path):
    """`python -m mame_lightning.train lr_scheduler=cosine lr_scheduler.num_warmup_steps=10`: a linear
    warmup to optimizer.lr over 10 optimizer steps, then a cosine decay towards zero at trainer.max_steps."""
    run_dir = tmp_path / "cosine"
    run_train(root, prepared, ["lr_scheduler=cosine", "lr_scheduler.num_warmup_steps=10", "trainer.max_steps=14",
                               "callbacks.sample_grid=null", "callbacks.checkpoint=null", "export=false",
                               f"hydra.run.dir={run_dir}"])
    lr = {e.step: e.value for e in events(run_dir).Scalars("train/lr")}
    peak = 1e-3  # optimizer.lr of the fast settings
    assert sorted(lr) == list(range(14))
    assert lr[0] == 0 and lr[5] == pytest.approx(peak * 5 / 10, rel=1e-5) and lr[10] == pytest.approx(peak, rel=1e-5)
    assert lr[12] == pytest.approx(peak / 2, rel=1e-5)  # half way through the decay: cos(pi/2)
    assert lr[10] > lr[11] > lr[12] > lr[13] > 0
    resolved = (run_dir / "resolved_config.yaml").read_text()
    assert "name: cosine" in resolved and "num_warmup_steps: 10" in resolved

def test_missing_prepared_set_names_the_prepare_command(root, tmp_path):
    cfg = compose_train(tmp_path / "run", root, tmp_path / "nowhere",
                        ["dataset=vindr", "model=tiny", "trainer.accelerator=cpu", "precision=32-true"],
                        synthetic=False)
    with pytest.raises(FileNotFoundError, match="python -m mame_lightning.prepare dataset=vindr"):
        train(cfg)


def _export_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    pipe = StableDiffusionPipeline.from_pretrained(run_dir / "export", safety_checker=None)
    return {**{f"unet.{k}": v for k, v in state(pipe.unet).items()},
            **{f"text_encoder.{k}": v for k, v in state(pipe.text_encoder).items()}}


def test_sigkill_then_name_and_resume_auto_matches_an_uninterrupted_run(root, prepared, tmp_path):
    """`name=X` keeps the run in outputs/train/X, so `name=X resume=auto` continues it after a crash."""
    common = ["trainer.max_steps=10", "trainer.deterministic=true", "callbacks.sample_grid=null",
              "trainer.val_check_interval=100"]
    straight = tmp_path / "straight"
    run_train(root, prepared, [*common, f"hydra.run.dir={straight}"])

    killed = root / "outputs" / "train" / "killed_run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(train_command(root, prepared, [*common, "name=killed_run"]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 400
    while not (killed / "checkpoints" / "step-000004.ckpt").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "export").exists(), "the killed run must not have finished"

    resumed = run_train(root, prepared, [*common, "name=killed_run", "resume=auto"])
    assert f"resume=auto: continuing from {killed / 'checkpoints' / 'last.ckpt'}" in resumed.stdout + resumed.stderr
    assert json.loads((killed / "result.json").read_text())["global_step"] == 10

    a, b = _export_weights(straight), _export_weights(killed)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, f"resumed weights differ from the uninterrupted run by {worst}"


def test_multirun_writes_one_folder_per_job_and_a_summary(root, prepared, tmp_path):
    sweep = tmp_path / "sweep"
    run_train(root, prepared, ["-m", "optimizer.lr=1e-3,1e-4", "trainer.max_steps=2", "callbacks.sample_grid=null",
                               "export=false", f"hydra.sweep.dir={sweep}"])
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "result.json").is_file())
    assert len(jobs) == 2
    summary = (sweep / "sweep_summary.md").read_text()
    assert "optimizer.lr=0.001 " in summary and "optimizer.lr=0.0001 " in summary
    rows = (sweep / "sweep_summary.csv").read_text().strip().splitlines()
    assert len(rows) == 3


def test_ddp_on_two_cpu_processes_trains_logs_once_checkpoints_and_exports(root, prepared, tmp_path):
    run_dir = tmp_path / "ddp"
    run_train(root, prepared, ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                               "trainer.max_steps=2", "callbacks.sample_grid.every_n_steps=100",
                               f"hydra.run.dir={run_dir}"])
    assert json.loads((run_dir / "result.json").read_text())["global_step"] == 2
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "export" / "model_index.json").is_file()
    event_files = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(event_files) == 1, "only rank 0 logs"
    StableDiffusionPipeline.from_pretrained(run_dir / "export", safety_checker=None)


@pytest.mark.parametrize("precision, lightning, frozen", [("32-true", "32-true", None),
                                                          ("16-mixed", "16-mixed", "float16"),
                                                          ("bf16-mixed", "bf16-mixed", "bfloat16")])
def test_precision_configs_compose(precision, lightning, frozen, root, tmp_path):
    cfg = compose_train(tmp_path / "run", root, tmp_path / "prepared", [f"precision={precision}"])
    assert cfg.trainer.precision == lightning and cfg.precision.frozen_dtype == frozen
