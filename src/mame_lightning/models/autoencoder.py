"""Fine-tuning the VAE alone: reconstruction + a small KL term, as a thin LightningModule.

Mammograms differ from photographs (grey levels, fine calcifications), so the autoencoder may be
adapted before the diffusion model is trained on its latents. Only the VAE is registered here:
the UNet and text encoder stay off the device and out of the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import lightning as L
import torch
import torch.nn.functional as F

from mame_lightning.models.optimization import constant_schedule
from mame_lightning.models.text2image import VAL_STREAM, check_master_weights, step_generator

RECONSTRUCTION_LOSSES = {"l1": F.l1_loss, "mse": F.mse_loss}


class AutoencoderModule(L.LightningModule):
    task = "autoencoder"

    def __init__(
        self,
        components,
        optimizer: Callable | None = None,
        kl_weight: float = 1e-6,
        loss: str = "l1",
        lr_scheduler: Callable | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"loss must be one of {sorted(RECONSTRUCTION_LOSSES)}, got {loss!r}")
        self.save_hyperparameters(ignore=["components", "optimizer", "lr_scheduler"])
        self.components = components
        self.vae = components.vae
        # The VAE is the trained part here: float32 master weights, whatever dtype it was loaded in.
        self.vae.to(torch.float32).requires_grad_(True).train()
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler or constant_schedule

    def setup(self, stage: str) -> None:
        check_master_weights(self)

    def losses(self, batch: Mapping, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, KL) of one batch of pixels in [-1, 1]."""
        if "pixel_values" not in batch:
            raise KeyError(
                f"the autoencoder task needs pixel batches (pixel_values), got keys {sorted(batch)}: "
                "turn the latent cache off (dataset.latent_cache=false)"
            )
        pixels = batch["pixel_values"].to(self.device, torch.float32)
        posterior = self.vae.encode(pixels).latent_dist
        reconstruction = self.vae.decode(posterior.sample(generator=generator)).sample
        rec = RECONSTRUCTION_LOSSES[self.hparams.loss](reconstruction.float(), pixels)
        kl = posterior.kl().mean()
        return rec, kl

    def training_step(self, batch: Mapping, batch_idx: int) -> torch.Tensor:
        # Keyed by the global step (not Lightning's batch_idx) so a resumed run draws the same samples.
        generator = step_generator(self.hparams.seed, self.global_step, 0, self.global_rank, self.device)
        rec, kl = self.losses(batch, generator)
        loss = rec + self.hparams.kl_weight * kl
        if not torch.isfinite(loss):
            raise RuntimeError(
                f"non-finite autoencoder loss at global step {self.global_step} (batch {batch_idx}): "
                "lower the learning rate, use precision=bf16-mixed instead of fp16, or check the data"
            )
        size = len(batch["pixel_values"])
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/rec", rec, batch_size=size)
        self.log("train/kl", kl, batch_size=size)
        return loss

    def validation_step(self, batch: Mapping, batch_idx: int) -> torch.Tensor:
        generator = step_generator(self.hparams.seed, 0, batch_idx, self.global_rank, self.device, VAL_STREAM)
        rec, kl = self.losses(batch, generator)
        size = len(batch["pixel_values"])
        self.log("val/rec", rec, on_epoch=True, sync_dist=True, batch_size=size)
        self.log("val/kl", kl, on_epoch=True, sync_dist=True, batch_size=size)
        return rec

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("AutoencoderModule was built without an optimizer partial (conf/optimizer)")
        optimizer = self.optimizer_factory([p for p in self.vae.parameters() if p.requires_grad])
        scheduler = self.lr_scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


@torch.no_grad()
def fit_scaling_factor(vae, batches, max_batches: int = 8) -> float:
    """1 / std of posterior samples over some training batches, as Stable Diffusion chose 0.18215.

    The diffusion model assumes unit-variance latents; a fine-tuned (or freshly trained) VAE has
    its own spread, so the factor is measured on the data rather than kept from another model.
    """
    samples = []
    generator = torch.Generator().manual_seed(0)
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    for index, batch in enumerate(batches):
        if index >= max_batches:
            break
        posterior = vae.encode(batch["pixel_values"].to(device, dtype)).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(device, dtype)
        samples.append((posterior.mean + posterior.std * noise).float().flatten().cpu())
    if not samples:
        raise ValueError("no batches to measure the latent scale on")
    std = float(torch.cat(samples).std())
    if not std > 0:
        raise ValueError(f"latent standard deviation is {std}: the autoencoder collapsed")
    return 1.0 / std
