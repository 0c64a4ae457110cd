"""The baseline training loop: text-to-image fine-tuning the way diffusers' example script does it.

This mirrors `examples/text_to_image/train_text_to_image.py` without accelerate: every step
encodes the images with the frozen VAE, draws noise and timesteps, runs the UNet, takes the MSE
against the noise and steps AdamW, with autocast when mixed precision is asked for. No
Lightning, no latent cache: what a user would otherwise run, on the same model and data.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from torch.utils.data import DataLoader

from common import StepClock, cycle
from setups import autocast_dtype


def training_loader(dataset, batch_size: int, num_workers: int = 0, seed: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(seed))


def prepare_models(components, device: torch.device, *, train_text_encoder: bool, gradient_checkpointing: bool):
    """Frozen VAE (and text encoder unless trained), trainable UNet, all on `device`."""
    unet, vae, text_encoder = components.unet, components.vae, components.text_encoder
    vae.requires_grad_(False).eval()
    text_encoder.requires_grad_(train_text_encoder).train(train_text_encoder)
    unet.requires_grad_(True).train()
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    for module in (unet, vae, text_encoder):
        module.to(device)
    trainable = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text_encoder else [])
    return unet, vae, text_encoder, trainable


def reference_train(components, dataset, *, batch_size: int, steps: int, warmup: int, optimizer_factory,
                    device: torch.device | str = "cpu", precision: str = "32", gradient_checkpointing: bool = False,
                    train_text_encoder: bool = True, num_workers: int = 0, seed: int = 0) -> tuple[StepClock, list[float]]:
    """Run `warmup + steps` optimiser steps; returns the step clock and the losses."""
    device = torch.device(device)
    torch.manual_seed(seed)
    unet, vae, text_encoder, trainable = prepare_models(
        components, device, train_text_encoder=train_text_encoder, gradient_checkpointing=gradient_checkpointing)
    noise_scheduler = components.noise_scheduler
    optimizer = optimizer_factory(trainable)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    amp_dtype = autocast_dtype(precision)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    weight_dtype = vae.dtype

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    clock = StepClock(warmup, device)
    losses: list[float] = []
    batches = cycle(training_loader(dataset, batch_size, num_workers, seed))
    for _ in range(warmup + steps):
        batch = next(batches)
        with autocast():
            latents = vae.encode(batch["pixel_values"].to(device, dtype=weight_dtype)).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                      device=latents.device).long()
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_states = text_encoder(batch["input_ids"].to(device), return_dict=False)[0]
            if noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                target = noise
            model_pred = unet(noisy_latents.float(), timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())  # the example logs the loss every step
        clock.mark()
    return clock, losses
