"""Stable Diffusion 2.x: `model=sd21` (768 px, v-prediction) and `model=sd21_base` (512 px, epsilon).

The hub weights cannot be downloaded here, so their configs are composed and checked key by key, and
a small SD 2.x-shaped v-prediction model saved with `save_pretrained` goes through the same YAML and
loading code: its loss regresses the velocity, every sampler keeps v-prediction, and a real training
run exports a folder that stock `StableDiffusionPipeline.from_pretrained` samples from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from helpers.loss_replay import module_loss, replay
from helpers.modules import collate, toy_items
from helpers.sd2 import tiny_sd2_folder
from helpers.training import CONF_DIR, compose_train, run_train
from mame_lightning.models.components import load_components
from mame_lightning.models.model_card import card_metadata
from mame_lightning.models.schedulers import SCHEDULERS, make_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory) -> Path:
    return tiny_sd2_folder(tmp_path_factory.mktemp("sd2") / "tiny-sd2-v")


@pytest.mark.parametrize("name, hub_id, prediction", [
    ("sd21", "stabilityai/stable-diffusion-2-1", "v_prediction"),
    ("sd21_base", "stabilityai/stable-diffusion-2-1-base", "epsilon"),
])
def test_sd2_model_configs_name_the_hub_weights_and_what_the_unet_predicts(name, hub_id, prediction, tmp_path):
    cfg = compose_train(tmp_path / "run", tmp_path, tmp_path / "prepared", [f"model={name}", "dataset.size=768"],
                        synthetic=False)
    assert cfg.model._target_ == "mame_lightning.models.components.load_components"
    assert cfg.model.pretrained == cfg.model.path == hub_id
    assert cfg.model.prediction_type == prediction
    assert cfg.datamodule.resolution == 768
    assert cfg.model.train_text_encoder is True  # follows the task
    # the model card of such a run names the base model and its licence (SD 2.x: openrail++)
    front = card_metadata({"task": "text2image", "train_config": OmegaConf.to_container(cfg, resolve=True)})
    assert front["base_model"] == hub_id and front["license"] == "openrail++"


def test_the_sd15_config_still_keeps_the_folders_prediction_type(tmp_path):
    cfg = compose_train(tmp_path / "run", tmp_path, tmp_path / "prepared", ["model=sd15"], synthetic=False)
    assert cfg.model.prediction_type is None
    front = card_metadata({"task": "text2image", "train_config": OmegaConf.to_container(cfg, resolve=True)})
    assert front["license"] == "creativeml-openrail-m"


def test_the_tiny_model_can_train_under_the_v_prediction_schedule(tmp_path):
    from mame_lightning.models.components import resolve_noise_schedule

    cfg = compose_train(tmp_path / "run", tmp_path, tmp_path / "prepared", ["model.noise_schedule=sd_v2_v"],
                        synthetic=False)
    schedule = resolve_noise_schedule(cfg.model.noise_schedule)
    assert schedule["prediction_type"] == "v_prediction" and schedule["beta_schedule"] == "scaled_linear"


def test_loading_keeps_or_overrides_the_prediction_type(sd2_folder):
    assert load_components(str(sd2_folder)).noise_scheduler.config.prediction_type == "v_prediction"
    forced = load_components(str(sd2_folder), prediction_type="epsilon", train_text_encoder=False)
    assert forced.noise_scheduler.config.prediction_type == "epsilon"
    with pytest.raises(ValueError, match="model.prediction_type='sample'"):
        load_components(str(sd2_folder), prediction_type="sample")


def test_every_sampler_and_the_sample_grid_pipeline_keep_v_prediction(sd2_folder):
    components = load_components(str(sd2_folder))
    assert components.text_encoder.config.hidden_act == "gelu" and components.unet.config.use_linear_projection
    for name in SCHEDULERS:  # generation, evaluation, the app and the training sample grid build these
        assert make_scheduler(name, components.noise_scheduler.config).config.prediction_type == "v_prediction", name
    assert components.pipeline().scheduler.config.prediction_type == "v_prediction"  # sample grid default


def test_the_training_loss_regresses_the_velocity(sd2_folder):
    from mame_lightning.models.text2image import Text2ImageModule

    module = Text2ImageModule(load_components(str(sd2_folder)), prompt_dropout=0.0)
    batch = collate(toy_items(module.components, n=4))
    loss, parts = module_loss(module, batch, seed=11), replay(module, batch, seed=11)
    assert loss.item() == pytest.approx(F.mse_loss(parts["prediction"], parts["velocity"]).item(), rel=1e-5)
    assert loss.item() != pytest.approx(F.mse_loss(parts["prediction"], parts["epsilon"]).item(), rel=1e-3)


def test_a_set_prepares_at_768_pixels(tmp_path):
    from mame_lightning.data.loading.datamodule import PreparedDataModule
    from mame_lightning.data.prepare.preparation import prepare_from_config
    from mame_lightning.models.tokenizer import build_tokenizer

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("prepare", overrides=[f"paths.root={tmp_path}", "dataset.size=768", "dataset.source.n=6",
                                            "dataset.source.height=128", "dataset.source.width=104",
                                            "dataset.source.progress=false", "preparation.num_workers=0",
                                            "preparation.progress=false"])
    prepare_from_config(cfg, echo=False)
    prepared = Path(cfg.dataset.prepared_dir)
    assert prepared.name == "prepared_768"
    records = [json.loads(line) for line in (prepared / "text2image" / "metadata.jsonl").read_text().splitlines()]
    assert records
    for record in records:
        with Image.open(prepared / "text2image" / record["file_name"]) as image:
            assert image.size == (768, 768)
    data = PreparedDataModule(str(prepared), tokenizer=build_tokenizer(["a", "mammogram"]), batch_size=1,
                              val_fraction=0.0, resolution=768)
    data.setup("fit")
    assert tuple(data.train_dataset[0]["pixel_values"].shape) == (3, 768, 768)


@pytest.mark.slow
def test_a_v_prediction_run_trains_exports_and_stock_diffusers_samples_from_it(sd2_folder, small_prepared, tmp_path):
    from diffusers import StableDiffusionPipeline

    from mame_lightning.pipelines.loading import load_model

    root, prepared = small_prepared
    run = tmp_path / "run"
    run_train(root, prepared, ["model=sd21", f"model.pretrained={sd2_folder}", "trainer.max_steps=2",
                               f"hydra.run.dir={run}"])
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "finished" and result["global_step"] == 2
    export = Path(result["export_dir"])
    assert json.loads((export / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    assert list((run / "tensorboard" / "samples").glob("*.png")), "the training sample grid was drawn"

    pipe = StableDiffusionPipeline.from_pretrained(export, safety_checker=None)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    images = pipe("a mammogram in CC view with small area", num_inference_steps=2, height=64, width=64,
                  output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all() and float(images.std()) > 0
    base = StableDiffusionPipeline.from_pretrained(sd2_folder, safety_checker=None)
    assert any(not torch.equal(a, b) for a, b in zip(base.unet.state_dict().values(), pipe.unet.state_dict().values()))
    assert load_model(export, device="cpu", scheduler="euler").pipe.scheduler.config.prediction_type == "v_prediction"
