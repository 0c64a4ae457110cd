"""Quality during training: the metrics move the right way on crafted images, the collapse guard
alarms and stops, and the callback logs its scalars inside a real (tiny) training run."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers.modules import PROMPTS, adamw, loader, tiny, toy_items, trainer
from helpers.training import run_train
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mame_lightning.data.geometry import apply_image, plan
from mame_lightning.data.synthetic.phantoms import PhantomSpec, render_phantom
from mame_lightning.eval.quality import CollapseGuard, diversity_scores, fidelity_scores, prompt_attributes
from mame_lightning.models.text2image import Text2ImageModule
from mame_lightning.runs.quality import QualityMonitor, stop_reason

CC_SMALL, MLO_BIG = "a mammogram in CC view with small area", "a mammogram in MLO view with big area"


def phantom(view: str, area: str, seed: int, size: int = 64) -> np.ndarray:
    """A phantom as the preparation step leaves it (64 px, chest wall left)."""
    rng = np.random.default_rng(seed)
    spec = PhantomSpec(view=view, area=area, density="ABCD"[seed % 4], laterality="L")
    pixels = (render_phantom(spec, rng).image * 255 + 0.5).astype(np.uint8)
    return apply_image(pixels, plan(*pixels.shape, size, flip=False))


@pytest.fixture(scope="module")
def phantoms():
    return {"cc_small": [phantom("CC", "small", s) for s in range(4)],
            "mlo_big": [phantom("MLO", "big", s + 10) for s in range(4)]}


def expected(*prompts):
    return {p: prompt_attributes(p) for p in prompts}


def test_prompt_attributes_read_view_and_area_from_free_text():
    assert prompt_attributes(CC_SMALL) == {"view": "CC", "area": "small"}
    assert prompt_attributes("a siemens mammogram in MLO view with high density and big area") == \
        {"view": "MLO", "area": "big"}
    assert prompt_attributes("a mammogram in mlo view with very high density") == {"view": "MLO"}
    assert prompt_attributes("a mammogram with a lesion") == {}


def test_identical_images_raise_the_diversity_alarm_and_varied_ones_do_not(phantoms):
    copies = diversity_scores({CC_SMALL: [phantoms["cc_small"][0]] * 4, MLO_BIG: phantoms["mlo_big"]})
    assert copies["per_prompt"][CC_SMALL] == pytest.approx(1.0, abs=1e-6)
    assert copies["diversity"] == pytest.approx(0.0, abs=1e-6) and copies["least_diverse_prompt"] == CC_SMALL
    varied = diversity_scores({CC_SMALL: phantoms["cc_small"], MLO_BIG: phantoms["mlo_big"]})
    assert varied["per_prompt"][CC_SMALL] < 0.95 and varied["diversity"] > 0.05
    assert copies["msssim"] > varied["msssim"]

    guard = CollapseGuard(min_diversity=0.05)
    assert guard.update(1, varied["diversity"], None) == []
    (alarm,) = guard.update(2, copies["diversity"], None, copies["least_diverse_prompt"])
    assert "near copies" in alarm and CC_SMALL in alarm


def test_fidelity_is_high_when_prompts_are_followed_and_at_chance_when_ignored(phantoms):
    followed = fidelity_scores({CC_SMALL: phantoms["cc_small"], MLO_BIG: phantoms["mlo_big"]},
                               expected(CC_SMALL, MLO_BIG))
    assert followed["fidelity"] >= 0.85
    assert followed["attributes"]["area"]["agreement"] == 1.0 and followed["attributes"]["view"]["n"] == 8
    # a generator that ignores its prompt: the very same images whatever was asked
    mixed = phantoms["cc_small"][:2] + phantoms["mlo_big"][:2]
    ignored = fidelity_scores({CC_SMALL: mixed, MLO_BIG: mixed}, expected(CC_SMALL, MLO_BIG))
    assert ignored["fidelity"] == pytest.approx(ignored["chance"])
    assert ignored["attributes"]["view"]["agreement"] == pytest.approx(0.5)  # 2 views: chance 1/2
    assert ignored["attributes"]["area"]["agreement"] == pytest.approx(0.5)
    assert followed["fidelity"] > followed["chance"] + 0.3
    assert fidelity_scores({"a mammogram with a lesion": mixed}, {"a mammogram with a lesion": {}})["fidelity"] is None


def test_the_guard_counts_evaluations_without_fidelity_gain_and_resumes_its_count():
    guard = CollapseGuard(min_diversity=None, patience=2)
    assert guard.update(1, 0.5, 0.50) == [] and guard.update(2, 0.5, 0.75) == []
    assert guard.update(3, 0.5, 0.75) == []  # a tie is no gain: 1 evaluation without
    resumed = CollapseGuard(min_diversity=None, patience=2)
    resumed.load_state_dict(guard.state_dict())
    (alarm,) = resumed.update(4, 0.5, 0.6)
    assert "not improved for 2 evaluations" in alarm and "best 0.750" in alarm
    perfect = CollapseGuard(min_diversity=None, patience=1)
    assert [perfect.update(s, 0.5, 1.0) for s in range(3)] == [[], [], []]  # nothing left to gain


class MeanPool(torch.nn.Module):
    """A stand-in backbone for KID: uint8 Nx3xHxW -> 16 pooled intensities."""

    def forward(self, images):
        return torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 4).mean(1).flatten(1)


def monitor(**options) -> QualityMonitor:
    return QualityMonitor(**{"prompts": PROMPTS[:2], "images_per_prompt": 2, "every_n_steps": 2,
                             "num_inference_steps": 2, "guidance_scale": 3.0, **options})


@pytest.mark.usefixtures("one_thread")
def test_callback_logs_scalars_feeds_the_checkpoint_monitor_and_stops_on_collapse(model_cache, tmp_path):
    m = Text2ImageModule(tiny(model_cache), adamw())
    logger = TensorBoardLogger(tmp_path, name="tb", version="")
    quality = monitor(min_diversity=1.01, stop_on_collapse=True)  # 1 - MS-SSIM <= 1: always an alarm
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="quality/fidelity", mode="max", save_last=True,
                           every_n_train_steps=3, save_top_k=-1)
    fit = trainer(max_steps=6, logger=logger, callbacks=[quality, best], default_root_dir=tmp_path,
                  enable_checkpointing=True)
    fit.fit(m, loader(toy_items(m.components)))
    # checkpoint steps (3) are evaluated too, so the first is scored; the alarm at step 2 ends the run
    assert fit.global_step == 2 and quality.guard.history[0]["step"] == 2
    assert stop_reason(fit).startswith("collapse: diversity")
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 2
    assert saved["callbacks"][quality.state_key]["guard"]["history"][0]["alarms"]
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"quality/msssim", "quality/diversity", "quality/fidelity", "quality/fidelity_chance",
            "quality/fidelity_view", "quality/fidelity_area", f"quality/msssim/{PROMPTS[0]}"} <= set(tags)
    assert [e.step for e in events.Scalars("quality/fidelity")] == [2]
    assert 0.0 <= events.Scalars("quality/fidelity")[0].value <= 1.0
    assert float(fit.callback_metrics["quality/fidelity"]) == pytest.approx(events.Scalars("quality/fidelity")[0].value)
    assert m.unet.training and not m.vae.training


@pytest.mark.usefixtures("one_thread")
def test_checkpoint_steps_are_scored_and_kid_runs_with_a_local_backbone(model_cache, tmp_path):
    m = Text2ImageModule(tiny(model_cache), adamw())
    quality = monitor(every_n_steps=0, kid_feature=MeanPool())
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="quality/fidelity", mode="max", save_top_k=-1,
                           every_n_train_steps=2)
    fit = trainer(max_steps=4, callbacks=[quality, best], default_root_dir=tmp_path, enable_checkpointing=True)
    items = toy_items(m.components)
    quality.real_images(SimpleNamespace(datamodule=SimpleNamespace(val_dataset=items)), m)  # KID's real side
    fit.fit(m, loader(items))
    assert [h["step"] for h in quality.guard.history] == [2, 4]
    assert len(best.best_k_models) == 2  # both checkpoints scored by their own evaluation
    assert Path(best.best_model_path).is_file() and best.best_model_score is not None
    assert np.isfinite(quality.last_scalars["quality/kid"]) and "quality/kid_std" in quality.last_scalars
    assert len(quality._real) == len(items)


@pytest.mark.usefixtures("one_thread")
def test_kid_is_skipped_with_one_line_without_inception_weights(model_cache, tmp_path, caplog):
    m = Text2ImageModule(tiny(model_cache), adamw())
    quality = monitor(kid_weights=str(tmp_path / "missing.pth"))
    fit = trainer(max_steps=2, callbacks=[quality], default_root_dir=tmp_path)
    with caplog.at_level("INFO", logger="mame_lightning.runs.quality"):
        fit.fit(m, loader(toy_items(m.components)))
    skipped = [r.getMessage() for r in caplog.records if "KID skipped" in r.getMessage()]
    assert len(skipped) == 1 and "missing.pth" in skipped[0]
    assert "quality/kid" not in quality.last_scalars and "quality/fidelity" in quality.last_scalars


@pytest.mark.slow
def test_quality_in_a_tiny_training_run_best_export_and_clean_collapse_stop(small_prepared, tmp_path):
    root, prepared = small_prepared
    common = ["trainer.max_steps=4", "callbacks.sample_grid=null", "callbacks.quality.every_n_steps=2",
              "callbacks.quality.images_per_prompt=2", "callbacks.quality.num_inference_steps=2"]
    run = tmp_path / "best"
    proc = run_train(root, prepared, [*common, f"hydra.run.dir={run}", "callbacks.checkpoint.monitor=quality/fidelity",
                                      "callbacks.checkpoint.mode=max", "export.from=best"])
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "finished" and result["export_from"] == "best"
    assert result["monitor"] == "quality/fidelity" and Path(result["checkpoint"]).parent == run / "checkpoints"
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("quality/fidelity")] == [2, 4]
    assert [e.step for e in events.Scalars("quality/diversity")] == [2, 4]
    assert result["score"] == pytest.approx(max(e.value for e in events.Scalars("quality/fidelity")))
    assert (proc.stdout + proc.stderr).count("KID skipped") == 1
    from diffusers import UNet2DConditionModel

    exported = UNet2DConditionModel.from_pretrained(run / "export" / "unet").state_dict()
    best = torch.load(result["checkpoint"], weights_only=True)["state_dict"]
    assert exported.keys() == {k[len("unet."):] for k in best if k.startswith("unet.")}
    assert all(torch.equal(exported[k], best[f"unet.{k}"].float()) for k in exported)

    stopped = tmp_path / "stopped"
    run_train(root, prepared, [*common, f"hydra.run.dir={stopped}", "callbacks.quality.min_diversity=1.01",
                               "callbacks.quality.stop_on_collapse=true"])
    result = json.loads((stopped / "result.json").read_text())
    assert result["status"] == "stopped" and result["reason"].startswith("collapse: diversity")
    assert result["global_step"] == 2 and (stopped / "export" / "model_index.json").is_file()
    assert torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2


def test_export_from_best_needs_a_monitored_checkpoint_and_falls_back_to_last_unscored(tmp_path):
    from omegaconf import OmegaConf

    from mame_lightning.runs.best_checkpoint import ExportChoiceError, check_export_from, restore_for_export

    cfg = OmegaConf.create({"export": {"from": "best"}, "callbacks": {"checkpoint": {"monitor": None}}})
    with pytest.raises(ExportChoiceError, match="callbacks.checkpoint.monitor=quality/fidelity"):
        check_export_from(cfg)
    cfg.export["from"] = "newest"
    with pytest.raises(ExportChoiceError, match="choose from last, best"):
        check_export_from(cfg)
    cfg.export["from"], cfg.callbacks.checkpoint.monitor = "best", "quality/fidelity"
    check_export_from(cfg)
    unscored = SimpleNamespace(checkpoint_callbacks=[ModelCheckpoint(dirpath=tmp_path, monitor="quality/fidelity")])
    assert restore_for_export(cfg, unscored, module=None) == {"export_from": "last", "note": "no scored checkpoint"}
    assert restore_for_export(OmegaConf.create({"export": {"from": "last"}}), unscored, None) == {"export_from": "last"}


@pytest.mark.slow
def test_quality_under_ddp_samples_on_rank_zero_and_every_rank_stops_together(small_prepared, tmp_path):
    """Two CPU processes: rank 0 scores, the scores are broadcast, both ranks checkpoint and stop at the same step."""
    root, prepared = small_prepared
    run = tmp_path / "ddp"
    run_train(root, prepared, ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=4",
                               "callbacks.sample_grid=null", "callbacks.quality.every_n_steps=2",
                               "callbacks.quality.images_per_prompt=2", "callbacks.quality.num_inference_steps=2",
                               "callbacks.checkpoint.monitor=quality/fidelity", "callbacks.checkpoint.mode=max",
                               "callbacks.quality.min_diversity=1.01", "callbacks.quality.stop_on_collapse=true",
                               "export.from=best", f"hydra.run.dir={run}"])
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "stopped" and result["global_step"] == 2 and result["export_from"] == "best"
    assert (run / "export" / "model_index.json").is_file()
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("quality/fidelity")] == [2]  # logged once, by rank 0
