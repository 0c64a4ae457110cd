"""The model an evaluation mode runs on: our loader or plain diffusers, and its memory released after."""

from __future__ import annotations

import gc

import torch
from omegaconf import DictConfig

from mame_lightning.pipelines.loading import LoadedModel, load_model
from mame_lightning.runs.evaluation.inputs import EvaluationError


def load_for(cfg: DictConfig, path: str, default: str) -> LoadedModel:
    """`pipeline=stock`: plain `from_pretrained` (the folder's scheduler, fp32); project: our loader."""
    from mame_lightning.pipelines.stock import STOCK, load_stock

    kind = str(cfg.get("pipeline") or default)
    if kind not in (STOCK, "project"):
        raise EvaluationError(f"pipeline must be project or stock, got {kind!r}")
    if kind == STOCK:
        return load_stock(path, device=cfg.device)
    return load_model(path, device=cfg.device, dtype=cfg.dtype, scheduler=cfg.guidance.scheduler)


def release_memory() -> None:
    """Free the last model before the next one loads (several models, one at a time)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


__all__ = ["load_for", "release_memory"]
