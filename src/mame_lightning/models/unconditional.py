"""Unconditional diffusion (MAM-E 4.1): a diffusers `UNet2DModel` trained from scratch, no prompt, either
on single-channel pixels (64x64 by default) under the DDPM noise schedule (`model=ddpm_pixel`), or on
the latents of a frozen `AutoencoderKL` (`model=ldm_unconditional`: latent diffusion from scratch).

The components mirror the Stable Diffusion ones where training and export meet them (`unet`,
`noise_scheduler`, `tokenizer`, `pipeline()`, `save_pretrained()`), so the run, checkpoints and
the export are the same code; the export is a folder stock `DDPMPipeline.from_pretrained` loads
(pixels) or stock `LDMPipeline.from_pretrained` (latents: the VAE as its `vqvae`, a DDIM scheduler).
The prepared-set reader tokenises prompts, so `NoPrompt` stands in for a tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import lightning as L
import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMPipeline, DDPMScheduler, LDMPipeline, UNet2DModel

from mame_lightning.models import diffusion
from mame_lightning.models.components import resolve_noise_schedule
from mame_lightning.models.ema import build_ema, ema_on_device, ema_step, ema_weights
from mame_lightning.models.optimization import constant_schedule
from mame_lightning.models.schedulers import make_scheduler
from mame_lightning.models.loggers import logging_step
from mame_lightning.models.text2image import VAL_STREAM, TrainingDiverged, plain_options, step_generator


class NoPrompt:
    """A tokenizer stand-in: one padding id per prompt (an unconditional model reads no text)."""

    model_max_length = 1

    def __call__(self, prompts, **_options):
        count = 1 if isinstance(prompts, str) else len(prompts)
        return SimpleNamespace(input_ids=torch.zeros(count, 1, dtype=torch.long))

    def __len__(self) -> int:
        return 1


@dataclass
class PixelComponents:
    unet: UNet2DModel
    noise_scheduler: DDPMScheduler
    tokenizer: NoPrompt
    source: str = "random"

    is_inpaint = False

    def pipeline(self, scheduler=None) -> DDPMPipeline:
        """An in-memory DDPMPipeline sharing the UNet (the training DDPM schedule unless given another)."""
        return DDPMPipeline(unet=self.unet, scheduler=scheduler if scheduler is not None else self.noise_scheduler)

    def save_pretrained(self, folder, scheduler=None) -> None:
        self.pipeline(scheduler).save_pretrained(str(folder))


def pixel_components(*, unet: Mapping, noise_schedule: str | Mapping = "ddpm", sample_size: int = 64,
                     in_channels: int = 1, seed: int = 0, pretrained: str | None = None) -> PixelComponents:
    """A random UNet2DModel from the config (or a DDPMPipeline folder's UNet and schedule: `pretrained`)."""
    if pretrained:
        pipe = DDPMPipeline.from_pretrained(str(pretrained))
        return PixelComponents(pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config), NoPrompt(), str(pretrained))
    options = dict(plain_options(unet))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = UNet2DModel(sample_size=int(sample_size), in_channels=int(in_channels),
                            out_channels=int(in_channels), **options)
    return PixelComponents(model, DDPMScheduler(**resolve_noise_schedule(noise_schedule)), NoPrompt())


@dataclass
class LatentComponents:
    unet: UNet2DModel
    vae: AutoencoderKL
    noise_scheduler: DDPMScheduler
    tokenizer: NoPrompt
    source: str = "random"

    is_inpaint = False

    def pipeline(self, scheduler=None) -> LDMPipeline:
        """diffusers' unconditional latent pipeline (it divides by the VAE's scaling factor, then decodes)."""
        chosen = scheduler if scheduler is not None else DDIMScheduler.from_config(self.noise_scheduler.config)
        return LDMPipeline(vqvae=self.vae, unet=self.unet, scheduler=chosen)

    def save_pretrained(self, folder, scheduler=None) -> None:
        self.pipeline(scheduler).save_pretrained(str(folder))


def latent_components(*, unet: Mapping, noise_schedule: str | Mapping = "sd_v1", sample_size: int = 64,
                      vae: Mapping | None = None, vae_path: str | None = None, seed: int = 0) -> LatentComponents:
    """A random UNet2DModel on the latents of a frozen AutoencoderKL: `vae_path` (a folder such as the
    autoencoder task's RUN/export/vae, or a diffusers model's vae/), else a random one from `vae`."""
    if vae_path:
        autoencoder = AutoencoderKL.from_pretrained(str(vae_path))
    elif vae:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            autoencoder = AutoencoderKL(sample_size=int(sample_size), **dict(plain_options(vae)))
    else:
        raise ValueError("model.vae_path: give an AutoencoderKL folder (e.g. AE_RUN/export/vae), or model.vae")
    factor = 2 ** (len(autoencoder.config.block_out_channels) - 1)
    channels = autoencoder.config.latent_channels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = UNet2DModel(sample_size=int(sample_size) // factor, in_channels=channels, out_channels=channels,
                            **dict(plain_options(unet)))
    autoencoder.requires_grad_(False).eval()
    return LatentComponents(model, autoencoder, DDPMScheduler(**resolve_noise_schedule(noise_schedule)), NoPrompt(),
                            str(vae_path or "random"))


class UnconditionalModule(L.LightningModule):
    """Trains the UNet to denoise pixels: x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, loss |eps - eps_hat|^2."""

    task = "unconditional"

    def __init__(self, components: PixelComponents, optimizer: Callable | None = None,
                 lr_scheduler: Callable | None = None, snr_gamma: float | None = None, ema: Mapping | None = None,
                 seed: int = 0):
        super().__init__()
        if not isinstance(components.unet, UNet2DModel):
            raise ValueError(f"task=unconditional trains a UNet2DModel: add model=ddpm_pixel or model=ldm_unconditional "
                             f"(got {type(components.unet).__name__})")
        ema = plain_options(ema)
        self.save_hyperparameters(ignore=["components", "optimizer", "lr_scheduler"])
        self.components = components
        self.unet = components.unet
        self.noise_scheduler = components.noise_scheduler
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler or constant_schedule
        self.vae = getattr(components, "vae", None)  # latent diffusion: frozen, always in eval mode
        if self.vae is not None:
            self.vae.requires_grad_(False).eval()
        self.unet.requires_grad_(True).train()
        self.ema = build_ema(self.unet, ema)
        self._micro_step: int | None = None
        self._micro_index = 0
        self._ema_last_step: int | None = None

    def train(self, mode: bool = True):
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()
        return self

    def diffused(self, batch: Mapping, generator: torch.Generator) -> torch.Tensor:
        """What is noised: pixels in [-1, 1] with the UNet's channels (the reader repeats grey into RGB), or
        the frozen VAE's scaled latents (drawn from the latent cache's posterior when the batch has one)."""
        if self.vae is not None and "latent_mean" in batch:
            return diffusion.latents_from_dist(batch["latent_mean"].to(self.device), batch["latent_logvar"].to(self.device),
                                               self.vae.config.scaling_factor, generator).float()
        if "pixel_values" not in batch:
            raise KeyError(f"task=unconditional needs pixel_values (dataset.latent_cache=false), got keys {sorted(batch)}")
        if self.vae is not None:
            with torch.no_grad():
                return diffusion.encode_latents(self.vae, batch["pixel_values"].to(self.device), generator).float()
        return batch["pixel_values"][:, : self.unet.config.in_channels].to(self.device).float()

    def compute_loss(self, batch: Mapping, generator: torch.Generator) -> torch.Tensor:
        images = self.diffused(batch, generator)
        noise = diffusion.sample_noise(images, generator)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = diffusion.sample_timesteps(images.shape[0], steps, images.device, generator)
        noisy = diffusion.noisy_latents(self.noise_scheduler, images, noise, timesteps)
        prediction = self.unet(noisy, timesteps).sample
        target = diffusion.diffusion_target(self.noise_scheduler, images, noise, timesteps)
        return diffusion.diffusion_loss(prediction, target, self.hparams.snr_gamma, self.noise_scheduler, timesteps)

    def training_step(self, batch: Mapping, batch_idx: int):
        if self._micro_step != self.global_step:
            self._micro_step, self._micro_index = self.global_step, 0
        else:
            self._micro_index += 1
        generator = step_generator(self.hparams.seed, self.global_step, self._micro_index, self.global_rank,
                                   self.device)
        loss = self.compute_loss(batch, generator)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"non-finite training loss ({loss.item()}) at global step {self.global_step}; "
                                   "lower optimizer.lr")
        size = len(batch["input_ids"])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=size)
        if self._trainer is not None and self.trainer.optimizers and logging_step(self.trainer):
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False,
                     batch_size=size)
        return loss

    def validation_step(self, batch: Mapping, batch_idx: int):
        generator = step_generator(self.hparams.seed, 0, batch_idx, self.global_rank, self.device, VAL_STREAM)
        loss = self.compute_loss(batch, generator)
        self.log("val/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(batch["input_ids"]))
        return loss

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("UnconditionalModule was built without an optimizer (conf/optimizer, _partial_: true)")
        optimizer = self.optimizer_factory([p for p in self.unet.parameters() if p.requires_grad])
        scheduler = self.lr_scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # -- EMA, checkpoints, samples ---------------------------------------------------------------
    def on_train_start(self) -> None:
        self._ema_last_step = self.global_step
        if self.ema is not None:
            ema_on_device(self.ema, self.device)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is not None and self.global_step != self._ema_last_step and outputs is not None:
            self._ema_last_step = self.global_step
            ema_step(self.ema, self.unet)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])

    @torch.no_grad()
    def sample(self, seeds: Sequence[int], num_inference_steps: int, scheduler: str | None = None) -> np.ndarray:
        """N x H x W x C floats in [0, 1], one image per seed (a CPU generator each), EMA weights when kept."""
        was_training = self.unet.training
        self.unet.eval()
        try:
            with ema_weights(self.ema, self.unet):
                chosen = make_scheduler(scheduler, self.noise_scheduler.config) if scheduler else None
                pipeline = self.components.pipeline(chosen)
                pipeline.set_progress_bar_config(disable=True)
                generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
                return pipeline(batch_size=len(generators), generator=generators,
                                num_inference_steps=int(num_inference_steps), output_type="np").images
        finally:
            self.unet.train(was_training)

    def render_samples(self, seeds: Sequence[int], num_inference_steps: int, scheduler: str | None = None) -> np.ndarray:
        """The sample grid's picture: one row, a column per seed, uint8 HxWx3."""
        images = self.sample(seeds, num_inference_steps, scheduler)
        row = np.concatenate([np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image for image in images], 1)
        return (np.clip(row, 0, 1) * 255).round().astype(np.uint8)


__all__ = ["LatentComponents", "NoPrompt", "PixelComponents", "UnconditionalModule", "latent_components", "pixel_components"]
