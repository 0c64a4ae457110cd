"""Latent cache: same latents and same loss as encoding pixels, a key that is never stale, reuse."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.prepared_sets import tiny_tokenizer, tiny_vae, write_png, write_prepared
from diffusers.utils.torch_utils import randn_tensor
from torch.utils.data import DataLoader

from mame_lightning.data.loading.datamodule import PreparedDataModule
from mame_lightning.data.loading.prepared_set import PreparedImageDataset
from mame_lightning.data.loading.latent_cache import (
    LatentCacheDataset,
    build_latent_cache,
    cache_key,
    read_index,
)

try:
    from mame_lightning.models.diffusion import latents_from_dist
except ImportError:  # models/diffusion.py not there yet: the same sampling, written here

    def latents_from_dist(mean, logvar, scaling_factor, generator=None):
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + std * noise) * scaling_factor


SIZE = 32


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return write_prepared(tmp_path_factory.mktemp("prepared"), n=12, size=SIZE)


def count_encodes(vae) -> list[int]:
    """Replace vae.encode by a counting wrapper (instance attribute) -> the call list."""
    calls, encode = [], vae.encode

    def counting(*args, **kwargs):
        calls.append(1)
        return encode(*args, **kwargs)

    vae.encode = counting
    return calls


def first_batch(dataset, batch_size=4):
    return next(iter(DataLoader(dataset, batch_size=batch_size, shuffle=False)))


@pytest.mark.parametrize("task", ["text2image", "inpaint"])
def test_cached_distribution_samples_equal_pixel_encoding(prepared, tokenizer, vae, task, tmp_path):
    images = PreparedImageDataset(prepared, task, tokenizer)
    cached = LatentCacheDataset(images, build_latent_cache(vae, images, tmp_path, batch_size=3))
    pixels, latents = first_batch(images), first_batch(cached)
    assert pixels["id"] == latents["id"] and torch.equal(pixels["input_ids"], latents["input_ids"])
    scaling = vae.config.scaling_factor
    pairs = [("pixel_values", "latent")] + ([("masked_pixel_values", "masked_latent")]
                                            if task == "inpaint" else [])
    for pixel_key, latent_key in pairs:
        with torch.no_grad():
            posterior = vae.encode(pixels[pixel_key]).latent_dist
        expected = posterior.sample(torch.Generator().manual_seed(11)) * scaling
        mean, logvar = latents[f"{latent_key}_mean"], latents[f"{latent_key}_logvar"]
        assert mean.shape == (4, 4, SIZE // 2, SIZE // 2) and mean.dtype == torch.float32
        drawn = latents_from_dist(mean, logvar, scaling, torch.Generator().manual_seed(11))
        assert torch.allclose(drawn, expected, atol=1e-6, rtol=0)
        assert not torch.allclose(drawn, mean * scaling, atol=1e-3)  # a real sample, not the mean
    if task == "inpaint":
        assert torch.equal(latents["mask"], pixels["mask"])


def tiny_unet(in_channels: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=SIZE // 2,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=8,
        attention_head_dim=2,
    ).eval()


def inpaint_loss(unet, embed, scheduler, latents, masked_latents, mask, input_ids, generator):
    """One inpainting training step's loss: noise, timesteps, 9-channel UNet input, MSE to noise."""
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    small_mask = F.interpolate(mask, size=latents.shape[-2:])
    model_input = torch.cat([noisy, small_mask, masked_latents], dim=1)
    with torch.no_grad():
        prediction = unet(model_input, timesteps, embed(input_ids)).sample
    return F.mse_loss(prediction, noise)


def test_loss_from_cache_equals_loss_from_pixels(prepared, tokenizer, vae, tmp_path):
    from diffusers import DDPMScheduler

    images = PreparedImageDataset(prepared, "inpaint", tokenizer)
    cached = LatentCacheDataset(images, build_latent_cache(vae, images, tmp_path))
    unet, scheduler = tiny_unet(9), DDPMScheduler(num_train_timesteps=1000)
    embed = torch.nn.Embedding(len(tokenizer), 8)
    scaling = vae.config.scaling_factor
    pixels, latents = first_batch(images), first_batch(cached)

    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        image_latents = vae.encode(pixels["pixel_values"]).latent_dist.sample(generator) * scaling
        masked = vae.encode(pixels["masked_pixel_values"]).latent_dist.sample(generator) * scaling
    from_pixels = inpaint_loss(unet, embed, scheduler, image_latents, masked, pixels["mask"],
                               pixels["input_ids"], generator)

    generator = torch.Generator().manual_seed(3)
    image_latents = latents_from_dist(latents["latent_mean"], latents["latent_logvar"], scaling,
                                      generator)
    masked = latents_from_dist(latents["masked_latent_mean"], latents["masked_latent_logvar"],
                               scaling, generator)
    from_cache = inpaint_loss(unet, embed, scheduler, image_latents, masked, latents["mask"],
                              latents["input_ids"], generator)
    assert from_pixels > 0 and abs(from_pixels.item() - from_cache.item()) < 1e-6


def test_cache_key_tracks_weights_resolution_and_images(tmp_path, vae):
    root = write_prepared(tmp_path / "set", n=4, size=16)
    key = cache_key(vae, 16, root, "inpaint")
    assert cache_key(tiny_vae(seed=0), 16, root / "inpaint", "inpaint") == key
    assert cache_key(tiny_vae(seed=1), 16, root, "inpaint") != key
    assert cache_key(vae, 8, root, "inpaint") != key
    assert cache_key(vae, 16, root, "inpaint", storage_dtype="float16") != key
    image = root / "inpaint" / "images" / "img0002.png"
    write_png(image, np.full((16, 16), 77, np.uint8))
    assert cache_key(vae, 16, root, "inpaint") != key
    changed_image = cache_key(vae, 16, root, "inpaint")
    write_png(root / "inpaint" / "masks" / "img0001.png", np.zeros((16, 16), np.uint8))
    assert cache_key(vae, 16, root, "inpaint") != changed_image


def test_changed_weights_change_the_key(tmp_path, vae):
    root = write_prepared(tmp_path / "set", n=2, size=16)
    other = tiny_vae(seed=0)
    key = cache_key(other, None, root, "text2image")
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-3
    assert cache_key(other, None, root, "text2image") != key


def cached_module(prepared, tokenizer, vae, cache_dir, task="text2image") -> PreparedDataModule:
    options = {"enabled": True, "dir": str(cache_dir), "batch_size": 5, "device": "cpu"}
    datamodule = PreparedDataModule(str(prepared), task=task, tokenizer=tokenizer, batch_size=4,
                                    latent_cache=options, val_fraction=0.2)
    datamodule.set_vae(vae)
    datamodule.setup("fit")
    return datamodule


def test_datamodule_reuses_the_cache_on_second_setup(tmp_path, tokenizer):
    root = write_prepared(tmp_path / "set", n=10, size=SIZE)
    first_vae, second_vae = tiny_vae(seed=0), tiny_vae(seed=0)
    first_calls, second_calls = count_encodes(first_vae), count_encodes(second_vae)
    first = cached_module(root, tokenizer, first_vae, tmp_path / "cache", task="inpaint")
    assert len(first_calls) == 2 * 2  # 10 images in batches of 5, image and masked image
    second = PreparedDataModule(str(root), tokenizer=tokenizer, batch_size=4, task="inpaint",
                                latent_cache={"enabled": True, "dir": str(tmp_path / "cache"),
                                              "vae": second_vae, "device": "cpu"})
    second.setup()
    assert second_calls == [] and second.latent_cache_path == first.latent_cache_path
    assert isinstance(second.train_dataset, LatentCacheDataset)
    assert sorted(read_index(second.latent_cache_path)["ids"]) == [f"img{i:04d}" for i in range(10)]
    write_png(root / "inpaint" / "images" / "img0003.png", np.zeros((SIZE, SIZE), np.uint8))
    third = cached_module(root, tokenizer, second_vae, tmp_path / "cache", task="inpaint")
    assert len(second_calls) == 4 and third.latent_cache_path != first.latent_cache_path


def test_incomplete_cache_is_rebuilt(tmp_path, tokenizer, vae):
    root = write_prepared(tmp_path / "set", n=3, size=16)
    images = PreparedImageDataset(root, "text2image", tokenizer)
    path = build_latent_cache(vae, images, tmp_path / "cache")
    (path / "index.json").unlink()  # as if the run died before finishing
    calls = count_encodes(vae)
    try:
        assert build_latent_cache(vae, images, tmp_path / "cache") == path
    finally:
        del vae.encode
    assert calls and read_index(path) is not None


def test_cached_batches_follow_the_pixel_batches(prepared, tokenizer, vae, tmp_path):
    plain = PreparedDataModule(str(prepared), tokenizer=tokenizer, batch_size=4, val_fraction=0.2)
    plain.setup()
    cached = cached_module(prepared, tokenizer, vae, tmp_path / "cache")
    assert cached.counts() == plain.counts() and cached.attributes() == plain.attributes()
    assert cached.val_dataset.ids == plain.val_dataset.ids
    for pixels, latents in zip(plain.train_dataloader(), cached.train_dataloader()):
        assert pixels["id"] == latents["id"] and set(latents) == {
            "latent_mean", "latent_logvar", "input_ids", "prompt", "id", "index"}
        with torch.no_grad():
            mean = vae.encode(pixels["pixel_values"]).latent_dist.mean
        assert torch.allclose(mean, latents["latent_mean"], atol=1e-6)


def test_worker_processes_read_the_cache(prepared, tokenizer, vae, tmp_path):
    datamodule = cached_module(prepared, tokenizer, vae, tmp_path / "cache", task="inpaint")
    in_process = first_batch(datamodule.train_dataset)
    loader = DataLoader(datamodule.train_dataset, batch_size=4, num_workers=1)
    in_workers = next(iter(loader))
    for key in ("masked_latent_mean", "latent_logvar", "mask", "input_ids"):
        assert torch.equal(in_process[key], in_workers[key])


def test_float16_storage(prepared, tokenizer, vae, tmp_path):
    images = PreparedImageDataset(prepared, "text2image", tokenizer)
    full = LatentCacheDataset(images, build_latent_cache(vae, images, tmp_path))
    half = LatentCacheDataset(images, build_latent_cache(vae, images, tmp_path,
                                                         storage_dtype="float16"))
    assert half[0]["latent_mean"].dtype == torch.float16
    assert torch.allclose(half[0]["latent_mean"].float(), full[0]["latent_mean"], atol=1e-2)


def test_cache_needs_the_vae(prepared, tokenizer, tmp_path):
    datamodule = PreparedDataModule(str(prepared), tokenizer=tokenizer, batch_size=2,
                                    latent_cache={"enabled": True, "dir": str(tmp_path)})
    with pytest.raises(RuntimeError, match="set_vae"):
        datamodule.setup()


def test_boolean_switch_uses_a_folder_beside_the_set(tmp_path, tokenizer, vae):
    root = write_prepared(tmp_path / "set", n=4, size=16)
    datamodule = PreparedDataModule(str(root), tokenizer=tokenizer, batch_size=2, latent_cache=True)
    datamodule.set_vae(vae)
    datamodule.setup()
    assert datamodule.latent_cache_path.parent == root / "latent_cache"
    assert "latent_mean" in datamodule.train_dataset[0]
    off = PreparedDataModule(str(root), tokenizer=tokenizer, batch_size=2, latent_cache=False)
    off.setup()
    assert "pixel_values" in off.train_dataset[0]


class LatentProbe(L.LightningModule):
    """The smallest module that trains on cached latents: checks batches arrive as promised."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[str] = []

    def training_step(self, batch, batch_index):
        self.seen.extend(batch["id"])
        sample = latents_from_dist(batch["latent_mean"], batch["latent_logvar"], 1.0)
        return ((sample - self.weight) ** 2).mean()

    def validation_step(self, batch, batch_index):
        self.log("val/loss", batch["masked_latent_mean"].abs().mean(), batch_size=len(batch["id"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_from_the_cache(prepared, tokenizer, vae, tmp_path):
    datamodule = PreparedDataModule(str(prepared), task="inpaint", tokenizer=tokenizer,
                                    batch_size=4, val_fraction=0.2,
                                    latent_cache={"dir": str(tmp_path), "device": "cpu"})
    datamodule.set_vae(vae)
    probe = LatentProbe()
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(probe, datamodule=datamodule)
    assert len(set(probe.seen)) == 8 and set(probe.seen) <= set(datamodule.train_dataset.ids)
    assert probe.weight.item() != 0 and "val/loss" in trainer.callback_metrics
