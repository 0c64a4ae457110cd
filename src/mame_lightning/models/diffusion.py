"""The arithmetic of one latent-diffusion training step, as small functions on tensors.

The LightningModules compose these; keeping them free of modules and state lets the tests
check each against diffusers' own pipelines and schedulers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import compute_snr
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor


def sample_noise(latents: Tensor, generator: torch.Generator | None = None, offset: float = 0.0) -> Tensor:
    """Gaussian noise shaped like the latents; `offset` adds a per-channel constant shift.

    The offset (as in diffusers' text-to-image trainer) lets the model learn to change an
    image's overall brightness, which matters for mammograms' large black background.
    """
    noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if offset:
        shift = randn_tensor((latents.shape[0], latents.shape[1], 1, 1), generator=generator,
                             device=latents.device, dtype=latents.dtype)
        noise = noise + offset * shift
    return noise


def sample_timesteps(batch: int, num_train_timesteps: int, device, generator: torch.Generator | None = None) -> Tensor:
    """Timesteps drawn uniformly from [0, num_train_timesteps), as a LongTensor on `device`."""
    where = generator.device if generator is not None else device
    steps = torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=where)
    return steps.long().to(device)


def noisy_latents(scheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """The forward diffusion q(x_t | x_0) of the scheduler."""
    return scheduler.add_noise(latents, noise, timesteps)


def diffusion_target(scheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the UNet learns to predict: the noise (epsilon) or the velocity (v_prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r} in the noise scheduler config (use epsilon or v_prediction)")


def snr_weights(scheduler, timesteps: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Per-sample loss weights of Min-SNR-γ (Hang et al. 2023): min(SNR, γ) / SNR (or / (SNR+1) for v)."""
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    raise ValueError(f"Min-SNR weighting needs prediction_type epsilon or v_prediction, got {prediction_type!r}")


def diffusion_loss(pred: Tensor, target: Tensor, snr_gamma: float | None = None, scheduler=None,
                   timesteps: Tensor | None = None) -> Tensor:
    """Mean squared error in float32; with `snr_gamma`, each sample weighted by Min-SNR-γ."""
    pred, target = pred.float(), target.float()
    if snr_gamma is None:
        return F.mse_loss(pred, target)
    if scheduler is None or timesteps is None:
        raise ValueError("diffusion_loss with snr_gamma needs the scheduler and the timesteps")
    per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=list(range(1, pred.ndim)))
    weights = snr_weights(scheduler, timesteps, snr_gamma, scheduler.config.prediction_type)
    return (per_sample * weights.to(per_sample.device)).mean()


def latents_from_dist(mean: Tensor, logvar: Tensor, scaling_factor: float,
                      generator: torch.Generator | None = None) -> Tensor:
    """A scaled latent sample from a cached VAE posterior (mean and log-variance)."""
    dist = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    return dist.sample(generator=generator) * scaling_factor


@torch.no_grad()
def encode_latents(vae, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """VAE posterior sample times the scaling factor, computed (and returned) in the VAE's dtype.

    Equal to `latents_from_dist` of the same posterior with the same generator, so cached and
    pixel-space training draw the same latents.
    """
    dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return dist.sample(generator=generator) * vae.config.scaling_factor


def mask_to_latent(mask: Tensor, latent_hw) -> Tensor:
    """Bx1xHxW mask resized to the latent grid by nearest neighbour, as the inpainting pipeline does."""
    size = (latent_hw, latent_hw) if isinstance(latent_hw, int) else tuple(int(s) for s in latent_hw)
    return F.interpolate(mask, size=size)


def masked_pixels(pixels: Tensor, mask: Tensor) -> Tensor:
    """The image with the region to inpaint (mask >= 0.5) set to zero (mid-grey in [-1, 1])."""
    return pixels * (mask < 0.5)


def inpaint_unet_input(noisy: Tensor, mask_latent: Tensor, masked_image_latents: Tensor) -> Tensor:
    """The 9-channel UNet input: noisy latents, mask, masked-image latents (diffusers' order)."""
    return torch.cat([noisy, mask_latent.to(noisy.dtype), masked_image_latents.to(noisy.dtype)], dim=1)


def drop_prompts(input_ids: Tensor, empty_ids: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Swap a fraction `p` of the prompts for the empty prompt so the model also learns the
    unconditional prediction that classifier-free guidance needs."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"prompt drop probability must be in [0, 1], got {p}")
    where = generator.device if generator is not None else input_ids.device
    drop = torch.rand(input_ids.shape[0], generator=generator, device=where).to(input_ids.device) < p
    empty = empty_ids.to(input_ids.device).reshape(1, -1).expand_as(input_ids)
    return torch.where(drop[:, None], empty, input_ids)
