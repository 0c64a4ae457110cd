"""AutoencoderModule: the VAE learns to reconstruct, nothing else is touched, logs and errors."""

from __future__ import annotations

import pytest
import torch
from helpers.modules import adamw, collate, loader, same_weights, tiny, toy_items, trainer, weights

from mame_lightning.models.autoencoder import AutoencoderModule
from mame_lightning.models.text2image import step_generator

pytestmark = pytest.mark.usefixtures("one_thread")


def reconstruction(m, batch) -> float:
    with torch.no_grad():
        return m.losses(batch, step_generator(5, 0, 0, 0, "cpu"))[0].item()


def test_reconstruction_loss_goes_down(model_cache):
    components = tiny(model_cache)
    m = AutoencoderModule(components, adamw(3e-3))
    items = toy_items(components)
    batch = collate(items)
    unet = weights(components.unet)
    before = reconstruction(m, batch)
    fit = trainer(max_steps=25)
    fit.fit(m, loader(items, batch_size=4))
    after = reconstruction(m, batch)
    assert after < 0.7 * before, (before, after)
    assert same_weights(unet, weights(components.unet))
    assert {"train/loss", "train/rec", "train/kl"} <= set(fit.callback_metrics)


def test_only_the_vae_is_optimised_and_validation_logs_rec(model_cache):
    components = tiny(model_cache, frozen_dtype="float16")
    m = AutoencoderModule(components, adamw(), loss="mse", kl_weight=1e-3)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in m.vae.parameters())
    items = toy_items(components)
    fit = trainer(max_steps=1)
    fit.fit(m, loader(items))
    optimized = {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in components.vae.parameters()}
    first = fit.validate(m, loader(items), verbose=False)[0]
    assert first["val/rec"] > 0 and first == fit.validate(m, loader(items), verbose=False)[0]


def test_loss_is_reconstruction_plus_weighted_kl(model_cache):
    components = tiny(model_cache)
    fit = trainer(max_steps=1)
    fit.fit(AutoencoderModule(components, adamw(), kl_weight=0.5), loader(toy_items(components)))
    metrics = fit.callback_metrics
    assert metrics["train/kl"] > 0
    expected = metrics["train/rec"] + 0.5 * metrics["train/kl"]
    assert metrics["train/loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_bad_options_and_batches_are_refused(model_cache):
    components = tiny(model_cache)
    with pytest.raises(ValueError, match="loss"):
        AutoencoderModule(components, adamw(), loss="huber")
    m = AutoencoderModule(components, adamw())
    with pytest.raises(KeyError, match="latent_cache=false"):
        m.losses({"latent_mean": torch.zeros(1, 4, 8, 8)}, step_generator(0, 0, 0, 0, "cpu"))


def test_fitted_scaling_factor_gives_unit_variance_latents(model_cache):
    from mame_lightning.models.autoencoder import fit_scaling_factor

    components = tiny(model_cache)
    items = toy_items(components)
    batches = [collate(items)]
    factor = fit_scaling_factor(components.vae, batches)
    with torch.no_grad():
        posterior = components.vae.encode(batches[0]["pixel_values"]).latent_dist
        latents = posterior.sample(torch.Generator().manual_seed(1)) * factor
    assert 0.8 < float(latents.std()) < 1.25
    assert abs(factor - components.vae.config.scaling_factor) > 1e-3  # measured, not the default
    with pytest.raises(ValueError, match="no batches"):
        fit_scaling_factor(components.vae, [])
