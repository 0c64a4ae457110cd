"""Class images for DreamBooth prior preservation: drawn once from the base model, then cached.

Fine-tuning on new images makes a model forget what it knew of their class; DreamBooth's remedy is
to keep training on images the base model itself draws for the class prompt. They depend only on
the base model, the prompt and the sampling settings, so they are drawn once and kept in a folder
named by a hash of exactly those (`class_image_folder`): a resumed run, or any later run from the
same base with the same settings, finds and reuses them. The folder is written whole or not at all
(`io.atomic_folder`), and holds `metadata.jsonl` in the prepared-set form (id, file_name, prompt),
so training reads it with the prepared-set reader, and `class_images.json` with what it was made of.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from mame_lightning.io import atomic_folder, write_json, write_text
from mame_lightning.models.callbacks import mixed_dtype_autocast
from mame_lightning.models.schedulers import DEFAULT_SCHEDULER, SCHEDULERS, make_scheduler
from mame_lightning.pipelines.generation import GenerationSettings, text2image
from mame_lightning.pipelines.loading import LoadedModel, resolve_device
from mame_lightning.pipelines.marking import save_png

log = logging.getLogger(__name__)

CLASS_IMAGES_FILE = "class_images.json"  # what the set was made of
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt")


@dataclass(frozen=True)
class ClassImageSettings:
    """What the class images depend on besides the base model (batch_size changes only the speed)."""

    prompt: str
    num_images: int
    seed: int = 0
    size: int = 512
    steps: int = 24
    guidance: float = 4.0
    scheduler: str = DEFAULT_SCHEDULER
    negative_prompt: str | None = None
    batch_size: int = 4

    def __post_init__(self) -> None:
        if not str(self.prompt).strip():
            raise ValueError("prior.class_prompt is empty: give the prompt of the class the images belong to")
        if int(self.num_images) < 1:
            raise ValueError(f"prior.num_class_images={self.num_images}: use 1 or more")
        if int(self.size) < 8:
            raise ValueError(f"prior.size={self.size}: use the training images' side in pixels")
        if str(self.scheduler).lower() not in SCHEDULERS:
            raise ValueError(f"prior.scheduler={self.scheduler!r}: choose from {', '.join(SCHEDULERS)}")
        self.generation()  # steps, guidance, seed and batch size in range

    @classmethod
    def from_options(cls, options: Mapping) -> ClassImageSettings:
        """From the `prior` config group's keys."""
        return cls(prompt=str(options["class_prompt"]), num_images=int(options["num_class_images"]),
                   seed=int(options.get("seed", 0)), size=int(options["size"]), steps=int(options["steps"]),
                   guidance=float(options["guidance"]), scheduler=str(options.get("scheduler") or DEFAULT_SCHEDULER),
                   negative_prompt=options.get("negative_prompt") or None,
                   batch_size=int(options.get("batch_size", 4)))

    def generation(self, progress: bool = True) -> GenerationSettings:
        return GenerationSettings(guidance=self.guidance, steps=self.steps, negative_prompt=self.negative_prompt,
                                  seed=self.seed, batch_size=self.batch_size, progress=progress)

    def key_fields(self) -> dict:
        fields = asdict(self)
        fields.pop("batch_size")
        fields["scheduler"] = str(fields["scheduler"]).lower()
        return fields


def weights_fingerprint(source: str | Path) -> list[list]:
    """(relative path, size, modification time) of a local folder's weight files; [] for a hub id.

    A folder is known by its path and these, so replacing its weights (a new download, another
    fine-tune written to the same place) gives new class images rather than stale ones.
    """
    folder = Path(str(source)).expanduser()
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    return [[p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def model_identity(source: str | Path, **extra) -> dict:
    """The base model as the cache key sees it: its hub id or folder (with weight files) and `extra`
    (revision, variant, another VAE, ...; None values left out)."""
    identity = {"source": str(source), "weights": weights_fingerprint(source)}
    identity.update({k: v for k, v in extra.items() if v is not None})
    return identity


def class_image_key(identity: Mapping, settings: ClassImageSettings) -> str:
    text = json.dumps({"model": dict(identity), "images": settings.key_fields()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def class_image_folder(cache_dir: str | Path, identity: Mapping, settings: ClassImageSettings) -> Path:
    """`cache_dir/<prompt words>-<key>`: the prompt for people browsing, the key for the code."""
    words = re.sub(r"[^a-z0-9]+", "-", settings.prompt.lower()).strip("-")[:40] or "class"
    return Path(cache_dir) / f"{words}-{class_image_key(identity, settings)}"


def is_complete(folder: Path) -> bool:
    return (Path(folder) / CLASS_IMAGES_FILE).is_file() and (Path(folder) / "metadata.jsonl").is_file()


def draw_class_images(components, settings: ClassImageSettings, device: str | None = "auto",
                      progress: bool = True) -> list:
    """The images (`pipelines.generation.Generated`) from the components as they are now (the base model).

    The modules go to `device` for sampling (half precision autocast on CUDA) and back to where they
    were, in the mode they were in, so training starts from the same state.
    """
    parts = (components.unet, components.vae, components.text_encoder)
    homes = [(next(part.parameters()).device, part.training) for part in parts]
    target = resolve_device(device)
    scheduler = make_scheduler(settings.scheduler, components.noise_scheduler.config)
    model = LoadedModel(pipe=components.pipeline(scheduler), task="text2image", path=components.source,
                        metadata={"prepare_size": settings.size}, scheduler=str(settings.scheduler).lower(),
                        base_scheduler_config=dict(components.noise_scheduler.config))
    model.pipe.set_progress_bar_config(disable=True)
    try:
        for part in parts:
            part.to(target).eval()
        autocast = (torch.autocast("cuda", dtype=torch.float16) if target.type == "cuda"
                    else mixed_dtype_autocast(parts, target))
        with autocast:
            return text2image(model, settings.prompt, settings.num_images, settings.generation(progress))
    finally:
        for part, (home, training) in zip(parts, homes):
            part.to(home).train(training)
        if target.type == "cuda":
            torch.cuda.empty_cache()


def write_class_images(folder: Path, results: list, settings: ClassImageSettings, identity: Mapping,
                       seconds: float) -> Path:
    """PNGs (marked synthetic, with their sampling parameters) + metadata.jsonl + class_images.json, at once.

    A folder another process finished meanwhile is kept (same key, same images); one that was there
    before, incomplete (its class_images.json removed by hand), is replaced.
    """
    with atomic_folder(folder, keep_existing=not Path(folder).exists()) as tmp:
        lines = []
        for result in results:
            name = f"class_{result.index:05d}"
            save_png(result.image, tmp / "images" / f"{name}.png", result.params)
            lines.append(json.dumps({"id": name, "file_name": f"images/{name}.png", "prompt": settings.prompt,
                                     "seed": result.seed}))
        write_text(tmp / "metadata.jsonl", "\n".join(lines) + "\n", fsync=False)
        write_json(tmp / CLASS_IMAGES_FILE, {
            "model": dict(identity), "settings": asdict(settings), "count": len(results),
            "seconds": round(seconds, 2), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }, fsync=False)
    return folder


def wait_for(folder: Path, timeout_s: float, poll_s: float = 5.0) -> Path:
    """Another process draws the images: wait until its folder is complete."""
    deadline = time.monotonic() + timeout_s
    while not is_complete(folder):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{folder}: the class images did not appear within {timeout_s:.0f} s (the first "
                               "process draws them; raise prior.wait_minutes, or draw them with a one-process run)")
        time.sleep(poll_s)
    return folder


def ensure_class_images(components, settings: ClassImageSettings, cache_dir: str | Path, identity: Mapping, *,
                        device: str | None = "auto", draws: bool = True, wait_s: float = 3600.0,
                        progress: bool = True) -> Path:
    """The class image folder for this base model and these settings: reused when it exists, else drawn
    now (`draws`) or waited for (the other processes of a multi-process run)."""
    folder = class_image_folder(cache_dir, identity, settings)
    if is_complete(folder):
        log.info("prior preservation: reusing %d class images in %s", settings.num_images, folder)
        return folder
    if not draws:
        return wait_for(folder, wait_s)
    log.info("prior preservation: drawing %d class images of %r from the base model into %s",
             settings.num_images, settings.prompt, folder)
    started = time.perf_counter()
    results = draw_class_images(components, settings, device, progress)
    return write_class_images(folder, results, settings, identity, time.perf_counter() - started)


__all__ = ["CLASS_IMAGES_FILE", "ClassImageSettings", "class_image_folder", "class_image_key", "draw_class_images",
           "ensure_class_images", "is_complete", "model_identity", "wait_for", "weights_fingerprint",
           "write_class_images"]
