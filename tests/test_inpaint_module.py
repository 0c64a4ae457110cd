"""InpaintModule: the 9-channel UNet input in the pipeline's order, both batch forms, and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.modules import SIZE, adamw, collate, loader, same_weights, tiny, toy_items, trainer, weights

from mame_lightning.models.inpaint import InpaintModule
from mame_lightning.models.text2image import step_generator

pytestmark = pytest.mark.usefixtures("one_thread")


def module(cache, **options):
    return InpaintModule(tiny(cache, inpaint=True), adamw(), **options)


def capture_unet_input(m, record: dict):
    return m.unet.register_forward_pre_hook(lambda mod, args: record.update(x=args[0].detach().clone()))


def cached_batch(m, items) -> dict:
    """Latent-cache form; the masked image's posterior has (almost) no variance so its latents are known."""
    batch = collate(items)
    with torch.no_grad():
        image = m.vae.encode(batch["pixel_values"]).latent_dist
        masked = m.vae.encode(batch["masked_pixel_values"]).latent_dist
    return {
        "latent_mean": image.mean, "latent_logvar": image.logvar,
        "masked_latent_mean": masked.mean, "masked_latent_logvar": torch.full_like(masked.logvar, -30.0),
        "mask": batch["mask"], "input_ids": batch["input_ids"],
    }


def test_unet_gets_noisy_latents_mask_and_masked_image_latents_in_that_order(model_cache):
    m = module(model_cache)
    batch = cached_batch(m, toy_items(m.components, inpaint=True))
    record = {}
    capture_unet_input(m, record)
    with torch.no_grad():
        m.compute_loss(batch, step_generator(0, 0, 0, 0, "cpu"), 0.0)
    x = record["x"]
    assert x.shape == (4, 9, SIZE // 4, SIZE // 4)
    mask_latent = F.interpolate(batch["mask"], size=x.shape[-2:])
    assert mask_latent.sum() > 0 and torch.equal(x[:, 4:5], mask_latent)
    scaling = m.vae.config.scaling_factor
    assert torch.allclose(x[:, 5:9], batch["masked_latent_mean"] * scaling, atol=1e-4)
    assert not torch.allclose(x[:, :4], batch["masked_latent_mean"] * scaling, atol=1e-2)


def test_cached_and_pixel_inpaint_batches_give_the_same_loss(model_cache):
    m = module(model_cache)
    items = toy_items(m.components, inpaint=True)
    pixels = collate(items)
    cached = cached_batch(m, items)
    with torch.no_grad():
        cached["masked_latent_logvar"] = m.vae.encode(pixels["masked_pixel_values"]).latent_dist.logvar
        a = m.compute_loss(pixels, step_generator(1, 2, 0, 0, "cpu"), 0.1)
        b = m.compute_loss(cached, step_generator(1, 2, 0, 0, "cpu"), 0.1)
    assert a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-6)


def test_masked_pixels_are_derived_when_the_batch_lacks_them(model_cache):
    m = module(model_cache)
    batch = collate(toy_items(m.components, inpaint=True))
    without = {k: v for k, v in batch.items() if k != "masked_pixel_values"}
    with torch.no_grad():
        a = m.compute_loss(batch, step_generator(0, 0, 0, 0, "cpu"), 0.0)
        b = m.compute_loss(without, step_generator(0, 0, 0, 0, "cpu"), 0.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_inpaint_training_updates_the_unet_and_keeps_the_vae(model_cache):
    m = module(model_cache)
    vae, unet = weights(m.vae), weights(m.unet)
    fit = trainer(max_steps=2)
    fit.fit(m, loader(toy_items(m.components, inpaint=True)))
    assert fit.global_step == 2
    assert same_weights(vae, weights(m.vae)) and not same_weights(unet, weights(m.unet))


def test_a_four_channel_unet_is_refused_with_the_fix(model_cache):
    with pytest.raises(ValueError, match=r"9 input channels.*has 4.*model=sd15_inpaint"):
        InpaintModule(tiny(model_cache), adamw())


def test_a_batch_without_mask_is_refused(model_cache):
    m = module(model_cache)
    batch = collate(toy_items(m.components, inpaint=True))
    del batch["mask"]
    with pytest.raises(KeyError, match="mask"):
        m.compute_loss(batch, step_generator(0, 0, 0, 0, "cpu"), 0.0)


def test_latent_cache_training_matches_pixel_training_with_the_datamodule(model_cache, tmp_path):
    from helpers.prepared_sets import write_prepared

    from mame_lightning.data.loading.datamodule import PreparedDataModule

    prepared = write_prepared(tmp_path / "prepared", n=8, size=SIZE)
    runs = []
    for cache in (None, {"enabled": True}):
        m = module(model_cache)
        data = PreparedDataModule(str(prepared), task="inpaint", tokenizer=m.tokenizer, batch_size=2,
                                  val_fraction=0.0, latent_cache=cache)
        data.set_vae(m.vae)
        trainer(max_steps=2).fit(m, datamodule=data)
        runs.append(weights(m.unet))
    assert all(torch.allclose(runs[0][k], runs[1][k], atol=1e-6) for k in runs[0])
    assert not same_weights(runs[0], weights(tiny(model_cache, inpaint=True).unet))


def test_random_masks_reach_the_unet_with_their_masked_image_encoded(model_cache):
    m = module(model_cache, masks={"lesion": 0.0, "box": 1.0, "keep_lesion": False})
    batch = collate(toy_items(m.components, inpaint=True))
    record, draw = {}, m.training_masks
    capture_unet_input(m, record)
    m.training_masks = lambda *args: record.setdefault("masks", draw(*args))
    with torch.no_grad():
        m.compute_loss(batch, step_generator(0, 3, 0, 0, "cpu"), 0.0)
    x, (drawn, was_drawn) = record["x"], record["masks"]
    assert was_drawn and not torch.equal(drawn, batch["mask"])
    assert torch.equal(x[:, 4:5], F.interpolate(drawn, size=x.shape[-2:]))
    # the masked-image channels hold the encoding of the image blanked under the drawn mask
    with torch.no_grad():
        blanked = m.vae.encode(batch["pixel_values"] * (drawn < 0.5)).latent_dist.mean
        stale = m.vae.encode(batch["masked_pixel_values"]).latent_dist.mean
    scaling = m.vae.config.scaling_factor
    assert (x[:, 5:9] - blanked * scaling).abs().mean() < (x[:, 5:9] - stale * scaling).abs().mean()


def test_lesion_only_masks_draw_nothing_and_random_masks_are_reproducible(model_cache):
    m = module(model_cache)
    batch = collate(toy_items(m.components, inpaint=True))
    masks, drawn = m.training_masks(batch, step_generator(0, 0, 0, 0, "cpu"))
    assert masks is batch["mask"] and not drawn
    mixed = module(model_cache, masks={"lesion": 0.5, "stroke": 0.5})
    with torch.no_grad():
        a = mixed.compute_loss(batch, step_generator(5, 1, 0, 0, "cpu"), 0.1)
        b = mixed.compute_loss(batch, step_generator(5, 1, 0, 0, "cpu"), 0.1)
    assert a.item() == b.item()


def test_random_masks_without_pixels_name_the_setting(model_cache):
    m = module(model_cache, masks={"lesion": 0.0, "box": 1.0})
    batch = cached_batch(m, toy_items(m.components, inpaint=True))
    with pytest.raises(KeyError, match="pixels: true"):
        m.compute_loss(batch, step_generator(0, 0, 0, 0, "cpu"), 0.0)


def test_conv_in_gets_its_own_learning_rate(model_cache):
    m = module(model_cache, conv_in_lr_scale=10.0)
    groups = m.configure_optimizers()["optimizer"].param_groups
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-2])
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in m.unet.conv_in.parameters()}
    assert len(module(model_cache).configure_optimizers()["optimizer"].param_groups) == 1

