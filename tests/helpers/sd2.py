"""A small Stable Diffusion 2.x-shaped model saved as a diffusers folder, for the SD 2.x tests.

Shaped like the SD 2.x releases where it matters to loading and training: a UNet with linear
projections and upcast attention, a GELU CLIP text encoder (OpenCLIP's activation), and a DDIM
scheduler config saying `prediction_type: v_prediction`, written by `save_pretrained`.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from helpers.modules import TINY_CONFIG

SIZE = 64


def tiny_sd2_folder(folder: Path, prediction_type: str = "v_prediction") -> Path:
    """Build (once) and save the model; returns the folder."""
    from diffusers import DDIMScheduler

    from mame_lightning.models.components import build_models, load_noise_schedule

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    cfg = OmegaConf.load(TINY_CONFIG)
    unet = {**OmegaConf.to_container(cfg.unet), "use_linear_projection": True, "upcast_attention": True}
    text_encoder = {**OmegaConf.to_container(cfg.text_encoder), "hidden_act": "gelu"}
    schedule = {**load_noise_schedule("sd_v2_v"), "prediction_type": prediction_type}
    parts = build_models(words=list(cfg.words), unet=unet, vae=OmegaConf.to_container(cfg.vae),
                         text_encoder=text_encoder, sample_size=SIZE, seed=3, noise_schedule=schedule)
    parts.save_pretrained(folder, DDIMScheduler.from_config(parts.noise_scheduler.config, set_alpha_to_one=False))
    return folder
