"""Speed switches of training are tested for what they compute, not for speed (that is `make bench`):
the prompt-embedding cache, fused AdamW and channels-last give the losses and updates of the plain path,
and the text-to-image default trains from the latent cache."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers.modules import adamw, collate, tiny, toy_items
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mame_lightning.models.reproducible import step_generator
from mame_lightning.models.text2image import Text2ImageModule
from mame_lightning.models.text_embeddings import PromptEmbeddingCache
from mame_lightning import CONF_DIR

pytestmark = pytest.mark.usefixtures("one_thread")


def frozen_encoder_module(cache, **options):
    return Text2ImageModule(tiny(cache, train_text_encoder=False), adamw(), train_text_encoder=False, **options)


def losses(module, batch, steps=range(3), dropout=0.5) -> list[float]:
    with torch.no_grad():
        return [module.compute_loss(batch, step_generator(7, s, 0, 0, "cpu"), dropout).item() for s in steps]


def test_cached_prompt_embeddings_give_the_encoder_losses_and_skip_its_forward(model_cache):
    cached = frozen_encoder_module(model_cache)
    plain = frozen_encoder_module(model_cache, cache_text_embeddings=False)
    assert cached.prompt_cache is not None and plain.prompt_cache is None
    batch = collate(toy_items(cached.components, n=4))
    assert losses(cached, batch) == pytest.approx(losses(plain, batch), rel=1e-5, abs=1e-7)
    seen = cached.prompt_cache.encoded_rows
    assert 0 < seen <= len(batch["input_ids"]) + 1  # distinct prompts and the empty one, each encoded once
    losses(cached, batch, steps=range(3, 6))
    assert cached.prompt_cache.encoded_rows == seen  # nothing new to encode


def test_a_trained_encoder_is_never_cached(model_cache):
    m = Text2ImageModule(tiny(model_cache), adamw())
    assert m.hparams.train_text_encoder and m.prompt_cache is None


def test_prompt_cache_evicts_the_least_recently_used_prompt():
    calls = []

    def encode(ids):
        calls.append(ids.shape[0])
        return ids.float()[:, :, None].repeat(1, 1, 2)

    cache = PromptEmbeddingCache(encode, max_entries=2)
    a, b, c = torch.tensor([[1, 2]]), torch.tensor([[3, 4]]), torch.tensor([[5, 6]])
    assert torch.equal(cache.embed(torch.cat([a, b, a])), torch.cat([a, b, a]).float()[:, :, None].repeat(1, 1, 2))
    assert calls == [2]  # a and b once each
    cache.embed(a)  # a is now the most recent
    cache.embed(c)  # evicts b
    assert len(cache) == 2
    cache.embed(b)
    assert calls == [2, 1, 1]
    with pytest.raises(ValueError, match="max_entries"):
        PromptEmbeddingCache(encode, max_entries=0)


def test_the_shipped_adamw_is_fused_and_steps_like_the_per_tensor_default():
    node = OmegaConf.load(Path(CONF_DIR) / "optimizer" / "adamw.yaml")
    assert node.fused is True
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(33, 7)), torch.nn.Parameter(torch.randn(5))]
    twins = copy.deepcopy(weights)
    fused = instantiate(node)(weights)
    plain = torch.optim.AdamW(twins, lr=node.lr, betas=tuple(node.betas), weight_decay=node.weight_decay, eps=node.eps)
    assert fused.defaults["fused"] is True
    for step in range(3):
        grads = [torch.randn_like(w) for w in weights]
        for w, t, g in zip(weights, twins, grads):
            w.grad, t.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
    for w, t in zip(weights, twins):
        torch.testing.assert_close(w, t, rtol=1e-5, atol=1e-7)


def conv_weight(module: torch.nn.Module) -> torch.Tensor:
    return next(w for w in module.parameters() if w.ndim == 4)


def test_channels_last_gives_the_same_loss(model_cache):
    batch = collate(toy_items(tiny(model_cache), n=2))
    plain = Text2ImageModule(tiny(model_cache), adamw())
    nhwc = Text2ImageModule(tiny(model_cache), adamw(), channels_last=True)
    assert conv_weight(nhwc.unet).is_contiguous(memory_format=torch.channels_last)
    assert losses(nhwc, batch) == pytest.approx(losses(plain, batch), rel=1e-4, abs=1e-6)


def test_the_default_frozen_vae_is_channels_last_and_encodes_pixels_to_the_same_loss(model_cache):
    batch = collate(toy_items(tiny(model_cache), n=2))
    default = Text2ImageModule(tiny(model_cache), adamw())
    nchw = Text2ImageModule(tiny(model_cache), adamw(), vae_channels_last=False)
    assert "pixel_values" in batch and "latent_mean" not in batch  # the VAE encodes in every loss below
    assert conv_weight(default.vae).is_contiguous(memory_format=torch.channels_last)
    assert not conv_weight(nchw.vae).is_contiguous(memory_format=torch.channels_last)
    assert conv_weight(default.unet).is_contiguous()  # the UNet's weights keep their layout unless channels_last
    assert losses(default, batch) == pytest.approx(losses(nchw, batch), rel=1e-4, abs=1e-6)


def test_the_text_to_image_default_trains_from_the_latent_cache(tmp_path):
    from helpers.training import compose_train

    t2i = compose_train(tmp_path / "a", tmp_path, tmp_path / "prepared")
    inpaint = compose_train(tmp_path / "b", tmp_path, tmp_path / "prepared", ["task=inpaint", "model.inpaint=true"])
    assert t2i.datamodule.latent_cache is True and t2i.task.module.cache_text_embeddings is True
    assert inpaint.datamodule.latent_cache is False  # random masks need the pixels
    assert compose_train(tmp_path / "c", tmp_path, tmp_path / "prepared",
                         ["dataset.latent_cache=false"]).datamodule.latent_cache is False
