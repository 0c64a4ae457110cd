"""Unconditional pixel-space DDPM (task=unconditional model=ddpm_pixel): the module trains, and the
export is a folder that stock diffusers `DDPMPipeline.from_pretrained` loads and samples."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from helpers.modules import trainer
from helpers.training import run_train
from omegaconf import OmegaConf

from mame_lightning import CONF_DIR
from mame_lightning.data.loading.prepared_set import tokenize_prompts
from mame_lightning.models.unconditional import NoPrompt, UnconditionalModule, latent_components, pixel_components

pytestmark = pytest.mark.usefixtures("one_thread")


def components(size: int = 32):
    model = OmegaConf.load(Path(CONF_DIR) / "model" / "ddpm_pixel.yaml")
    schedule = OmegaConf.load(Path(CONF_DIR) / "model" / "noise_schedule" / "ddpm.yaml")
    return pixel_components(unet=model.unet, noise_schedule=schedule, sample_size=size, in_channels=1, seed=0)


def batches(n: int = 4, size: int = 32):
    """Bright half discs on black, as the prepared-set reader gives them (grey repeated into 3 channels)."""
    ys, xs = np.mgrid[0:size, 0:size]
    items = []
    for i in range(n):
        disc = ((xs / (0.5 + 0.1 * i)) ** 2 + (ys - size / 2) ** 2 < (0.4 * size) ** 2).astype(np.float32)
        pixels = torch.from_numpy(disc * 1.6 - 0.8).unsqueeze(0).repeat(3, 1, 1)
        items.append({"pixel_values": pixels, "input_ids": torch.zeros(1, dtype=torch.long)})
    return torch.utils.data.DataLoader(items, batch_size=2)


def test_ddpm_pixel_components_are_one_channel_under_the_ddpm_schedule():
    parts = components(32)
    assert isinstance(parts.unet, UNet2DModel) and parts.unet.config.in_channels == 1
    assert parts.unet.config.out_channels == 1 and parts.unet.config.sample_size == 32
    assert parts.noise_scheduler.config.beta_schedule == "linear" and parts.noise_scheduler.config.clip_sample
    assert tokenize_prompts(NoPrompt(), ["a", "b", "c"]).shape == (3, 1)


def test_unconditional_module_lowers_its_loss_and_samples_one_channel_images():
    module = UnconditionalModule(components(32), functools.partial(torch.optim.AdamW, lr=2e-3))
    data = batches()
    generator = torch.Generator().manual_seed(0)
    before = float(module.compute_loss(next(iter(data)), generator))
    trainer(max_steps=30).fit(module, data)
    after = float(module.compute_loss(next(iter(data)), torch.Generator().manual_seed(0)))
    assert after < before
    images = module.sample([0, 1], num_inference_steps=3)
    assert images.shape == (2, 32, 32, 1) and np.isfinite(images).all()
    assert np.array_equal(images, module.sample([0, 1], num_inference_steps=3))  # seeded
    grid = module.render_samples([0, 1, 2], num_inference_steps=2, scheduler="ddim")
    assert grid.shape == (32, 96, 3) and grid.dtype == np.uint8
    assert module.unet.training


def test_unconditional_refuses_a_text_conditioned_unet(model_cache):
    from helpers.modules import tiny

    with pytest.raises(ValueError, match="model=ddpm_pixel"):
        UnconditionalModule(tiny(model_cache))


@pytest.mark.slow
def test_unconditional_run_exports_a_folder_stock_ddpm_pipeline_samples(small_prepared, tmp_path):
    root, prepared = small_prepared
    run = tmp_path / "run"
    run_train(root, prepared, ["task=unconditional", "model=ddpm_pixel", "trainer.max_steps=4",
                               f"hydra.run.dir={run}"])
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "finished" and result["task"] == "unconditional"
    pipe = DDPMPipeline.from_pretrained(result["export_dir"])
    assert isinstance(pipe.scheduler, DDPMScheduler) and pipe.scheduler.config.beta_schedule == "linear"
    assert pipe.unet.config.in_channels == 1 and pipe.unet.config.sample_size == 64
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=3,
                  output_type="np").images
    assert images.shape == (2, 64, 64, 1) and np.isfinite(images).all() and images.std() > 0
    initial = components(64).unet.state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in pipe.unet.state_dict().items())  # it trained

    from huggingface_hub import ModelCard

    card = ModelCard.load(Path(result["export_dir"]) / "README.md")
    assert card.data.pipeline_tag == "unconditional-image-generation" and "DDPMPipeline" in card.text
    assert list((run / "tensorboard" / "samples").glob("step_*.png")), "the sample grid draws unconditional samples"


def latent_parts(size: int = 32):
    model = OmegaConf.load(Path(CONF_DIR) / "model" / "ldm_unconditional.yaml")
    schedule = OmegaConf.load(Path(CONF_DIR) / "model" / "noise_schedule" / "sd_v1.yaml")
    return latent_components(unet=model.unet, vae=model.vae, noise_schedule=schedule, sample_size=size, seed=0)


def test_latent_unconditional_trains_the_unet_on_frozen_vae_latents():
    parts = latent_parts(32)
    assert parts.unet.config.in_channels == parts.vae.config.latent_channels == 4 and parts.unet.config.sample_size == 8
    module = UnconditionalModule(parts, functools.partial(torch.optim.AdamW, lr=1e-3))
    vae_before = {k: v.clone() for k, v in parts.vae.state_dict().items()}
    unet_before = {k: v.clone() for k, v in parts.unet.state_dict().items()}
    trainer(max_steps=3).fit(module, batches())
    assert all(torch.equal(vae_before[k], v) for k, v in parts.vae.state_dict().items()), "the VAE stays frozen"
    assert any(not torch.equal(unet_before[k], v) for k, v in parts.unet.state_dict().items())
    assert not module.vae.training and module.unet.training
    images = module.sample([0, 1], num_inference_steps=2)
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()


def test_latent_export_loads_in_stock_ldm_pipeline(tmp_path):
    from diffusers import DDIMScheduler, LDMPipeline

    from mame_lightning.models.export import export_pipeline

    module = UnconditionalModule(latent_parts(32), functools.partial(torch.optim.AdamW, lr=1e-3))
    folder = export_pipeline(module, tmp_path / "export", task="unconditional")
    pipe = LDMPipeline.from_pretrained(folder)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.vqvae.config.latent_channels == 4
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
    ours = module.sample([0], num_inference_steps=2, scheduler="ddim")
    again = pipe(batch_size=1, generator=[torch.Generator().manual_seed(0)], num_inference_steps=2, output_type="np").images
    np.testing.assert_allclose(ours, again, atol=1e-5)  # the export is the trained model, decoded the same way


@pytest.mark.slow
def test_pixel_and_latent_runs_compare_in_one_figure(small_prepared, tmp_path):
    """What `make unconditional-compare` runs, at 4 steps: both trainings, then the figure from their folders."""
    import subprocess
    import sys

    from PIL import Image

    root, prepared = small_prepared
    common = ["experiment=unconditional", "trainer.max_steps=4", "export=false"]
    run_train(root, prepared, [*common, "model=ddpm_pixel", f"hydra.run.dir={tmp_path / 'pixel'}"])
    run_train(root, prepared, [*common, "model=ldm_unconditional", f"hydra.run.dir={tmp_path / 'latent'}"])
    out = tmp_path / "pixel_vs_latent.png"
    proc = subprocess.run([sys.executable, "-m", "mame_lightning.runs.unconditional_comparison", f"pixel={tmp_path / 'pixel'}",
                           f"latent={tmp_path / 'latent'}", f"out={out}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["steps_shown"] == [0, 2, 4] and set(summary["runs"]) == {"pixel", "latent"}
    assert all(entry["loss_points"] == 4 and np.isfinite(entry["final_loss"]) for entry in summary["runs"].values())
    with Image.open(out) as figure:
        assert figure.width > 600 and np.asarray(figure.convert("L")).std() > 0
    assert "pixel: 4 logged steps" in proc.stdout
