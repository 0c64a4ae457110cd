"""Lesion inpainting: the 9-channel Stable Diffusion inpainting UNet, trained like text-to-image.

The UNet input is (noisy latents, mask at latent size, masked-image latents) concatenated in the
order `StableDiffusionInpaintPipeline` feeds at inference, so trained weights work there unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mame_lightning.models import diffusion
from mame_lightning.models.text2image import Text2ImageModule


class InpaintModule(Text2ImageModule):
    """Same options as Text2ImageModule; batches also carry `mask` (and masked pixels or latents)."""

    task = "inpaint"

    def expected_in_channels(self) -> int:
        return 2 * self.vae.config.latent_channels + 1

    def check_unet_channels(self) -> None:
        got, want = self.unet.config.in_channels, self.expected_in_channels()
        if got != want:
            raise ValueError(
                f"inpainting needs a UNet with {want} input channels (noisy latents, mask, masked-image "
                f"latents), this one has {got}: use model=sd15_inpaint, model.inpaint=true for model=tiny, "
                f"or model.inpaint_in_channels={want} to widen a text-to-image UNet"
            )

    def masked_image_latents(self, batch: Mapping, generator: torch.Generator) -> torch.Tensor:
        if "masked_latent_mean" in batch or "masked_pixel_values" in batch:
            return self.image_latents(batch, generator, prefix="masked_")
        if "pixel_values" not in batch:
            raise KeyError(f"inpaint batch needs masked_pixel_values or masked_latent_mean: keys {sorted(batch)}")
        masked = diffusion.masked_pixels(batch["pixel_values"], batch["mask"])
        return self.image_latents({"masked_pixel_values": masked}, generator, prefix="masked_")

    def unet_input(self, noisy: torch.Tensor, batch: Mapping, generator: torch.Generator) -> torch.Tensor:
        if "mask" not in batch:
            raise KeyError(f"inpaint batch has no 'mask': keys {sorted(batch)}")
        mask = diffusion.mask_to_latent(batch["mask"].to(self.device, noisy.dtype), tuple(noisy.shape[-2:]))
        masked_latents = self.masked_image_latents(batch, generator).to(noisy.dtype)
        return diffusion.inpaint_unet_input(noisy, mask, masked_latents)
