"""One training run: build everything it needs from the composed config, fit, export, record the result.

The entry point (`python -m mame_lightning.train`) only composes the config and calls `train(cfg)`;
tests and sweeps call the same function. The model and the module are built by `models.building`,
the export is `models.export`; this module wires data, callbacks, loggers and the Trainer around them.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mame_lightning.io import write_json, write_text
from mame_lightning.models.building import RESOLVED_CONFIG, build_components, build_module
from mame_lightning.models.checkpoints import CheckpointError, allowed_types, check_checkpoint
from mame_lightning.models.export import export_with_config
from mame_lightning.models.hub import check_push, push_folder
from mame_lightning.models.loggers import finish as finish_loggers
from mame_lightning.models.loggers import log_hyperparams
from mame_lightning.models.text2image import TrainingDiverged
from mame_lightning.runs import prior_preservation
from mame_lightning.runs.best_checkpoint import ExportChoiceError, check_export_from, restore_for_export
from mame_lightning.runs.quality import QualityConfigError, stop_reason

log = logging.getLogger(__name__)


def save_resolved_config(cfg: DictConfig, path: Path) -> None:
    write_text(path, OmegaConf.to_yaml(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))))


CPU_OVERRIDE = "trainer.accelerator=cpu precision=32-true"


class HardwareError(RuntimeError):
    """The run asks for hardware this machine does not have; the message names the override."""


# Problems of the command line, the data or a checkpoint: the entry point reports them in one line.
USER_ERRORS = (TrainingDiverged, CheckpointError, FileNotFoundError, HardwareError,
               prior_preservation.PriorConfigError, ExportChoiceError, QualityConfigError)


def check_hardware(cfg: DictConfig, cuda_available: bool | None = None) -> None:
    """Fail before anything is loaded when the trainer asks for a GPU that is not there, or for
    fp16 mixed precision on the CPU (which Lightning refuses deep inside the Trainer)."""
    has_gpu = torch.cuda.is_available() if cuda_available is None else cuda_available
    accelerator = str(cfg.trainer.get("accelerator") or "auto").lower()
    precision = str(cfg.trainer.get("precision") or "")
    dataset = cfg.dataset.get("name")
    if accelerator in ("gpu", "cuda") and not has_gpu:
        raise HardwareError(f"trainer.accelerator={accelerator} (the recipe of dataset={dataset} task={cfg.task.name}) "
                            f"needs a CUDA GPU and this machine has none; to train on the CPU instead "
                            f"(slowly) add: {CPU_OVERRIDE}")
    if precision.startswith("16") and (accelerator == "cpu" or (accelerator == "auto" and not has_gpu)):
        raise HardwareError(f"precision={precision} (fp16 mixed precision) needs a CUDA GPU; on the CPU add: "
                            f"{CPU_OVERRIDE} (or precision=bf16-mixed)")


def run_dir_of(cfg: DictConfig) -> Path:
    """The run folder: Hydra's output dir (hydra.run.dir), also the trainer's default_root_dir."""
    return Path(cfg.trainer.default_root_dir)


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """`ckpt_path=` wins; `resume=auto` picks the run folder's last.ckpt when there is one.

    The file is checked first (readable, plain types only), so a damaged one fails in a second with
    its name rather than after the model is built.
    """
    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={path} does not exist")
        return str(check_checkpoint(path))
    if cfg.get("resume") == "auto":
        last = run_dir_of(cfg) / "checkpoints" / "last.ckpt"
        # a requeued SLURM job also has Lightning's hpc_ckpt_<n>.ckpt: the newest one wins
        candidates = [p for p in [last, *run_dir_of(cfg).glob("hpc_ckpt_*.ckpt")] if p.is_file()]
        if candidates:
            newest = max(candidates, key=lambda p: p.stat().st_mtime)
            try:
                check_checkpoint(newest)
            except CheckpointError as exc:
                raise CheckpointError(f"resume=auto: {exc}. Resume from another checkpoint with "
                                      f"ckpt_path=FILE (e.g. one of {last.parent}/step-*.ckpt), or remove "
                                      f"{newest} to start fresh") from exc
            log.info("resume=auto: continuing from %s", newest)
            return str(newest)
        log.info("resume=auto: no %s yet, starting fresh", last)
    elif cfg.get("resume") not in (None, "auto"):
        raise ValueError(f"resume must be null or 'auto', got {cfg.resume!r}")
    return None


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    return [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]


def build_loggers(cfg: DictConfig) -> list:
    """One logger per entry of `logger` (conf/logger: tensorboard, wandb, mlflow, many; ~logger for none).

    A `logger` node that is itself a `_target_` (a config written for one logger) still works.
    """
    node = cfg.get("logger")
    if not node:
        return []
    if "_target_" in node:
        return [instantiate(node)]
    return [instantiate(entry) for entry in node.values() if entry is not None]


def build_trainer(cfg: DictConfig, callbacks: list[L.Callback]) -> L.Trainer:
    loggers = build_loggers(cfg)
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)


def first_use_preparation(cfg: DictConfig):
    """For datasets that can make themselves (synthetic): prepare on first use, else None."""
    if not cfg.dataset.get("prepare_on_first_use"):
        return None
    from mame_lightning.data.prepare.preparation import prepare_from_config

    prepare_cfg = OmegaConf.create({"dataset": OmegaConf.to_container(cfg.dataset, resolve=True)})
    return functools.partial(prepare_from_config, prepare_cfg)


def check_data(cfg: DictConfig) -> None:
    """The prepared set and its listed files, before any model is built (a self-preparing set may be absent)."""
    from mame_lightning.data.loading.prepared_set import check_prepared_files

    if cfg.get("datamodule") and cfg.datamodule.get("prepared_dir"):
        check_prepared_files(cfg.datamodule.prepared_dir, cfg.datamodule.get("task") or cfg.task.data_task,
                             dataset_name=cfg.dataset.get("name"),
                             can_prepare=bool(cfg.dataset.get("prepare_on_first_use")))


def build_datamodule(cfg: DictConfig, components):
    datamodule = instantiate(cfg.datamodule, _partial_=True)(
        tokenizer=components.tokenizer, prepare_fn=first_use_preparation(cfg)
    )
    if cfg.dataset.get("latent_cache") and hasattr(datamodule, "set_vae"):
        datamodule.set_vae(components.vae)
    class_images = prior_preservation.class_images(cfg, components)  # prior=on: drawn by the base model
    if class_images is not None:
        datamodule.set_prior_images(class_images)
    return datamodule


def _final_metric(trainer: L.Trainer, key: str) -> float | None:
    """The last logged value; None when never logged or not finite (JSON has no NaN)."""
    value = trainer.callback_metrics.get(key)
    value = float(value) if value is not None else None
    return value if value is not None and math.isfinite(value) else None


def optimized_metric(trainer: L.Trainer, cfg: DictConfig) -> dict | None:
    """The value a sweeper (Optuna) optimises: `optimized_metric` as the run last logged it."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    value = _final_metric(trainer, name)
    if value is None:
        log.warning("optimized_metric=%s was not logged by this run (logged: %s)", name,
                    ", ".join(sorted(trainer.callback_metrics)) or "nothing")
    return {"name": name, "value": value}


def train(cfg: DictConfig) -> dict:
    """Fit one run described by `cfg`; returns the result record also written to result.json."""
    check_hardware(cfg)
    prior_preservation.check_prior(cfg)
    started = time.time()
    hub_token = check_hub(cfg)
    check_export_from(cfg)
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, run_dir / RESOLVED_CONFIG)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.trainer.get("deterministic"):
        torch.use_deterministic_algorithms(True, warn_only=True)

    check_data(cfg)  # a missing image fails now, not hours in at its first batch
    components = build_components(cfg)
    module = build_module(cfg, components)
    datamodule = build_datamodule(cfg, components)
    trainer = build_trainer(cfg, build_callbacks(cfg))
    log_hyperparams(trainer.loggers, _flat_hparams(cfg))

    ckpt_path = resolve_ckpt_path(cfg)
    # checkpoints are read with weights_only=True (torch's default too, for Lightning releases without the flag)
    safe = {"weights_only": True} if "weights_only" in inspect.signature(L.Trainer.fit).parameters else {}
    try:
        with allowed_types():
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, **safe)
    except TrainingDiverged as exc:
        finish_loggers(trainer.loggers, failed=True)
        # No export: the weights are no use. result.json says why; the caller exits non-zero.
        result = run_result(trainer, module, run_dir, cfg, started, status="diverged", reason=str(exc))
        result["train_loss"] = None  # the last logged value predates the divergence
        if trainer.is_global_zero:
            write_json(run_dir / "result.json", result)
        raise
    except BaseException:
        finish_loggers(trainer.loggers, failed=True)
        raise
    finish_loggers(trainer.loggers)

    status = "interrupted" if trainer.interrupted else "finished"
    reason = stop_reason(trainer)  # callbacks.quality with stop_on_collapse=true
    result = run_result(trainer, module, run_dir, cfg, started, status="stopped" if reason else status, reason=reason)
    if trainer.is_global_zero:
        if cfg.get("export") and not trainer.interrupted and not cfg.trainer.get("fast_dev_run"):
            if weights_sharded(trainer):
                log.info("export: FSDP keeps a shard of the weights on each rank; export the consolidated "
                         "checkpoint with: python -m mame_lightning.export ckpt=%s",
                         run_dir / "checkpoints" / "last.ckpt")
                folder = None
            else:
                result.update(restore_for_export(cfg, trainer, module))  # export.from=best|last
                folder = export_run(cfg, module, datamodule, run_dir / "export", metrics=card_metrics(trainer))
                result["export_dir"] = str(folder)
            if hub_token and folder:
                result["hub_url"] = push_folder(folder, cfg.export.push_to_hub,
                                                private=bool(cfg.export.get("private", True)), token=hub_token)
        write_json(run_dir / "result.json", result)
    return result


def objective(result: dict) -> float | None:
    """What a sweeper (Optuna) optimises: the run's `optimized_metric`; result.json keeps the whole record."""
    metric = result.get("optimized_metric")
    return metric["value"] if metric else None


def run_result(trainer: L.Trainer, module, run_dir: Path, cfg: DictConfig, started: float, *, status: str,
               reason: str | None = None) -> dict:
    """The record written to result.json: steps, losses, skipped steps, time and how the run ended."""
    result = {
        "run_dir": str(run_dir),
        "task": cfg.task.name,
        "status": status,
        "global_step": int(trainer.global_step),
        "world_size": int(trainer.world_size),
        # micro-batches consumed: global_step × accumulate_grad_batches for a completed run
        "micro_batches": int(trainer.fit_loop.epoch_loop.batch_progress.total.completed),
        "train_loss": _final_metric(trainer, "train/loss"),
        "val_loss": _final_metric(trainer, "val/loss"),
        "skipped_steps": int(getattr(module, "skipped_steps", 0)),
        "seconds": round(time.time() - started, 2),
        "interrupted": bool(trainer.interrupted),
        "optimized_metric": optimized_metric(trainer, cfg),
    }
    if reason:
        result["reason"] = reason
    return result


def check_hub(cfg: DictConfig) -> str | None:
    """The Hub token when `export.push_to_hub` is set; fails now rather than after training."""
    export = cfg.get("export")
    if not isinstance(export, DictConfig) or not export.get("push_to_hub"):
        return None
    return check_push(str(export.push_to_hub))


def card_metrics(trainer: L.Trainer) -> dict:
    """The final training and validation scalars (not throughput or learning rate) for the model card."""
    metrics = {"global_step": int(trainer.global_step)}
    for key, value in sorted(trainer.callback_metrics.items()):
        if key.startswith(("train/", "val/")) and key != "train/lr":
            metrics[key] = float(value)
    return metrics


def weights_sharded(trainer: L.Trainer) -> bool:
    """FSDP: each rank holds a shard, so rank 0 cannot save the module alone (its checkpoints are full)."""
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(trainer.strategy, FSDPStrategy)


def export_run(cfg: DictConfig, module, datamodule, out_dir: Path, metrics: dict | None = None) -> Path:
    """Write the diffusers folder with the attributes and counts of the data the model saw."""
    if cfg.task.name == "autoencoder":
        from mame_lightning.models.autoencoder import fit_scaling_factor

        module.vae.eval()
        factor = fit_scaling_factor(module.vae, datamodule.train_dataloader())
        module.vae.register_to_config(scaling_factor=factor)
        log.info("autoencoder: latent scaling factor set to %.4f (1 / latent std)", factor)
    attributes = datamodule.attributes() if hasattr(datamodule, "attributes") else {}
    counts = datamodule.counts() if hasattr(datamodule, "counts") else {}
    if hasattr(datamodule, "attribute_counts"):
        counts["by_attribute"] = datamodule.attribute_counts()
    return export_with_config(module, out_dir, cfg, attributes=attributes, data_counts=counts, metrics=metrics)


def _flat_hparams(cfg: DictConfig) -> dict:
    """A flat view of the interesting choices (TensorBoard's hparams tab, W&B config, MLflow params)."""
    keys = {
        "dataset": cfg.dataset.get("name"),
        "task": cfg.task.name,
        "model": cfg.model.get("_target_"),
        "precision": cfg.precision.lightning,
        "optimizer": cfg.optimizer.get("_target_"),
        "lr": cfg.optimizer.get("lr"),
        "lr_scheduler": (cfg.get("lr_scheduler") or {}).get("name"),
        "batch_size": cfg.dataset.get("batch_size"),
        "accumulate_grad_batches": cfg.trainer.get("accumulate_grad_batches"),
        "max_steps": cfg.trainer.get("max_steps"),
        "seed": cfg.seed,
    }
    return {k: v for k, v in keys.items() if v is not None}

