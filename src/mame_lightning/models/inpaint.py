"""Lesion inpainting: the 9-channel Stable Diffusion inpainting UNet, trained like text-to-image.

The UNet input is (noisy latents, mask at latent size, masked-image latents) concatenated in the
order `StableDiffusionInpaintPipeline` feeds at inference, so trained weights work there unchanged.
Masks are the lesion boxes of the prepared set, optionally mixed with random boxes and strokes
(`masks`, see `data/loading/masks.py`); a random mask is drawn from the step's generator and its masked
image is encoded by the VAE on the fly, exactly as the pipeline encodes it at inference.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mame_lightning.data.loading.masks import MaskMix, mix_masks
from mame_lightning.models import diffusion
from mame_lightning.models.text2image import Text2ImageModule


class InpaintModule(Text2ImageModule):
    """Text2ImageModule's options plus `masks` (the mask mix) and `conv_in_lr_scale` (a learning rate
    multiplier for the UNet's input convolution, whose mask and masked-image weights are new)."""

    task = "inpaint"

    def __init__(self, components, *args, masks: Mapping | None = None, conv_in_lr_scale: float = 1.0, **kwargs):
        self.mask_mix = MaskMix.from_config(masks)
        if conv_in_lr_scale <= 0:
            raise ValueError(f"conv_in_lr_scale must be > 0, got {conv_in_lr_scale}")
        super().__init__(components, *args, **kwargs)
        self.save_hyperparameters({"masks": dict(masks or {}), "conv_in_lr_scale": conv_in_lr_scale})

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

    def optimizer_parameters(self) -> list:
        scale = float(self.hparams.get("conv_in_lr_scale", 1.0))
        parameters = super().optimizer_parameters()
        if scale == 1.0 or not self.hparams.train_unet:
            return parameters
        conv_in = [p for p in self.unet.conv_in.parameters() if p.requires_grad]  # none under LoRA
        if not conv_in:
            return parameters
        special = {id(p) for p in conv_in}
        rest = [p for p in parameters if id(p) not in special]
        lr = self.optimizer_factory.keywords.get("lr") if hasattr(self.optimizer_factory, "keywords") else None
        if lr is None:
            raise ValueError("conv_in_lr_scale needs the optimizer's lr (a partial with lr=..., as conf/optimizer gives)")
        return [{"params": rest}, {"params": conv_in, "lr": float(lr) * scale}]

    def training_masks(self, batch: Mapping, generator: torch.Generator) -> tuple[torch.Tensor, bool]:
        """The batch's lesion masks, or the mix's random shapes in their place; and whether any was drawn.

        Lesion-only training on lesion images draws nothing (the masks and cached masked latents of the
        prepared set are used as they are); an image without a lesion box (a healthy one) always gets a
        drawn mask.
        """
        if "mask" not in batch:
            raise KeyError(f"inpaint batch has no 'mask': keys {sorted(batch)}")
        given = batch["mask"]
        has_lesion = bool((given.flatten(1).amax(1) > 0.5).all())
        if self.mask_mix.random_share == 0 and has_lesion:
            return given, False
        masks, _ = mix_masks(given, self.mask_mix, generator)
        return masks, True

    def masked_image_latents(self, batch: Mapping, mask: torch.Tensor, drawn: bool,
                             generator: torch.Generator) -> torch.Tensor:
        """Latents of the image with `mask` blanked: encoded from pixels when the mask was drawn this
        step (as the pipeline encodes its masked image), else from the batch (cache or pixels)."""
        if drawn:
            if "pixel_values" not in batch:
                raise KeyError("drawn training masks (random shapes, healthy images) need the image pixels in "
                               "the batch: set dataset.latent_cache={pixels: true} (or dataset.latent_cache=false); "
                               f"keys {sorted(batch)}")
            masked = diffusion.masked_pixels(batch["pixel_values"].to(mask.device), mask)
            return self.image_latents({"masked_pixel_values": masked}, generator, prefix="masked_")
        if "masked_latent_mean" in batch or "masked_pixel_values" in batch:
            return self.image_latents(batch, generator, prefix="masked_")
        if "pixel_values" not in batch:
            raise KeyError(f"inpaint batch needs masked_pixel_values or masked_latent_mean: keys {sorted(batch)}")
        masked = diffusion.masked_pixels(batch["pixel_values"], batch["mask"])
        return self.image_latents({"masked_pixel_values": masked}, generator, prefix="masked_")

    def unet_input(self, noisy: torch.Tensor, batch: Mapping, generator: torch.Generator) -> torch.Tensor:
        pixel_mask, drawn = self.training_masks(batch, generator)
        pixel_mask = pixel_mask.to(self.device, noisy.dtype)
        mask = diffusion.mask_to_latent(pixel_mask, tuple(noisy.shape[-2:]))
        masked_latents = self.masked_image_latents(batch, pixel_mask, drawn, generator).to(noisy.dtype)
        return diffusion.inpaint_unet_input(noisy, mask, masked_latents)
