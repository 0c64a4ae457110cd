"""Callbacks: sample grids (PNG + TensorBoard), training statistics, the non-finite guard."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from helpers.modules import PROMPTS, SIZE, adamw, loader, tiny, toy_items, trainer
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mame_lightning.models.callbacks import (
    FiniteCheckpointGuard, SampleGrid, TrainingStats, gradient_norm,
)
from mame_lightning.models.inpaint import InpaintModule
from mame_lightning.models.text2image import Text2ImageModule

pytestmark = pytest.mark.usefixtures("one_thread")


def grid_callback(**options) -> SampleGrid:
    options = {"prompts": PROMPTS[:2], "seeds": [0, 1, 2], "every_n_steps": 1, "guidance_scale": 3.0,
               "num_inference_steps": 2, **options}
    return SampleGrid(**options)


def test_sample_grid_writes_pngs_and_logs_to_tensorboard(model_cache, tmp_path):
    m = Text2ImageModule(tiny(model_cache), adamw())
    logger = TensorBoardLogger(tmp_path, name="tb", version="")
    fit = trainer(max_steps=2, logger=logger, callbacks=[grid_callback()], default_root_dir=tmp_path)
    fit.fit(m, loader(toy_items(m.components)))
    pngs = sorted((tmp_path / "tb" / "samples").glob("step_*.png"))
    assert [p.name for p in pngs] == ["step_000000.png", "step_000001.png", "step_000002.png"]
    with Image.open(pngs[-1]) as image:
        assert image.size == (3 * SIZE, 2 * SIZE)  # columns: seeds, rows: prompts
        array = np.asarray(image)
    assert array.std() > 0
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert "samples" in events.Tags()["images"]
    logged = events.Images("samples")
    assert [e.step for e in logged] == [0, 1, 2]
    assert (logged[0].width, logged[0].height) == (3 * SIZE, 2 * SIZE)
    assert m.unet.training and not m.vae.training


def test_sample_grid_is_seeded_and_uses_the_ema_weights(model_cache):
    m = Text2ImageModule(tiny(model_cache), adamw(), ema={"decay": 0.5})
    grid = grid_callback(seeds=[3])
    plain = grid.render(m)
    assert np.array_equal(plain, grid.render(m))
    seen = {}
    m.unet.register_forward_pre_hook(lambda mod, args: seen.update(w=mod.conv_in.weight.detach().clone()))
    raw = m.unet.conv_in.weight.detach().clone()
    with torch.no_grad():
        m.ema.shadow_params = [p + 0.05 for p in m.ema.shadow_params]
    averaged = grid.render(m)
    conv_in = dict(m.unet.named_parameters())["conv_in.weight"]
    index = [name for name, _ in m.unet.named_parameters()].index("conv_in.weight")
    assert torch.equal(seen["w"], m.ema.shadow_params[index])  # sampled with the average
    assert torch.equal(conv_in, raw)  # and put back afterwards
    assert not np.array_equal(plain, averaged)
    assert m.unet.training


def test_sample_grid_uses_the_negative_prompt_and_the_named_scheduler(model_cache, monkeypatch):
    m = Text2ImageModule(tiny(model_cache), adamw())
    plain = grid_callback(seeds=[0]).render(m)
    assert not np.array_equal(plain, grid_callback(seeds=[0], negative_prompt="white background").render(m))
    used = []
    original = m.components.pipeline
    monkeypatch.setattr(m.components, "pipeline", lambda scheduler=None: used.append(scheduler) or original(scheduler))
    ddim = grid_callback(seeds=[0], scheduler="ddim").render(m)
    assert type(used[-1]).__name__ == "DDIMScheduler" and not np.array_equal(plain, ddim)
    with pytest.raises(ValueError, match="scheduler 'fancy'"):
        grid_callback(scheduler="fancy")


def test_inpaint_grid_uses_a_validation_image_and_mask(model_cache, tmp_path):
    m = InpaintModule(tiny(model_cache, inpaint=True), adamw())
    items = toy_items(m.components, inpaint=True)
    callback = grid_callback(every_n_steps=0, at_end=False)
    fit = trainer(max_steps=1, callbacks=[callback], default_root_dir=tmp_path)
    fit.fit(m, loader(items), loader(items))
    with Image.open(tmp_path / "samples" / "step_000000.png") as image:
        assert image.size == (3 * SIZE, 2 * SIZE)
    image, mask = callback.reference(m.components, m, fit)
    assert image.size == (SIZE, SIZE)
    assert np.array_equal(np.asarray(mask) > 127, items[0]["mask"][0].numpy() > 0.5)


def test_inpaint_reference_from_a_latent_cache_is_decoded(model_cache):
    m = InpaintModule(tiny(model_cache, inpaint=True), adamw())
    item = toy_items(m.components, inpaint=True)[1]
    with torch.no_grad():
        mean = m.vae.encode(item["pixel_values"][None]).latent_dist.mean[0]
    cached = [{"latent_mean": mean, "latent_logvar": torch.zeros_like(mean), "mask": item["mask"]}]
    fake_trainer = SimpleNamespace(datamodule=None, val_dataloaders=None, train_dataloader=loader(cached))
    image, mask = SampleGrid.reference_from_data(m.components, m, fake_trainer)
    assert image.size == mask.size == (SIZE, SIZE)
    assert np.array_equal(np.asarray(mask) > 127, item["mask"][0].numpy() > 0.5)


@pytest.mark.parametrize("frozen_dtype", ["float16", "bfloat16"])
def test_sampling_works_with_a_half_precision_frozen_vae(model_cache, frozen_dtype):
    m = Text2ImageModule(tiny(model_cache, frozen_dtype=frozen_dtype), adamw())
    grid = grid_callback(seeds=[0]).render(m)
    assert grid.shape == (2 * SIZE, SIZE, 3) and grid.std() > 0
    assert m.vae.dtype == getattr(torch, frozen_dtype)


def test_inpaint_grid_without_masks_says_what_it_needs(model_cache):
    m = InpaintModule(tiny(model_cache, inpaint=True), adamw())
    with pytest.raises(ValueError, match="inpaint_image and inpaint_mask"):
        grid_callback().render(m)


def test_training_stats_logs_throughput_memory_and_grad_norm(model_cache):
    m = Text2ImageModule(tiny(model_cache), adamw())
    fit = trainer(max_steps=2, log_every_n_steps=1, callbacks=[TrainingStats()])
    fit.fit(m, loader(toy_items(m.components)))
    metrics = fit.callback_metrics
    assert metrics["perf/images_per_s"] > 0
    assert metrics["perf/peak_mem_mb"] > 10
    assert metrics["train/grad_norm"] > 0


def test_training_stats_measure_only_on_logged_steps(model_cache, monkeypatch):
    """The gradient norm is a pass over every gradient: taken on the steps Lightning logs, not on every step."""
    import mame_lightning.models.callbacks as callbacks

    calls = []
    monkeypatch.setattr(callbacks, "gradient_norm", lambda module: calls.append(1) or torch.tensor(1.0))
    m = Text2ImageModule(tiny(model_cache), adamw())
    fit = trainer(max_steps=6, log_every_n_steps=3, callbacks=[TrainingStats()])
    fit.fit(m, loader(toy_items(m.components)))
    assert len(calls) == 2  # steps 3 and 6
    assert "train/lr" in fit.callback_metrics


def test_gradient_norm_is_the_total_l2_norm_of_trainable_grads():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[1].requires_grad_(False)
    model(torch.randn(5, 3)).pow(2).sum().backward()
    expected = torch.cat([p.grad.flatten() for p in model[0].parameters()]).norm()
    assert gradient_norm(model).item() == pytest.approx(expected.item(), rel=1e-6)


def test_checkpoint_guard_refuses_non_finite_weights(model_cache, tmp_path):
    m = Text2ImageModule(tiny(model_cache), adamw())
    fit = trainer(max_steps=1, callbacks=[FiniteCheckpointGuard()])
    fit.fit(m, loader(toy_items(m.components)))
    fit.save_checkpoint(tmp_path / "good.ckpt")
    assert torch.load(tmp_path / "good.ckpt", map_location="cpu", weights_only=False)["global_step"] == 1
    with torch.no_grad():
        m.unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"refusing to save.*conv_in\.weight"):
        fit.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()
