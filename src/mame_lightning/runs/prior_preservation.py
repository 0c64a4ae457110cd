"""`prior=on`: the class images of DreamBooth prior preservation for one training run.

Before training, the run's base model draws the class images (or finds them cached:
`pipelines.class_images`), and the datamodule mixes them into every batch; the module weights
their loss by `task.module.prior_loss_weight`.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

PRIOR_TASKS = ("text2image",)
# the model config keys besides the weights' source that change what the base model draws
IDENTITY_KEYS = ("revision", "variant", "vae_path", "prediction_type")


class PriorConfigError(ValueError):
    """prior=on with a task or settings it cannot work with; the message names the key."""


def enabled(cfg: DictConfig) -> bool:
    prior = cfg.get("prior")
    return bool(prior and prior.get("enabled"))


def check_prior(cfg: DictConfig):
    """The class image settings of prior=on (None when off), checked before any model is loaded."""
    if not enabled(cfg):
        return None
    from mame_lightning.pipelines.class_images import ClassImageSettings  # only runs with prior=on pay for it

    if cfg.task.name not in PRIOR_TASKS:
        raise PriorConfigError(f"prior=on works with task=text2image (it mixes generated class images into "
                               f"text-to-image batches), not task={cfg.task.name}; drop prior=on")
    try:
        return ClassImageSettings.from_options(cfg.prior)
    except (KeyError, TypeError, ValueError) as error:
        raise PriorConfigError(f"prior=on: {error}") from error


def local_rank() -> int:
    """This process's rank on its machine (Lightning's launcher sets LOCAL_RANK, srun SLURM_LOCALID)."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return 0


def class_images(cfg: DictConfig, components) -> Path | None:
    """The folder of class images for this run (drawn now by the first process of this machine when
    none is cached), or None when prior preservation is off."""
    settings = check_prior(cfg)
    if settings is None:
        return None
    from mame_lightning.pipelines.class_images import ensure_class_images, model_identity
    extra = {key: cfg.model.get(key) for key in IDENTITY_KEYS}
    identity = model_identity(components.source, **extra)
    return ensure_class_images(components, settings, cfg.prior.cache_dir, identity, device=cfg.prior.get("device"),
                               draws=local_rank() == 0, wait_s=60.0 * float(cfg.prior.get("wait_minutes", 60)),
                               progress=bool(cfg.trainer.get("enable_progress_bar", True)))


__all__ = ["PriorConfigError", "check_prior", "class_images", "enabled", "local_rank"]
