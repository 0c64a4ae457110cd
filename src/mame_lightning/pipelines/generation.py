"""Text-to-image and inpainting runners over a loaded model.

Image i is drawn with seed `seed + i` from its own CPU `torch.Generator`, so any single image can
be reproduced alone (n=1, seed=seed+i) whatever the batch size or device it first came from.
Batches: the first image of a call is drawn alone (first-image latency stays that of one image),
the rest `batch_size` at a time. The prompt's text embeddings are computed once per model and
(prompt, negative prompt) and handed to the pipeline, which then skips the text encoder.
`accelerate=deepcache` reuses the UNet's deep features between steps (pipelines.deep_cache).
Inpainting keeps the input outside the mask: the pipeline re-encodes the whole image through the
VAE, so after sampling the original pixels are pasted back everywhere except the mask grown by one
latent cell (the VAE footprint), and only the asked-for region can change.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from tqdm.auto import tqdm

from mame_lightning.pipelines.deep_cache import ACCELERATE, accelerated
from mame_lightning.pipelines.loading import LoadedModel, model_label


@dataclass
class GenerationSettings:
    """Sampling knobs shared by every mode (defaults: 24 DPM-Solver++ steps, the MAM-E setting)."""

    guidance: float = 4.0
    steps: int = 24
    negative_prompt: str | None = None
    seed: int = 0
    batch_size: int = 1
    progress: bool = True
    accelerate: str = "none"  # none | deepcache (changes pixels slightly: see docs/benchmarks.md)
    deepcache_interval: int = 3
    max_batch_pixels: int = 4 * 512 * 512  # memory cap: a call holds at most this many output pixels

    def __post_init__(self) -> None:
        """Refuse settings no sampler can run, naming the allowed range (before any model is loaded)."""
        check_range("steps", self.steps, 1, MAX_STEPS, whole=True)
        check_range("guidance", self.guidance, 0.0, MAX_GUIDANCE,
                    note="; 0 and 1 sample without classifier-free guidance, 4 is the paper's setting")
        check_range("seed", self.seed, 0, MAX_SEED, whole=True)
        check_range("batch_size", self.batch_size, 1, MAX_BATCH, whole=True)
        if self.accelerate not in ACCELERATE:
            raise ValueError(f"accelerate={self.accelerate!r}: choose from {', '.join(ACCELERATE)}")
        check_range("deepcache.interval", self.deepcache_interval, 1, MAX_STEPS, whole=True)
        check_range("max_batch_pixels", self.max_batch_pixels, 1, 2**40, whole=True)

    def batch_for(self, height: int, width: int) -> int:
        """batch_size, lowered so that one call's images hold at most max_batch_pixels pixels."""
        return max(1, min(int(self.batch_size), int(self.max_batch_pixels) // max(1, int(height) * int(width))))


MAX_STEPS, MAX_GUIDANCE, MAX_SEED, MAX_BATCH = 1000, 100.0, 2**63 - 1, 1024


def check_range(name: str, value, low, high, *, whole: bool = False, note: str = "") -> None:
    """ValueError naming the key and its allowed range when `value` is outside [low, high] (or not whole)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    bad = not (low <= number <= high) or (whole and number != int(number))
    if bad:
        kind = "a whole number" if whole else "a number"
        shown = f"{number:g}" if number == number else repr(value)  # as typed: 4, not 4.0
        raise ValueError(f"{name}={shown}: use {kind} from {low:g} to {high:g}{note}")


@dataclass
class Generated:
    """One output image (uint8, grayscale) with everything needed to mark and reproduce it."""

    image: np.ndarray
    index: int
    seed: int
    seconds: float
    params: dict = field(default_factory=dict)
    mask: np.ndarray | None = None


def image_seeds(seed: int, n: int) -> list[int]:
    return [int(seed) + i for i in range(int(n))]


def generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image: the starting noise is the same on every device."""
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def to_gray_uint8(images: np.ndarray) -> list[np.ndarray]:
    """Pipeline output (B×H×W×3 floats in [0, 1]) -> grayscale uint8 images (mammograms are gray)."""
    gray = np.asarray(images, dtype=np.float32).mean(axis=-1)
    return [np.clip(np.rint(g * 255.0), 0, 255).astype(np.uint8) for g in gray]


def sampling_params(model: LoadedModel, prompt: str, settings: GenerationSettings) -> dict:
    """The parameters every output records (PNG text chunks, index CSV); an approximation that
    changes pixels is recorded too, so the image can be drawn again the same way."""
    accelerate = {} if settings.accelerate == "none" else {
        "accelerate": f"{settings.accelerate} interval {int(settings.deepcache_interval)}"}
    return {**accelerate,
        "prompt": prompt,
        "negative_prompt": settings.negative_prompt or "",
        "guidance": float(settings.guidance),
        "steps": int(settings.steps),
        "scheduler": model.scheduler,
        "model": model_label(model.path),  # no absolute path in any output
        "task": model.task,
    }


def chunk_sizes(n: int, batch: int) -> list[int]:
    """Images per pipeline call: the first alone (its latency is one image's), then `batch` at a time."""
    n, batch = int(n), max(1, int(batch))
    if n <= 1 or batch == 1:
        return [1] * n
    rest = n - 1
    return [1] + [batch] * (rest // batch) + ([rest % batch] if rest % batch else [])


def run_batches(n: int, settings: GenerationSettings, draw: Callable[[list[int]], list[np.ndarray]],
                params: dict, desc: str, batch: int) -> list[Generated]:
    """Call `draw(seeds)` batch by batch under a progress bar; time each image."""
    seeds = image_seeds(settings.seed, n)
    results: list[Generated] = []
    start = 0
    with tqdm(total=len(seeds), desc=desc, unit="image", disable=not settings.progress) as bar:
        for size in chunk_sizes(n, batch):
            chunk = seeds[start : start + size]
            began = time.perf_counter()
            images = draw(chunk)
            seconds = (time.perf_counter() - began) / len(chunk)
            for offset, (seed, image) in enumerate(zip(chunk, images)):
                results.append(Generated(image, start + offset, seed, seconds, {**params, "seed": seed}))
            bar.update(len(chunk))
            bar.set_postfix(s_per_image=f"{seconds:.2f}")
            start += size
    return results


PROMPT_CACHE_SIZE = 64


def prompt_embeddings(model: LoadedModel, prompt: str, settings: GenerationSettings, count: int) -> dict:
    """`prompt_embeds` (and the negative ones under guidance) for `count` images, encoded once per model
    and (prompt, negative prompt): the text encoder is frozen at inference."""
    pipe = model.pipe
    guided = float(settings.guidance) > 1.0 and pipe.unet.config.get("time_cond_proj_dim") is None
    key = (prompt, settings.negative_prompt or "", guided, str(pipe.device), str(pipe.text_encoder.dtype))
    cache = model.prompt_cache  # shared by the app's per-request views: read once, no check-then-read
    entry = cache.get(key)
    if entry is None:
        entry = pipe.encode_prompt(prompt, pipe.device, 1, guided, settings.negative_prompt or None)
        if len(cache) >= PROMPT_CACHE_SIZE:
            cache.clear()
        cache[key] = entry
    positive, negative = entry
    embeds = {"prompt_embeds": positive.repeat(count, 1, 1)}
    if negative is not None:
        embeds["negative_prompt_embeds"] = negative.repeat(count, 1, 1)
    return embeds


def _common_kwargs(model: LoadedModel, prompt: str, settings: GenerationSettings, seeds: list[int]) -> dict:
    return {
        **prompt_embeddings(model, prompt, settings, len(seeds)),
        "num_inference_steps": int(settings.steps),
        "guidance_scale": float(settings.guidance),
        "generator": generators(seeds),
        "output_type": "np",
    }


@torch.inference_mode()
def text2image(model: LoadedModel, prompt: str, n: int = 1, settings: GenerationSettings | None = None) -> list[Generated]:
    """`n` images for one prompt at the model's training size."""
    settings = settings or GenerationSettings()
    if model.task != "text2image":
        raise ValueError(f"{model.path} is an {model.task} model; text-to-image needs a text2image model")
    size = model.size

    def draw(seeds: list[int]) -> list[np.ndarray]:
        with accelerated(model.pipe.unet, settings.accelerate, settings.deepcache_interval):
            out = model.pipe(height=size, width=size, **_common_kwargs(model, prompt, settings, seeds))
        return to_gray_uint8(out.images)

    params = sampling_params(model, prompt, settings)
    return run_batches(n, settings, draw, params, "text2image", settings.batch_for(size, size))


def repaint_region(mask: np.ndarray, radius: int) -> np.ndarray:
    """Mask grown by `radius` pixels: everything the latent-space mask can reach."""
    region = np.asarray(mask) > 0
    if radius <= 0:
        return region
    return ndimage.binary_dilation(region, structure=np.ones((2 * radius + 1, 2 * radius + 1), dtype=bool))


def keep_outside(original: np.ndarray, generated: np.ndarray, mask: np.ndarray, radius: int) -> np.ndarray:
    """The generated pixels inside the grown mask, the original ones everywhere else."""
    return np.where(repaint_region(mask, radius), generated, original).astype(np.uint8)


@torch.inference_mode()
def inpaint(model: LoadedModel, image: np.ndarray, mask: np.ndarray, prompt: str, n: int = 1,
            settings: GenerationSettings | None = None, *, strength: float = 1.0,
            keep_unmasked: bool = True) -> list[Generated]:
    """`n` versions of `image` (uint8 H×W) with the region where `mask` > 0 repainted from `prompt`."""
    settings = settings or GenerationSettings()
    if model.task != "inpaint":
        raise ValueError(f"{model.path} is a {model.task} model; inpainting needs an inpaint model (9-channel UNet)")
    image, mask = np.asarray(image, dtype=np.uint8), np.asarray(mask, dtype=np.uint8)
    if image.shape != mask.shape or image.ndim != 2:
        raise ValueError(f"image {image.shape} and mask {mask.shape} must be the same 2-D size")
    if not mask.any():
        raise ValueError("the inpainting mask is empty: nothing to repaint")
    height, width = image.shape
    rgb = Image.fromarray(image).convert("RGB")
    mask_img = Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8))
    radius = model.vae_scale_factor

    def draw(seeds: list[int]) -> list[np.ndarray]:
        with accelerated(model.pipe.unet, settings.accelerate, settings.deepcache_interval):
            out = model.pipe(image=[rgb] * len(seeds), mask_image=[mask_img] * len(seeds), height=height, width=width,
                             strength=float(strength), **_common_kwargs(model, prompt, settings, seeds))
        painted = to_gray_uint8(out.images)
        return [keep_outside(image, p, mask, radius) if keep_unmasked else p for p in painted]

    params = {**sampling_params(model, prompt, settings), "strength": float(strength)}
    results = run_batches(n, settings, draw, params, "inpaint", settings.batch_for(height, width))
    for result in results:
        result.mask = mask
    return results


__all__ = ["GenerationSettings", "Generated", "check_range", "chunk_sizes", "image_seeds", "prompt_embeddings",
           "text2image", "inpaint", "keep_outside", "repaint_region", "to_gray_uint8"]
