"""Stable Diffusion parts (UNet, VAE, CLIP text encoder, tokenizer, noise schedule): load or build.

Every model, tiny or full size, comes in through `load_components`, so the loading code the
tests run is the code that loads Stable Diffusion v1.5. Tiny models are built from a config,
saved as a diffusers pipeline folder in a cache and loaded from there.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from mame_lightning.io import atomic_folder, move
from mame_lightning.models.tokenizer import build_tokenizer

NOISE_SCHEDULES = Path(__file__).resolve().parents[1] / "conf" / "model" / "noise_schedule"
ARCHITECTURES = Path(__file__).resolve().parents[1] / "conf" / "model"


def load_noise_schedule(name: str = "sd_v1") -> dict:
    """A training noise schedule of conf/model/noise_schedule/ (DDPMScheduler arguments)."""
    from omegaconf import OmegaConf

    return dict(OmegaConf.to_container(OmegaConf.load(NOISE_SCHEDULES / f"{name}.yaml")))


def resolve_noise_schedule(noise_schedule) -> dict:
    """A schedule given as a name of conf/model/noise_schedule/ (None: sd_v1) or as DDPMScheduler arguments."""
    if noise_schedule is None or isinstance(noise_schedule, str):
        return load_noise_schedule(noise_schedule or "sd_v1")
    return dict(_plain(noise_schedule))


def load_architecture(name: str = "sd15_arch") -> dict:
    """The unet / vae / text_encoder / sample_size of a model YAML (e.g. SD v1.5's published sizes)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ARCHITECTURES / f"{name}.yaml")
    return {key: OmegaConf.to_container(cfg[key]) if key != "sample_size" else int(cfg[key])
            for key in ("unet", "vae", "text_encoder", "sample_size")}


PREDICTION_TYPES = ("epsilon", "v_prediction")  # what a UNet may be trained to predict (models/diffusion.py)
_VARIANT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_BUILD_FORMAT = 1  # bump when the folder layout written by build_tiny changes


class ModelLoadError(OSError):
    """A model folder or hub id that could not be loaded; the message says what to do."""


@dataclass
class SDComponents:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler  # training schedule
    source: str  # hub id or folder the weights came from

    @property
    def is_inpaint(self) -> bool:
        return self.unet.config.in_channels == 9

    def inference_scheduler(self) -> DPMSolverMultistepScheduler:
        """DPM-Solver++ on the training schedule: good images in 20-50 steps."""
        return DPMSolverMultistepScheduler.from_config(self.noise_scheduler.config, algorithm_type="dpmsolver++")

    def pipeline(self, scheduler=None) -> StableDiffusionPipeline | StableDiffusionInpaintPipeline:
        """An in-memory diffusers pipeline sharing these modules (inpainting when the UNet takes 9 channels)."""
        cls = StableDiffusionInpaintPipeline if self.is_inpaint else StableDiffusionPipeline
        return cls(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=scheduler if scheduler is not None else self.inference_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def save_pretrained(self, folder, scheduler=None) -> None:
        """Write a diffusers pipeline folder that `DiffusionPipeline.from_pretrained` loads."""
        self.pipeline(scheduler).save_pretrained(str(folder))


def _dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"frozen_dtype={name!r} is not a torch dtype (try float16, bfloat16 or float32)")
    return dtype


def _load_error(path: str, subfolder: str, variant: str | None, err: Exception) -> ModelLoadError:
    where = f"{path!r} (subfolder {subfolder!r}" + (f", variant {variant!r})" if variant else ")")
    if Path(path).exists():
        hint = f"the local folder {path} must be a diffusers pipeline folder holding {subfolder}/"
        if variant:
            hint += f" with {variant!r} variant weights (or set model.variant=null)"
    elif path.startswith(("/", ".", "~")) or path.count("/") != 1:
        hint = f"there is no folder {path}: set model.pretrained= to a diffusers pipeline folder"
    else:
        hint = (
            f"{path!r} is not a local folder and the hub id could not be fetched (offline, or not cached). "
            f"Download it where there is network (huggingface-cli download {path} --local-dir DIR) and set "
            "model.pretrained=DIR, or train the tiny model with model=tiny"
        )
    return ModelLoadError(f"Could not load {where}: {hint}. Cause: {type(err).__name__}: {err}")


def _from_pretrained(cls, path: str, subfolder: str, **kwargs):
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        return cls.from_pretrained(path, subfolder=subfolder, **kwargs)
    except (OSError, ValueError) as err:
        raise _load_error(path, subfolder, kwargs.get("variant"), err) from err


def _check_tokenizer(tokenizer, text_encoder, path: str) -> None:
    """transformers builds an empty tokenizer (special tokens only) when the files are missing."""
    size, vocab = len(tokenizer), text_encoder.config.vocab_size
    if size < 256 or size > vocab:
        raise ModelLoadError(
            f"The tokenizer of {path!r} has {size} tokens for a text encoder of {vocab}: "
            f"{path}/tokenizer must hold vocab.json + merges.txt (or tokenizer.json) of the model"
        )


WIDEN_INITS = ("zero", "copy", "half")


def widen_conv_in(unet: UNet2DConditionModel, in_channels: int, init: str = "zero") -> UNet2DConditionModel:
    """Give the UNet more input channels, the way an inpainting UNet (latents + mask + masked-image
    latents) starts from a text-to-image one.

    init: "zero" (new weights zero: the same function as before, but the mask and the masked image
    are ignored until training moves them), "copy" (the masked-image channels get the latent
    channels' weights, so the known image is seen from the first step; the mask channel starts at
    zero), "half" (as copy, with latent and masked-image weights halved so their sum keeps the scale).
    """
    if init not in WIDEN_INITS:
        raise ValueError(f"conv_in init must be one of {WIDEN_INITS}, got {init!r}")
    old = unet.conv_in
    if in_channels < old.in_channels:
        raise ValueError(f"cannot narrow conv_in from {old.in_channels} to {in_channels} input channels")
    if in_channels == old.in_channels:
        return unet
    new = torch.nn.Conv2d(
        in_channels,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    latent = old.in_channels
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :latent] = old.weight
        masked = slice(latent + 1, min(in_channels, 2 * latent + 1))  # diffusers' order: latents, mask, masked image
        if init != "zero" and in_channels >= 2 * latent + 1:
            scale = 0.5 if init == "half" else 1.0
            new.weight[:, :latent] = old.weight * scale
            new.weight[:, masked] = old.weight * scale
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)
    return unet


def load_components(
    path: str | None = None,
    *,
    pretrained: str | None = None,
    variant: str | None = None,
    revision: str | None = None,
    frozen_dtype: str | None = None,
    train_text_encoder: bool = True,
    inpaint_in_channels: int | None = None,
    local_files_only: bool | None = None,
    vae_path: str | None = None,
    inpaint_init: str = "zero",
    prediction_type: str | None = None,
) -> SDComponents:
    """Load the parts of a Stable Diffusion pipeline (hub id or folder) ready for training.

    Trainable parts (UNet, text encoder when trained) are float32 whatever the variant: fp16
    master weights make mixed-precision training fail ("Attempting to unscale FP16 gradients").
    Frozen parts are cast to `frozen_dtype` (float32 when None) and have gradients off.
    `vae_path` swaps in another AutoencoderKL folder (e.g. one fine-tuned with task=autoencoder).
    `pretrained` is the config's name for `path` (a hub id or a diffusers folder); `path` wins.
    `inpaint_init` is how a UNet widened to `inpaint_in_channels` starts (see `widen_conv_in`).
    `prediction_type` (epsilon | v_prediction) overrides what the scheduler config says the UNet predicts,
    as diffusers' trainers' --prediction_type does; the export's scheduler config then says it too.
    """
    if not (path or pretrained):
        raise ValueError("load_components needs a hub id or folder (model.pretrained=...)")
    path = str(path or pretrained)
    common = {"variant": variant, "revision": revision, "local_files_only": local_files_only}
    scheduler = _from_pretrained(DDPMScheduler, path, "scheduler", revision=revision, local_files_only=local_files_only)
    if scheduler.config.get("variance_type") is None:  # a DPM-Solver config leaves it empty
        scheduler = DDPMScheduler.from_config(scheduler.config, variance_type="fixed_small")
    if prediction_type is not None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"model.prediction_type={prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)} "
                             "(or null to keep the scheduler config's)")
        scheduler = DDPMScheduler.from_config(scheduler.config, prediction_type=prediction_type)
    text_encoder = _from_pretrained(CLIPTextModel, path, "text_encoder", **common)
    if vae_path:
        vae = _from_pretrained(AutoencoderKL, str(vae_path), "", local_files_only=local_files_only)
    else:
        vae = _from_pretrained(AutoencoderKL, path, "vae", **common)
    unet = _from_pretrained(UNet2DConditionModel, path, "unet", **common)
    tokenizer = _from_pretrained(CLIPTokenizer, path, "tokenizer", revision=revision, local_files_only=local_files_only)
    _check_tokenizer(tokenizer, text_encoder, path)

    frozen = _dtype(frozen_dtype) or torch.float32
    unet.to(torch.float32)
    if inpaint_in_channels is not None:
        widen_conv_in(unet, int(inpaint_in_channels), inpaint_init)
    vae.to(frozen).requires_grad_(False).eval()
    if train_text_encoder:
        text_encoder.to(torch.float32).requires_grad_(True)
    else:
        text_encoder.to(frozen).requires_grad_(False).eval()
    return SDComponents(unet, vae, text_encoder, tokenizer, scheduler, source=path)


def _plain(value: Any) -> Any:
    """Hydra hands nested DictConfig/ListConfig; models and hashing want plain containers."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return value


@contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_models(*, words, unet: dict, vae: dict, text_encoder: dict, sample_size: int = 64, in_channels: int = 4,
                 seed: int = 0, noise_schedule: str | dict | None = None) -> SDComponents:
    """Randomly initialised models in memory from config dicts (the tokenizer sets the vocabulary);
    `noise_schedule` is a name of conf/model/noise_schedule/ (default sd_v1) or DDPMScheduler arguments."""
    schedule = resolve_noise_schedule(noise_schedule)
    unet, vae, text_encoder = dict(_plain(unet)), dict(_plain(vae)), dict(_plain(text_encoder))
    tokenizer = build_tokenizer(list(_plain(words)), pad_to=text_encoder.pop("vocab_size", None))
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    if sample_size % factor:
        raise ValueError(f"sample_size={sample_size} is not a multiple of the VAE's downsampling factor {factor}")
    hidden = text_encoder.get("hidden_size", CLIPTextConfig().hidden_size)
    if unet.get("cross_attention_dim") != hidden:
        raise ValueError(f"unet.cross_attention_dim={unet.get('cross_attention_dim')} must equal text_encoder.hidden_size={hidden}")
    latent_channels = vae.get("latent_channels", 4)
    unet.update(sample_size=sample_size // factor, in_channels=in_channels, out_channels=latent_channels)
    vae.update(sample_size=sample_size)
    text_config = CLIPTextConfig(
        **text_encoder,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed):
        models = (UNet2DConditionModel(**unet), AutoencoderKL(**vae), CLIPTextModel(text_config))
    return SDComponents(*models, tokenizer, DDPMScheduler(**schedule), source="random")


def build_tiny(folder, *, words, unet: dict, vae: dict, text_encoder: dict, sample_size: int = 64,
               in_channels: int = 4, seed: int = 0, variant: str | None = None,
               noise_schedule: dict | None = None) -> str:
    """Build random models from the configs and save them as a diffusers pipeline folder.

    With `variant` (e.g. "fp16") the weights are also saved as that variant, in its dtype.
    Written into a temporary sibling folder and renamed, so a folder that exists is complete.
    """
    folder = Path(folder)
    parts = build_models(words=words, unet=unet, vae=vae, text_encoder=text_encoder, sample_size=sample_size,
                         noise_schedule=noise_schedule,
                         in_channels=in_channels, seed=seed)
    # if another process finished the same build first, its folder is kept
    with atomic_folder(folder, keep_existing=True) as tmp:
        pipeline = parts.pipeline()
        pipeline.save_pretrained(str(tmp))
        if variant:
            _add_variant(pipeline, tmp, variant)
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"{folder}: exists but holds no diffusers pipeline (model_index.json); remove it")
    return str(folder)


def _add_variant(pipeline, folder: Path, variant: str) -> None:
    """Add `variant` weight files (in the variant's dtype) next to the float32 ones.

    Only the weight files are taken: configs stay those of the float32 save, so a plain load
    (transformers reads the dtype from config.json) still gives float32 models.
    """
    with tempfile.TemporaryDirectory(dir=folder) as side:
        pipeline.to(_VARIANT_DTYPES.get(variant, torch.float32)).save_pretrained(side, variant=variant)
        for weights in Path(side).glob(f"*/*.{variant}.*"):
            move(weights, folder / weights.parent.name / weights.name)
    pipeline.to(torch.float32)


def _config_hash(**config: Any) -> str:
    text = json.dumps({k: _plain(v) for k, v in config.items()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tiny_components(cache_dir, *, words, unet: dict, vae: dict, text_encoder: dict, sample_size: int = 64,
                    seed: int = 0, inpaint: bool = False, variant: str | None = None,
                    frozen_dtype: str | None = None, train_text_encoder: bool = True,
                    vae_path: str | None = None, noise_schedule: dict | None = None) -> SDComponents:
    """A small random Stable Diffusion, built once per config under cache_dir, loaded like SD v1.5."""
    build = {"words": words, "unet": unet, "vae": vae, "text_encoder": text_encoder, "sample_size": sample_size,
             "in_channels": 9 if inpaint else 4, "seed": seed, "variant": variant,
             "noise_schedule": resolve_noise_schedule(noise_schedule)}
    return _cached_components(cache_dir, "tiny", build, frozen_dtype, train_text_encoder, vae_path)


def _cached_components(cache_dir, prefix: str, build: dict, frozen_dtype, train_text_encoder,
                       vae_path: str | None = None) -> SDComponents:
    folder = Path(cache_dir) / f"{prefix}-{_config_hash(format=_BUILD_FORMAT, **build)}"
    if not (folder / "model_index.json").is_file():
        build_tiny(folder, **build)
    return load_components(str(folder), variant=build["variant"], frozen_dtype=frozen_dtype,
                           train_text_encoder=train_text_encoder, local_files_only=True, vae_path=vae_path)


def build_sd15_arch(folder, inpaint: bool = False, *, words, seed: int = 0, variant: str | None = None) -> str:
    """The Stable Diffusion v1.5 architecture at full size with random weights (~4 GB in float32)."""
    return build_tiny(folder, words=words, **load_architecture("sd15_arch"), in_channels=9 if inpaint else 4,
                      seed=seed, variant=variant)


def sd15_arch_components(cache_dir, inpaint: bool = False, *, words, unet: dict | None = None, vae: dict | None = None,
                         text_encoder: dict | None = None, sample_size: int | None = None, seed: int = 0,
                         variant: str | None = None, frozen_dtype: str | None = None, train_text_encoder: bool = True,
                         noise_schedule: dict | None = None) -> SDComponents:
    """Full-size SD v1.5 with random weights, for memory and speed checks without downloading it; the
    architecture comes from conf/model/sd15_arch.yaml unless given."""
    published = load_architecture("sd15_arch")
    build = {"words": words, "unet": _plain(unet) if unet else published["unet"],
             "vae": _plain(vae) if vae else published["vae"],
             "text_encoder": _plain(text_encoder) if text_encoder else published["text_encoder"],
             "sample_size": int(sample_size or published["sample_size"]), "in_channels": 9 if inpaint else 4,
             "seed": seed, "variant": variant,
             "noise_schedule": resolve_noise_schedule(noise_schedule)}
    return _cached_components(cache_dir, "sd15-arch", build, frozen_dtype, train_text_encoder)
