"""Load a trained model for generation: an exported diffusers folder or a training checkpoint.

The exported folder is the one contract between training and generation (docs/architecture.md,
"Exported model folder"); a `.ckpt` is exported to a temporary folder first (`models.export`), so
both paths load through the same `from_pretrained` code. The sidecar `mame_lightning.json` tells the task, the
prompt templates and the attribute values the model was trained on. The export of a LoRA run holds the base
pipeline plus `pytorch_lora_weights.safetensors`, loaded on top with diffusers' `load_lora_weights`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mame_lightning.models.export import METADATA_FILE, read_export_metadata
from mame_lightning.models.lora import has_lora_weights
from mame_lightning.models.schedulers import DEFAULT_SCHEDULER, SCHEDULERS, make_scheduler

log = logging.getLogger(__name__)

TASKS = ("text2image", "inpaint")
INPAINT_IN_CHANNELS = 9
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


class ModelNotFoundError(FileNotFoundError):
    """The model path names nothing loadable; the message says how to get a model."""


@dataclass
class LoadedModel:
    """A ready diffusers pipeline plus what generation needs to know about it."""

    pipe: Any
    task: str
    path: str
    metadata: dict = field(default_factory=dict)
    scheduler: str = DEFAULT_SCHEDULER
    base_scheduler_config: dict = field(default_factory=dict)
    prompt_cache: dict = field(default_factory=dict, repr=False)  # (prompt, negative, ...) -> text embeddings

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    @property
    def size(self) -> int:
        """Image side the model was trained at: the preparation size, else the UNet's native size."""
        prepared = int(self.metadata.get("prepare_size") or 0)
        return prepared or int(self.pipe.unet.config.sample_size) * self.vae_scale_factor

    def set_scheduler(self, name: str) -> None:
        self.pipe.scheduler = make_scheduler(name, self.base_scheduler_config)
        self.scheduler = name


def model_label(path: str | Path) -> str:
    """How outputs name a model: the last parts of its path, never an absolute path.

    `/home/me/runs/siemens/export` -> `siemens/export`; a checkpoint keeps its run folder too
    (`siemens/checkpoints/last.ckpt`).
    """
    path = Path(str(path))
    parts = [part for part in path.parts if part not in (path.anchor, "", ".", "..")]
    return "/".join(parts[-(3 if path.suffix == ".ckpt" else 2):])


HOW_TO_GET_A_MODEL = (
    "Generation needs an exported diffusers folder or a training checkpoint: train one with "
    "`python -m mame_lightning.train` (the run writes <run dir>/export), or export a checkpoint with "
    "`python -m mame_lightning.export ckpt=RUN/checkpoints/last.ckpt out=DIR`."
)


def missing_model_message(path: str | Path | None, what: str = "model folder") -> str:
    where = f"{what} not found: {path}" if path else "no model given (model_path=...)"
    return f"{where}. {HOW_TO_GET_A_MODEL}"


def resolve_device(device: str | None = "auto") -> torch.device:
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """"auto" is fp16 on CUDA (the speed the paper's sampling times assume), fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    key = str(dtype).lower()
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[key]


def read_metadata(folder: str | Path) -> dict:
    """The folder's `mame_lightning.json`, or {} when the folder came from elsewhere."""
    return read_export_metadata(folder, missing_ok=True)


def detect_task(folder: str | Path, metadata: dict) -> str:
    """Task from the sidecar, else from the UNet: 9 input channels (latent, mask, masked image) is inpainting."""
    task = metadata.get("task")
    if task:
        if task not in TASKS:
            raise ValueError(f"{Path(folder) / METADATA_FILE}: unknown task {task!r}; expected one of {TASKS}")
        return task
    unet_config = Path(folder) / "unet" / "config.json"
    if not unet_config.is_file():
        raise ModelNotFoundError(f"{folder}: no unet/config.json, not a diffusers pipeline folder. {HOW_TO_GET_A_MODEL}")
    in_channels = json.loads(unet_config.read_text()).get("in_channels", 4)
    return "inpaint" if in_channels == INPAINT_IN_CHANNELS else "text2image"


def pipeline_class(task: str):
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    return StableDiffusionInpaintPipeline if task == "inpaint" else StableDiffusionPipeline


def _dtype_argument(dtype: torch.dtype) -> dict:
    """diffusers renamed `torch_dtype` to `dtype` (0.42); older releases only know the first."""
    import diffusers

    major, minor = (int(part) for part in diffusers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (0, 42) else "torch_dtype": dtype}


def with_lora_weights(pipe, folder: str | Path):
    """The pipeline with the folder's LoRA adapters loaded (a LoRA run's unmerged export), else as it is."""
    if has_lora_weights(folder):
        pipe.load_lora_weights(str(folder))
    return pipe


def load_folder(folder: str | Path, *, device: str | None = "auto", dtype: str | None = "auto",
                scheduler: str = DEFAULT_SCHEDULER, label: str | None = None) -> LoadedModel:
    """Load an exported pipeline folder (and its LoRA adapters, if any) onto `device` with a named scheduler."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        if folder.is_dir():
            raise ModelNotFoundError(f"{folder}: no model_index.json, not an exported pipeline folder. {HOW_TO_GET_A_MODEL}")
        raise ModelNotFoundError(missing_model_message(folder))
    metadata = read_metadata(folder)
    task = detect_task(folder, metadata)
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    pipe = pipeline_class(task).from_pretrained(
        folder, **_dtype_argument(torch_dtype), safety_checker=None, requires_safety_checker=False
    )
    pipe = with_lora_weights(pipe, folder).to(target)
    pipe.set_progress_bar_config(disable=True)
    model = LoadedModel(pipe=pipe, task=task, path=label or str(folder), metadata=metadata,
                        base_scheduler_config=dict(pipe.scheduler.config))
    model.set_scheduler(scheduler)
    return model


def load_model(path: str | Path | None, *, device: str | None = "auto", dtype: str | None = "auto",
               scheduler: str = DEFAULT_SCHEDULER) -> LoadedModel:
    """An exported folder, or a `*.ckpt` exported on the fly through `mame_lightning.export`."""
    if not path:
        raise ModelNotFoundError(missing_model_message(None))
    path = Path(path).expanduser()
    if path.suffix == ".ckpt":
        if not path.is_file():
            raise ModelNotFoundError(missing_model_message(path, "checkpoint"))
        from mame_lightning.models.export import export_checkpoint

        with tempfile.TemporaryDirectory(prefix="mame_export_") as tmp:
            log.info("exporting %s to a temporary pipeline folder", path)
            folder = export_checkpoint(path, out=Path(tmp) / "export")
            return load_folder(folder, device=device, dtype=dtype, scheduler=scheduler, label=str(path))
    return load_folder(path, device=device, dtype=dtype, scheduler=scheduler)


__all__ = [
    "LoadedModel", "ModelNotFoundError", "SCHEDULERS", "DEFAULT_SCHEDULER", "load_model", "load_folder", "model_label",
    "make_scheduler", "read_metadata", "detect_task", "resolve_device", "resolve_dtype", "missing_model_message",
    "with_lora_weights",
]
