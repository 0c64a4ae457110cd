"""One arm and seed: train the classifier for exactly `classifier.steps` optimizer steps.

Every arm gets the same steps and batch size from an endless seeded stream over its own training
images, so the arms differ in what they saw, not in how long they trained. With
`classifier.select=best_val` the weights of the best real-validation AUROC are kept instead of the
last ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig

from mame_lightning.utility.classifier import LesionClassifier
from mame_lightning.utility.images import ImageSet, eval_loader, train_loader

SELECTIONS = ("last", "best_val")


@dataclass
class FitResult:
    module: LesionClassifier
    steps: int
    seconds: float
    selected: str


def build_module(cfg: DictConfig) -> LesionClassifier:
    return instantiate(cfg.module, _partial_=True)(network=instantiate(cfg.network.net))


def fit_classifier(cfg: DictConfig, train: ImageSet, val: ImageSet, seed: int, run_dir) -> FitResult:
    """Fit a fresh classifier (weights and batch order from `seed`) and return it on the CPU."""
    select = str(cfg.classifier.select)
    if select not in SELECTIONS:
        raise ValueError(f"classifier.select={select!r}: choose from {', '.join(SELECTIONS)}")
    run_dir = Path(run_dir)
    started = time.perf_counter()
    L.seed_everything(int(seed), workers=True, verbose=False)
    module = build_module(cfg)
    steps = int(cfg.classifier.steps)
    callbacks = []
    if select == "best_val":
        callbacks.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val/auroc",
                                         mode="max", save_top_k=1))
    trainer = instantiate(cfg.trainer, max_steps=steps, val_check_interval=max(1, min(int(cfg.classifier.val_every), steps)),
                          default_root_dir=str(run_dir), callbacks=callbacks,
                          enable_checkpointing=select == "best_val",
                          logger=TensorBoardLogger(str(run_dir), name="", version="tensorboard"))
    batch = int(cfg.classifier.batch_size)
    trainer.fit(module, train_dataloaders=train_loader(train, batch, int(seed)), val_dataloaders=eval_loader(val, batch))
    if select == "best_val" and callbacks[0].best_model_path:
        state = torch.load(callbacks[0].best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    module = module.cpu().eval()
    return FitResult(module, int(trainer.global_step), round(time.perf_counter() - started, 2), select)
