"""Deep-feature caching of the UNet (accelerate=deepcache): exact at interval 1, deep blocks only on full steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers.generation import SIZE, breast_image
from mame_lightning.pipelines.deep_cache import HOOK_NAME, deep_cache
from mame_lightning.pipelines.generation import GenerationSettings, inpaint, text2image

pytestmark = pytest.mark.usefixtures("one_thread")

TIMESTEPS = [999, 958, 916, 875, 833, 791]


def _inputs(unet, batch: int = 2, seed: int = 0):
    """A classifier-free-guidance batch (2x) of latents and text embeddings for `unet`."""
    g = torch.Generator().manual_seed(seed)
    side = unet.config.sample_size
    sample = torch.randn(batch, unet.config.in_channels, side, side, generator=g)
    text = torch.randn(batch, 8, unet.config.cross_attention_dim, generator=g)
    return sample, text


def _walk(unet, sample, text, timesteps=TIMESTEPS):
    """One UNet call per timestep on the same inputs (enough to compare against the plain UNet)."""
    with torch.inference_mode():
        return [unet(sample, t, encoder_hidden_states=text, return_dict=False)[0] for t in timesteps]


def _counter(module):
    calls = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("fixture", ["t2i_model", "inpaint_model"])
def test_interval_one_is_the_plain_unet(fixture, request):
    unet = request.getfixturevalue(fixture).pipe.unet
    sample, text = _inputs(unet)
    plain = _walk(unet, sample, text)
    with deep_cache(unet, interval=1):
        cached = _walk(unet, sample, text)
    assert all(torch.equal(a, b) for a, b in zip(plain, cached))


@pytest.mark.parametrize("fixture", ["t2i_model", "inpaint_model"])
def test_deep_blocks_run_only_on_full_steps_and_change_the_output_slightly(fixture, request):
    unet = request.getfixturevalue(fixture).pipe.unet
    sample, text = _inputs(unet)
    plain = _walk(unet, sample, text)
    deep, deep_handle = _counter(unet.mid_block.resnets[0])
    lower, lower_handle = _counter(unet.down_blocks[1].resnets[0])
    outer, outer_handle = _counter(unet.up_blocks[-1].resnets[0])
    try:
        with deep_cache(unet, interval=3):
            cached = _walk(unet, sample, text)
    finally:
        for handle in (deep_handle, lower_handle, outer_handle):
            handle.remove()
    assert (len(deep), len(lower), len(outer)) == (2, 2, len(TIMESTEPS))  # full steps: calls 0 and 3
    for index, (a, b) in enumerate(zip(plain, cached)):
        if index % 3 == 0:
            assert torch.equal(a, b)
        else:
            relative = float((a - b).norm() / a.norm())
            assert 0 < relative < 0.5
    assert unet._diffusers_hook.get_hook(HOOK_NAME) is None  # hooks gone after the block
    assert unet.mid_block._diffusers_hook.get_hook(HOOK_NAME) is None


def test_a_new_run_or_a_new_batch_starts_with_a_full_step(t2i_model):
    unet = t2i_model.pipe.unet
    sample, text = _inputs(unet)
    with deep_cache(unet, interval=4) as clock:
        fulls = []
        for t in [999, 900, 999, 900]:  # the timestep goes up: a new image
            _walk(unet, sample, text, [t])
            fulls.append(clock.full)
        single, single_text = _inputs(unet, batch=1)
        _walk(unet, single, single_text, [800])  # same run, other batch shape
        fulls.append(clock.full)
    assert fulls == [True, False, True, False, True]


def test_pipelines_run_with_deepcache_and_stay_close(t2i_model, inpaint_model):
    prompt = "a siemens mammogram in MLO view"
    base = dict(seed=3, steps=6, progress=False)
    plain = text2image(t2i_model, prompt, 2, GenerationSettings(batch_size=2, **base))
    cached = text2image(t2i_model, prompt, 2, GenerationSettings(batch_size=2, accelerate="deepcache", **base))
    exact = text2image(t2i_model, prompt, 2, GenerationSettings(batch_size=2, accelerate="deepcache",
                                                                deepcache_interval=1, **base))
    for p, c, e in zip(plain, cached, exact):
        assert np.array_equal(p.image, e.image)
        diff = np.abs(p.image.astype(int) - c.image.astype(int))
        assert 0 < diff.mean() < 16
    image, mask = breast_image(), np.zeros((SIZE, SIZE), np.uint8)
    mask[16:40, 20:44] = 255
    painted = inpaint(inpaint_model, image, mask, "a mammogram with a lesion", 1, GenerationSettings(**base))[0]
    quick = inpaint(inpaint_model, image, mask, "a mammogram with a lesion", 1,
                    GenerationSettings(accelerate="deepcache", **base))[0]
    diff = np.abs(painted.image.astype(int) - quick.image.astype(int))[mask > 0]
    assert 0 < diff.mean() < 16
    registry = getattr(t2i_model.pipe.unet, "_diffusers_hook", None)
    assert registry is None or registry.get_hook(HOOK_NAME) is None


def test_unknown_accelerate_and_bad_interval_are_refused_by_name():
    with pytest.raises(ValueError, match="accelerate='fast'"):
        GenerationSettings(accelerate="fast")
    with pytest.raises(ValueError, match="deepcache.interval=0"):
        GenerationSettings(accelerate="deepcache", deepcache_interval=0)
