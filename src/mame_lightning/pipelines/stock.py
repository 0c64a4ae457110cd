"""An exported folder loaded exactly as any diffusers user loads it, with nothing of ours on top.

`StableDiffusionPipeline.from_pretrained(folder)` (or the inpainting pipeline for a 9-channel
UNet), float32, the scheduler saved in the folder, and `load_lora_weights(folder)` when the folder is a
LoRA run's unmerged export (what a diffusers user does with it). Evaluations that claim to describe what a
diffusers user gets (`pipeline=stock`) load through here; the result quacks like `LoadedModel`, so
the same generation runners serve both.
"""

from __future__ import annotations

from pathlib import Path

from mame_lightning.pipelines.loading import (LoadedModel, ModelNotFoundError, detect_task, missing_model_message,
                                              pipeline_class, read_metadata, resolve_device, with_lora_weights)

STOCK = "stock"


def load_stock(folder: str | Path, device: str | None = "auto") -> LoadedModel:
    """`<Pipeline>.from_pretrained(folder)` (+ `load_lora_weights`), `.to(device)`: its own scheduler, float32."""
    folder = Path(folder).expanduser()
    if not (folder / "model_index.json").is_file():
        raise ModelNotFoundError(missing_model_message(folder, "exported pipeline folder (pipeline=stock needs one, "
                                                               "not a checkpoint)"))
    metadata = read_metadata(folder)
    task = detect_task(folder, metadata)
    cls = pipeline_class(task)
    pipe = with_lora_weights(cls.from_pretrained(folder), folder).to(resolve_device(device))
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(pipe=pipe, task=task, path=str(folder), metadata=metadata,
                       scheduler=f"{STOCK} {cls.__name__} ({type(pipe.scheduler).__name__})",
                       base_scheduler_config=dict(pipe.scheduler.config))


__all__ = ["STOCK", "load_stock"]
