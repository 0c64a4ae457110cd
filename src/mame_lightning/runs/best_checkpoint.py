"""Which weights a run exports: `export.from=last` (the default: the weights training ended with) or
`export.from=best`: the best checkpoint by `callbacks.checkpoint.monitor` (e.g. `quality/fidelity`
with `callbacks.checkpoint.mode=max`), read back with `weights_only=True` into the module before
the export. A run that never scored a checkpoint exports its last weights and says so."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from mame_lightning.models.checkpoints import load_checkpoint

log = logging.getLogger(__name__)
CHOICES = ("last", "best")


class ExportChoiceError(ValueError):
    """`export.from` names something this run cannot give; the message says what to set."""


def export_from(cfg: DictConfig) -> str:
    export = cfg.get("export")
    choice = str(export.get("from") or "last") if isinstance(export, DictConfig) else "last"
    if choice not in CHOICES:
        raise ExportChoiceError(f"export.from={choice}: choose from {', '.join(CHOICES)}")
    return choice


def check_export_from(cfg: DictConfig) -> None:
    """Before training: `export.from=best` needs a checkpoint callback that monitors a metric."""
    if export_from(cfg) != "best":
        return
    checkpoint = (cfg.get("callbacks") or {}).get("checkpoint")
    if not checkpoint or not checkpoint.get("monitor"):
        raise ExportChoiceError("export.from=best needs a monitored checkpoint: add callbacks.checkpoint.monitor="
                                "quality/fidelity callbacks.checkpoint.mode=max (or another logged metric)")


def monitoring_checkpoint(trainer: L.Trainer) -> ModelCheckpoint | None:
    return next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.monitor), None)


def restore_for_export(cfg: DictConfig, trainer: L.Trainer, module) -> dict:
    """Load the best checkpoint's weights (and EMA state) into `module` when `export.from=best`;
    returns what result.json records: {export_from, checkpoint, monitor, score}."""
    if export_from(cfg) != "best":
        return {"export_from": "last"}
    callback = monitoring_checkpoint(trainer)
    best = Path(callback.best_model_path) if callback is not None and callback.best_model_path else None
    if best is None or not best.is_file():
        log.warning("export.from=best: no checkpoint was scored by %s yet; exporting the last weights",
                    callback.monitor if callback is not None else "a monitor")
        return {"export_from": "last", "note": "no scored checkpoint"}
    state = load_checkpoint(best)
    module.load_state_dict(state["state_dict"])
    if hasattr(module, "on_load_checkpoint"):
        module.on_load_checkpoint(state)
    score = callback.best_model_score
    log.info("export.from=best: exporting %s (%s = %s)", best, callback.monitor,
             f"{float(score):.4f}" if score is not None else "?")
    return {"export_from": "best", "checkpoint": str(best), "monitor": callback.monitor,
            "score": float(score) if score is not None else None, "step": int(state.get("global_step", -1))}


__all__ = ["CHOICES", "ExportChoiceError", "check_export_from", "export_from", "restore_for_export"]
