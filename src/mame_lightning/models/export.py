"""Export a trained module as a standard diffusers folder plus the `mame_lightning.json` sidecar.

The folder loads with `StableDiffusionPipeline.from_pretrained` (or the inpainting pipeline for a
9-channel UNet) and no code of ours; the sidecar tells generation and evaluation which prompt
templates and attribute values the model was trained on, and README.md is the same told as a
Hugging Face model card. Weights are written in float32 (EMA
weights when the run kept an average), and the folder appears complete or not at all.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch

from mame_lightning.io import atomic_folder, write_text
from mame_lightning.models.ema import ema_weights
from mame_lightning.models.model_card import write_model_card

METADATA_FILE = "mame_lightning.json"
ATTRIBUTE_KEYS = ("views", "densities", "areas", "vendors")


@contextmanager
def float32_weights(*modules: torch.nn.Module) -> Iterator[None]:
    """Cast modules to float32 for writing and back afterwards (fp16/bf16 -> fp32 -> back is exact)."""
    dtypes = [next(m.parameters()).dtype for m in modules]
    try:
        for module in modules:
            module.to(torch.float32)
        yield
    finally:
        for module, dtype in zip(modules, dtypes):
            module.to(dtype)


def export_metadata(*, task, templates=None, attributes=None, train_config=None, data_counts=None,
                    prepare_size: int = 0, ema: bool = False) -> dict:
    """The sidecar contents; attribute lists always carry the four keys (empty when unknown)."""
    attributes = dict(attributes or {})
    return {
        "task": task,
        "templates": dict(templates or {}),
        "attributes": {key: list(attributes.get(key) or []) for key in ATTRIBUTE_KEYS},
        "train_config": dict(train_config or {}),
        "data_counts": dict(data_counts or {}),
        "prepare_size": int(prepare_size or 0),
        "ema_weights": bool(ema),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def check_export_target(folder: Path) -> None:
    """An export may replace an earlier export, never a file or a folder of something else."""
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder}: export target exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "model_index.json").is_file():
        raise FileExistsError(
            f"{folder}: exists, is not empty and is not a diffusers export; refusing to replace it"
        )


def export_pipeline(
    module,
    folder: str | os.PathLike,
    *,
    task: str | None = None,
    templates: Mapping | None = None,
    attributes: Mapping | None = None,
    train_config: Mapping | None = None,
    data_counts: Mapping | None = None,
    prepare_size: int = 0,
    metrics: Mapping | None = None,
    card: Mapping | None = None,
) -> Path:
    """Write `module.components` as a diffusers pipeline folder (DPM-Solver++) + mame_lightning.json
    + README.md (model card with `metrics`; `card` may set its `license` and `base_model`)."""
    components = module.components
    task = task or getattr(module, "task", None) or ("inpaint" if components.is_inpaint else "text2image")
    if task == "inpaint" and not components.is_inpaint:
        raise ValueError(f"task=inpaint but the UNet takes {components.unet.config.in_channels} input channels, not 9")
    ema = getattr(module, "ema", None)
    metadata = export_metadata(task=task, templates=templates, attributes=attributes, train_config=train_config,
                               data_counts=data_counts, prepare_size=prepare_size, ema=ema is not None)
    text = json.dumps(metadata, indent=2, default=str)
    folder = Path(folder)
    check_export_target(folder)
    with atomic_folder(folder) as tmp:
        parts = (components.unet, components.vae, components.text_encoder)
        with torch.no_grad(), ema_weights(ema, components.unet), float32_weights(*parts):
            components.save_pretrained(tmp)
        write_text(tmp / METADATA_FILE, text, fsync=False)  # the folder is flushed as a whole
        card = {k: v for k, v in dict(card or {}).items() if k in ("license", "base_model") and v}
        write_model_card(tmp, json.loads(text), metrics=metrics, **card)
    return folder


def read_export_metadata(folder: str | os.PathLike) -> dict:
    """The sidecar of an exported folder; errors name the folder and what is wrong."""
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; is {folder} a folder written by mame_lightning's export?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from error
