"""What the experiment trackers need beyond Lightning's loggers: images to each, a local MLflow store,
and closing a W&B run so the next run of a sweep in the same process starts its own.

Scalars logged with `self.log` reach every logger through Lightning; images have no common API,
so `log_image` speaks each tracker's own (TensorBoard add_image, W&B log_image, MLflow
log_image with a key and step, which the MLflow UI shows as an image series).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

log = logging.getLogger(__name__)

# MLflow >= 3.7 refuses the file store unless this is set (it is kept in maintenance mode, not removed).
ALLOW_FILE_STORE = "MLFLOW_ALLOW_FILE_STORE"


def local_uri(uri: str) -> str:
    """`file:` URIs made absolute (a relative one would depend on the working directory)."""
    if not uri.startswith("file:"):
        return uri
    path = uri[len("file:"):]
    if path.startswith("//"):
        return uri
    return Path(path).expanduser().resolve().as_uri()


def mlflow_logger(tracking_uri: str | None = None, **kwargs) -> MLFlowLogger:
    """Lightning's MLFlowLogger; a `file:` store is used as given (and allowed on MLflow >= 3.7)."""
    uri = local_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "file:./mlruns")
    if uri.startswith("file:"):
        os.environ.setdefault(ALLOW_FILE_STORE, "true")
    return MLFlowLogger(tracking_uri=uri, **kwargs)


def log_image(logger: Logger, key: str, image: np.ndarray, step: int) -> bool:
    """Send one uint8 HxWx3 image to `logger`; False when the logger takes no images."""
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(key, image, step, dataformats="HWC")
    elif isinstance(logger, WandbLogger):
        logger.log_image(key=key, images=[image], step=step)
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_image(logger.run_id, image, key=key.replace("/", "_"), step=step)
    else:
        return False
    return True


def log_hyperparams(loggers: Iterable[Logger], params: dict) -> None:
    for logger in loggers:
        logger.log_hyperparams(params)


def finish(loggers: Iterable[Logger], failed: bool = False) -> None:
    """Close what Lightning leaves open at the end of fit: the W&B run (its files are complete then)."""
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=1 if failed else 0)


def logging_step(trainer) -> bool:
    """True on the steps Lightning writes step logs (every trainer.log_every_n_steps, as its LearningRateMonitor)."""
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


__all__ = ["ALLOW_FILE_STORE", "local_uri", "mlflow_logger", "log_image", "log_hyperparams", "finish", "logging_step"]

