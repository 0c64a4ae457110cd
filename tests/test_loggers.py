"""Training logs to W&B (offline) and MLflow (local store) as well as TensorBoard, one or several at once.

Each tracker is read back with its own format or client: the W&B offline run file that `wandb sync`
uploads, MLflow's client on the local store, TensorBoard's event reader.
"""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mame_lightning.runs.training import train
from helpers.tracker_readers import mlflow_runs, wandb_history, wandb_offline_runs
from helpers.training import compose_train

pytestmark = pytest.mark.slow
TWO_STEPS = ["trainer.max_steps=2", "export=false", "callbacks.checkpoint=null",
             "callbacks.sample_grid.every_n_steps=0", "callbacks.sample_grid.at_start=false"]


@pytest.fixture(autouse=True)
def offline_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def wandb_rows(run_dir):
    runs = wandb_offline_runs(run_dir)
    assert len(runs) == 1, f"expected one offline W&B run in {run_dir}, found {runs}"
    return wandb_history(runs[0])


def test_tensorboard_and_wandb_at_once_each_get_loss_and_samples(small_prepared, tmp_path):
    root, prepared = small_prepared
    run_dir = tmp_path / "run"
    result = train(compose_train(run_dir, root, prepared, ["logger=[tensorboard,wandb]", *TWO_STEPS]))
    assert result["global_step"] == 2

    rows = wandb_rows(run_dir)
    losses = [row["train/loss"] for row in rows if "train/loss" in row]
    assert len(losses) == 2 and losses[-1] == pytest.approx(result["train_loss"], rel=1e-5)
    assert [row["val/loss"] for row in rows if "val/loss" in row] == [pytest.approx(result["val_loss"], rel=1e-5)]
    images = [row for row in rows if "samples/_type" in row]
    assert len(images) == 1 and images[0]["trainer/global_step"] == 2, images
    media = wandb_offline_runs(run_dir)[0].parent / "files"
    assert [p.name for p in media.glob("media/images/samples_*.png")], "the grid's PNG is stored with the run"

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")][-1] == pytest.approx(losses[-1], rel=1e-5)
    assert events.Tags()["images"] == ["samples"]


def test_every_logger_from_logger_many_and_one_wandb_run_per_training(small_prepared, tmp_path):
    root, prepared = small_prepared
    store = tmp_path / "mlruns"
    overrides = ["logger=many", f"logger.mlflow.tracking_uri=file:{store}", "logger.mlflow.experiment_name=exp",
                 *TWO_STEPS]
    results = [train(compose_train(tmp_path / name, root, prepared, overrides)) for name in ("a", "b")]

    client, runs = mlflow_runs(store.as_uri(), "exp")
    assert len(runs) == 2 and all(run.info.status == "FINISHED" for run in runs)
    by_loss = {round(run.data.metrics["train/loss"], 5): run for run in runs}
    assert set(by_loss) == {round(r["train_loss"], 5) for r in results}
    run = next(iter(by_loss.values()))
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 2
    assert {"val/loss", "train/grad_norm", "perf/images_per_s"} <= set(run.data.metrics)  # every scalar reaches it
    assert run.data.params["task"] == "text2image" and run.data.params["max_steps"] == "2"
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any(path.startswith("images/samples") and path.endswith(".png") for path in artifacts), artifacts

    for name, result in zip(("a", "b"), results):  # a second training in the same process: its own W&B run
        losses = [row["train/loss"] for row in wandb_rows(tmp_path / name) if "train/loss" in row]
        assert losses[-1] == pytest.approx(result["train_loss"], rel=1e-5)
        assert (tmp_path / name / "tensorboard").is_dir()
