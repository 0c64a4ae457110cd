"""What an evaluation run works on: model folders, prompts, guidance scales, real and generated image sets.

Everything here is checked before any image is generated, so a typo in a path or an attribute
fails in a second with a message naming it, not after an hour of sampling.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image

from mame_lightning.pipelines.generation import GenerationSettings
from mame_lightning.pipelines.loading import ModelNotFoundError, missing_model_message

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
METADATA_FILE = "metadata.jsonl"


class EvaluationError(ValueError):
    """Bad evaluation input (paths, mode, prompts); the message names what is wrong and where."""


# ---------------------------------------------------------------- models

def model_paths(cfg: DictConfig) -> list[str]:
    """model_path as a list: one path, a list of paths, or a comma-free string of one path."""
    value = cfg.get("model_path")
    if value is None or value == "" or (isinstance(value, (list, ListConfig)) and not value):
        raise ModelNotFoundError(missing_model_message(None))
    items = list(value) if isinstance(value, (list, ListConfig)) else [value]
    return [str(item) for item in items]


def check_model_paths(paths: Sequence[str]) -> list[str]:
    """Every model must exist before the first one starts generating."""
    for path in paths:
        target = Path(path).expanduser()
        if target.suffix == ".ckpt":
            if not target.is_file():
                raise ModelNotFoundError(missing_model_message(target, "checkpoint"))
        elif not (target / "model_index.json").is_file():
            what = "model folder (no model_index.json)" if target.is_dir() else "model folder"
            raise ModelNotFoundError(missing_model_message(target, what))
    return list(paths)


def model_label(path: str) -> str:
    """A short name for tables and folders: runs/x/export -> x, runs/x/checkpoints/last.ckpt -> x_last."""
    target = Path(path).expanduser().resolve()
    if target.suffix == ".ckpt":
        run = target.parent.parent if target.parent.name == "checkpoints" else target.parent
        name = f"{run.name}_{target.stem}"
    else:
        name = target.parent.name if target.name == "export" and target.parent.name else target.name
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", name) or "model"


def model_labels(paths: Sequence[str]) -> list[str]:
    """Labels of several models, made unique with a numeric suffix."""
    labels: list[str] = []
    for path in paths:
        label, number = model_label(path), 2
        while label in labels:
            label, number = f"{model_label(path)}_{number}", number + 1
        labels.append(label)
    return labels


# ---------------------------------------------------------------- prompts and scales

def spread(items: Sequence, limit: int | None) -> list:
    """At most `limit` items, evenly spaced over the list (first and last kept): wider coverage than a prefix."""
    items = list(items)
    if limit is None or len(items) <= int(limit):
        return items
    if int(limit) < 1:
        raise EvaluationError(f"the prompt cap must be at least 1, got {limit}")
    picks = np.unique(np.linspace(0, len(items) - 1, int(limit)).round().astype(int))
    return [items[i] for i in picks]


def attribute_combinations(metadata: dict, limit: int | None = None) -> list[dict[str, str]]:
    """Every combination of the attribute values the model was trained on, over its template's slots."""
    from mame_lightning.data.prompts import template_fields
    from mame_lightning.pipelines.prompting import ATTRIBUTE_LISTS, known_values, model_template

    known = known_values(metadata)
    fields = [f for f in template_fields(model_template(metadata, "text2image")) if f in ATTRIBUTE_LISTS and known[f]]
    combos = [dict(zip(fields, values)) for values in itertools.product(*(known[f] for f in fields))]
    return spread(combos, limit)


def sweep_prompts(cfg: DictConfig, metadata: dict) -> list[str]:
    """`prompts` (free text, or attribute mappings checked against the model), else one per combination."""
    from mame_lightning.pipelines.prompting import build_prompt

    given = cfg.get("prompts")
    if given:
        items = [given] if isinstance(given, str) else list(given)
        prompts = [build_prompt(metadata, attributes=OmegaConf.to_container(item) if isinstance(item, DictConfig)
                                else dict(item)) if not isinstance(item, str) else item for item in items]
    else:
        prompts = [build_prompt(metadata, attributes=combo)
                   for combo in attribute_combinations(metadata, cfg.get("max_prompts"))]
    return list(dict.fromkeys(prompts))


def override_key(override: str) -> str:
    """'guidance.scale=4' -> 'guidance.scale' (also for +, ++ and ~ overrides)."""
    return override.split("=", 1)[0].lstrip("+~")


def sweep_scales(cfg: DictConfig, multirun_overrides: Sequence[str] | None = None) -> list[float]:
    """sweep_scales when given; a multirun job that sets guidance.scale evaluates that scale; else guidance.scales."""
    explicit = cfg.get("sweep_scales")
    if explicit is not None:
        scales = [explicit] if isinstance(explicit, (int, float)) else list(explicit)
    elif multirun_overrides and any(override_key(o) == "guidance.scale" for o in multirun_overrides):
        scales = [cfg.guidance.scale]
    else:
        scales = list(cfg.guidance.scales)
    if not scales:
        raise EvaluationError("no guidance scales to sweep: set guidance.scales=[4,6,...] or sweep_scales=[...]")
    return [float(s) for s in scales]


def generation_settings(cfg: DictConfig, guidance: float, seed: int | None = None) -> GenerationSettings:
    """Sampling settings (steps, negative prompt: the guidance.* keys of conf/sampling) at one guidance scale."""
    return GenerationSettings(guidance=float(guidance), steps=int(cfg.guidance.steps),
                              negative_prompt=cfg.guidance.get("negative_prompt") or None,
                              seed=int(cfg.seed if seed is None else seed), batch_size=int(cfg.get("batch_size", 1)),
                              progress=False)


# ---------------------------------------------------------------- image sets

@dataclass
class ImageEntry:
    path: Path
    prompt: str | None = None


def _metadata_entries(folder: Path, split: str | None) -> list[ImageEntry]:
    entries = []
    path = folder / METADATA_FILE
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            image = folder / record["file_name"]
        except (ValueError, KeyError, TypeError) as error:
            raise EvaluationError(f"{path}: line {number}: not a metadata record with file_name ({error})") from error
        if split and record.get("split") != split:
            continue
        if not image.is_file():
            raise EvaluationError(f"{path}: line {number}: image {image} not found")
        entries.append(ImageEntry(image, record.get("prompt")))
    return entries


def image_entries(folder: str | Path | None, what: str, split: str | None = None) -> list[ImageEntry]:
    """Images of a prepared set (root or task folder with metadata.jsonl) or of a plain folder of images."""
    if not folder:
        raise EvaluationError(f"no {what} given ({what}=DIR)")
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise EvaluationError(f"{what} not found: {folder}")
    if not (folder / METADATA_FILE).is_file() and (folder / "text2image" / METADATA_FILE).is_file():
        folder = folder / "text2image"
    if (folder / METADATA_FILE).is_file():
        entries = _metadata_entries(folder, split)
    else:
        entries = [ImageEntry(p) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not entries:
        where = f" of split {split!r}" if split else ""
        raise EvaluationError(f"{what} {folder}: no images{where} (expected {METADATA_FILE} with file_name "
                              f"entries, or *.png / *.jpg files)")
    return entries


def load_images(paths: Sequence[Path]) -> list[np.ndarray]:
    """8-bit grey arrays (mammograms are grey; colour files are converted)."""
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(np.asarray(image.convert("L")))
        except OSError as error:
            raise EvaluationError(f"{path}: cannot read the image ({error})") from error
    return images


__all__ = ["EvaluationError", "ImageEntry", "model_paths", "check_model_paths", "model_label", "model_labels",
           "spread", "attribute_combinations", "sweep_prompts", "override_key", "sweep_scales",
           "generation_settings", "image_entries", "load_images"]

