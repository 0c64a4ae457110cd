"""The training loss of a Text2ImageModule, computed again by hand from the same random draws.

`compute_loss` draws latents, noise and timesteps from one generator in a fixed order; replaying
that order with a generator in the same state gives the same numbers, so a test can build the
prediction and the regression target from the published formulas and compare losses.
"""

from __future__ import annotations

import torch

from mame_lightning.models import diffusion


def replay(module, batch: dict, seed: int) -> dict[str, torch.Tensor]:
    """x0, noise, timesteps, the UNet's prediction, and the epsilon and velocity targets (no prompt dropout)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        latents = module.image_latents(batch, generator)
        noise = diffusion.sample_noise(latents, generator, module.hparams.noise_offset)
        steps = module.noise_scheduler.config.num_train_timesteps
        timesteps = diffusion.sample_timesteps(latents.shape[0], steps, latents.device, generator)
        alpha_bar = module.noise_scheduler.alphas_cumprod.to(latents.device)[timesteps].view(-1, 1, 1, 1).float()
        noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
        hidden = module.text_encoder(batch["input_ids"])[0]
        prediction = module.unet(noisy, timesteps, encoder_hidden_states=hidden).sample.float()
    velocity = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents  # Salimans & Ho (2022), eq. 2.4
    return {"latents": latents, "noise": noise, "timesteps": timesteps, "prediction": prediction,
            "epsilon": noise, "velocity": velocity}


def module_loss(module, batch: dict, seed: int) -> torch.Tensor:
    """The module's own loss for `batch` with a generator seeded `seed` and no prompt dropout."""
    with torch.no_grad():
        return module.compute_loss(batch, torch.Generator().manual_seed(seed), 0.0)
