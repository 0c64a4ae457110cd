"""Diffusion training arithmetic, checked against diffusers' schedulers and inpainting pipeline."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionInpaintPipeline
from omegaconf import OmegaConf

from mame_lightning.models import components as comp
from mame_lightning.models.diffusion import (
    diffusion_loss,
    diffusion_target,
    drop_prompts,
    encode_latents,
    inpaint_unet_input,
    latents_from_dist,
    mask_to_latent,
    masked_pixels,
    noisy_latents,
    sample_noise,
    sample_timesteps,
    snr_weights,
)

CONF = Path(comp.__file__).parents[1] / "conf"


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def scheduler():
    return DDPMScheduler(**comp.load_noise_schedule())


@pytest.fixture(scope="module")
def inpaint(tmp_path_factory):
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "tiny.yaml"))
    for key in ("_target_", "cache_dir", "inpaint"):
        cfg.pop(key)
    return comp.tiny_components(tmp_path_factory.mktemp("models"), inpaint=True, **cfg)


def manual_alphas(scheduler, timesteps):
    a = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    return a.sqrt(), (1 - a).sqrt()


def test_sample_noise_offset_shifts_each_channel_by_a_constant():
    latents = torch.zeros(3, 4, 8, 8)
    plain = sample_noise(latents, gen(1))
    assert torch.equal(plain, torch.randn(3, 4, 8, 8, generator=gen(1)))
    shifted = sample_noise(latents, gen(1), offset=0.1)
    delta = shifted - plain
    assert delta.abs().max() > 0
    assert torch.allclose(delta, delta[:, :, :1, :1].expand_as(delta), atol=1e-6)
    g = gen(1)
    torch.randn(3, 4, 8, 8, generator=g)  # the noise is drawn first, then the shift
    expected_shift = 0.1 * torch.randn(3, 4, 1, 1, generator=g)
    assert torch.allclose(delta[:, :, :1, :1], expected_shift, atol=1e-6)


def test_sample_timesteps_are_uniform_longs_in_range():
    steps = sample_timesteps(20000, 1000, "cpu", gen(2))
    assert steps.dtype == torch.long and steps.shape == (20000,)
    assert steps.min() >= 0 and steps.max() <= 999
    assert abs(steps.float().mean().item() - 499.5) < 10
    counts = torch.bincount(steps // 100, minlength=10).float() / 20000
    assert torch.allclose(counts, torch.full((10,), 0.1), atol=0.015)
    assert torch.equal(steps, sample_timesteps(20000, 1000, "cpu", gen(2)))


def test_noisy_latents_follow_the_forward_process(scheduler):
    latents, noise = torch.randn(4, 4, 8, 8, generator=gen(3)), torch.randn(4, 4, 8, 8, generator=gen(4))
    timesteps = torch.tensor([0, 250, 500, 999])
    a, s = manual_alphas(scheduler, timesteps)
    assert torch.allclose(noisy_latents(scheduler, latents, noise, timesteps), a * latents + s * noise, atol=1e-5)


def test_diffusion_target_epsilon_and_velocity():
    latents, noise = torch.randn(4, 4, 8, 8, generator=gen(5)), torch.randn(4, 4, 8, 8, generator=gen(6))
    timesteps = torch.tensor([1, 100, 600, 999])
    eps = DDPMScheduler(**comp.load_noise_schedule())
    assert torch.equal(diffusion_target(eps, latents, noise, timesteps), noise)
    v = DDPMScheduler(**{**comp.load_noise_schedule(), "prediction_type": "v_prediction"})
    target = diffusion_target(v, latents, noise, timesteps)
    assert torch.equal(target, v.get_velocity(latents, noise, timesteps))
    a, s = manual_alphas(v, timesteps)
    assert torch.allclose(target, a * noise - s * latents, atol=1e-5)
    with pytest.raises(ValueError, match="sample"):
        diffusion_target(DDPMScheduler(**{**comp.load_noise_schedule(), "prediction_type": "sample"}), latents, noise, timesteps)


def test_min_snr_weights(scheduler):
    timesteps = torch.arange(0, 1000, 7)
    acp = scheduler.alphas_cumprod[timesteps]
    snr = acp / (1 - acp)
    eps = snr_weights(scheduler, timesteps, 5.0, "epsilon")
    assert torch.allclose(eps, torch.clamp(snr, max=5.0) / snr, rtol=1e-4)
    assert (eps[1:] >= eps[:-1] - 1e-6).all(), "weights grow with noise level"
    assert torch.allclose(eps[snr <= 5.0], torch.ones(int((snr <= 5.0).sum())))
    assert (eps[snr > 5.0] < 1).all()
    v = snr_weights(scheduler, timesteps, 5.0, "v_prediction")
    assert torch.allclose(v, torch.clamp(snr, max=5.0) / (snr + 1), rtol=1e-4)
    with pytest.raises(ValueError):
        snr_weights(scheduler, timesteps, 5.0, "sample")


def test_diffusion_loss_plain_and_weighted(scheduler):
    pred, target = torch.randn(4, 4, 8, 8, generator=gen(7)), torch.randn(4, 4, 8, 8, generator=gen(8))
    timesteps = torch.tensor([2, 50, 400, 990])
    assert torch.allclose(diffusion_loss(pred, target), F.mse_loss(pred, target))
    assert torch.allclose(diffusion_loss(pred, target, 1e9, scheduler, timesteps), F.mse_loss(pred, target))
    weighted = diffusion_loss(pred, target, 5.0, scheduler, timesteps)
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    expected = (per_sample * snr_weights(scheduler, timesteps, 5.0, "epsilon")).mean()
    assert torch.allclose(weighted, expected) and not torch.allclose(weighted, F.mse_loss(pred, target))
    assert diffusion_loss(pred.half(), target.half()).dtype == torch.float32
    with pytest.raises(ValueError, match="scheduler"):
        diffusion_loss(pred, target, 5.0)


def test_latents_from_dist_matches_the_vae_posterior_sample(inpaint):
    vae = inpaint.vae
    pixels = torch.rand(2, 3, 64, 64, generator=gen(9)) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
    direct = encode_latents(vae, pixels, gen(10))
    cached = latents_from_dist(dist.mean, dist.logvar, vae.config.scaling_factor, gen(10))
    assert direct.shape == (2, 4, 16, 16) and not direct.requires_grad
    assert torch.allclose(direct, cached, atol=1e-6)
    assert not torch.allclose(direct, dist.mean * vae.config.scaling_factor, atol=1e-3)
    wide = latents_from_dist(torch.zeros(1, 4, 64, 64), torch.full((1, 4, 64, 64), 2 * torch.log(torch.tensor(3.0))),
                             0.5, gen(11))
    assert wide.std().item() == pytest.approx(1.5, rel=0.05)


def test_mask_to_latent_and_masked_pixels():
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:32, 8:40] = 1
    small = mask_to_latent(mask, (16, 16))
    expected = torch.zeros(1, 1, 16, 16)
    expected[..., 4:8, 2:10] = 1
    assert torch.equal(small, expected) and torch.equal(mask_to_latent(mask, 16), expected)
    pixels = torch.rand(1, 3, 64, 64) + 0.1
    masked = masked_pixels(pixels, mask)
    assert (masked[..., 16:32, 8:40] == 0).all()
    assert torch.equal(masked * (1 - mask), pixels * (1 - mask))
    assert (masked_pixels(pixels, torch.full_like(mask, 0.5)) == 0).all()


def test_inpaint_unet_input_matches_the_diffusers_inpainting_pipeline(inpaint):
    pipe = inpaint.pipeline()
    assert isinstance(pipe, StableDiffusionInpaintPipeline)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    image01 = torch.rand(1, 3, 64, 64, generator=gen(12))  # the pipeline takes [0, 1] and maps it to [-1, 1]
    image = image01 * 2 - 1
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 20:44, 12:36] = 1
    start = torch.randn(1, 4, 16, 16, generator=gen(13))
    try:
        pipe("a mammogram with lesion", image=image01, mask_image=mask, latents=start, num_inference_steps=1,
             guidance_scale=1.0, height=64, width=64, generator=gen(14), output_type="latent")
    finally:
        hook.remove()
    got = seen[0]
    assert got.shape == (1, 9, 16, 16)

    mask_latent = mask_to_latent(mask, start.shape[-2:])
    masked_latents = encode_latents(inpaint.vae, masked_pixels(image, mask), gen(14))
    noisy = start * pipe.scheduler.init_noise_sigma
    assert torch.equal(got[:, 4:5], mask_latent)
    assert torch.allclose(got[:, 5:], masked_latents, atol=1e-6)
    assert torch.allclose(got, inpaint_unet_input(noisy, mask_latent, masked_latents), atol=1e-6)


def test_drop_prompts_replaces_whole_rows_at_the_given_rate():
    ids = torch.arange(1, 8).repeat(20000, 1)
    empty = torch.tensor([0, 9, 9, 9, 9, 9, 9])
    assert torch.equal(drop_prompts(ids, empty, 0.0, gen(15)), ids)
    assert (drop_prompts(ids, empty, 1.0, gen(15)) == empty).all()
    out = drop_prompts(ids, empty.unsqueeze(0), 0.3, gen(15))
    dropped = (out == empty).all(dim=1)
    kept = (out == ids).all(dim=1)
    assert (dropped | kept).all()
    assert dropped.float().mean().item() == pytest.approx(0.3, abs=0.015)
    assert torch.equal(out, drop_prompts(ids, empty, 0.3, gen(15)))
    with pytest.raises(ValueError):
        drop_prompts(ids, empty, 1.5)

