"""The training-time quality callback (`callbacks.quality`): every `every_n_steps` optimizer steps it
samples a small fixed set (each prompt x `images_per_prompt` seeds, the run's inference scheduler
and guidance, EMA weights when kept) and logs diversity, prompt fidelity and, with local Inception
weights, KID (`eval.quality`, `eval.fid`) to every logger under `quality/...`.

The scalars also enter `trainer.callback_metrics`, so `ModelCheckpoint(monitor="quality/fidelity",
mode="max")` keeps the best checkpoint; a checkpoint callback that monitors a `quality/` key makes
this callback also evaluate at that checkpoint's steps, so every saved checkpoint is judged on its
own weights. The collapse guard warns, and with `stop_on_collapse` stops the run cleanly: the
Trainer ends after the step, `last.ckpt` is written, the run exports, and `result.json` carries
status `stopped` with the reason (`stop_reason`). Sampling runs on rank 0; the scores are broadcast
so every rank takes the same checkpoint and stop decisions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from mame_lightning.eval.fid import WEIGHTS_FILE_NAME, fid_kid, inception_features, skip_reason
from mame_lightning.eval.fidelity import AREA_LABELS, AREA_THRESHOLDS
from mame_lightning.eval.quality import (CollapseGuard, diversity_scores, fidelity_scores, prompt_attributes,
                                         quality_scalars)
from mame_lightning.models.callbacks import sampling_pipeline
from mame_lightning.models.schedulers import SCHEDULERS

log = logging.getLogger(__name__)
PREFIX = "quality"


class QualityConfigError(ValueError):
    """A quality setting this run cannot honour; the message names the key."""


def to_uint8(images: np.ndarray) -> list[np.ndarray]:
    """NxHxWxC floats in [0, 1] (a pipeline's `output_type="np"`) -> HxW grey uint8 images."""
    grey = np.asarray(images, dtype=np.float64).mean(axis=-1) if np.ndim(images) == 4 else np.asarray(images)
    return list((np.clip(grey, 0, 1) * 255).round().astype(np.uint8))


class QualityMonitor(L.Callback):
    """Diversity, prompt fidelity and KID of a fixed sample set during training, and a collapse guard."""

    def __init__(self, prompts: Sequence[str], images_per_prompt: int = 4, seed: int = 0, every_n_steps: int = 1000,
                 guidance_scale: float = 4.0, num_inference_steps: int = 24, negative_prompt: str | None = None,
                 scheduler: str | None = None, batch_size: int = 8, min_diversity: float | None = 0.05,
                 patience: int | None = None, min_delta: float = 0.0, stop_on_collapse: bool = False,
                 kid_weights: str | None = None, kid_feature: torch.nn.Module | None = None, kid_real: int = 32,
                 area_thresholds: Sequence[float] = AREA_THRESHOLDS, area_labels: Sequence[str] = AREA_LABELS):
        if not prompts:
            raise ValueError("callbacks.quality.prompts: give at least one prompt")
        if int(images_per_prompt) < 2:
            raise ValueError(f"callbacks.quality.images_per_prompt={images_per_prompt}: pairwise MS-SSIM needs 2 or more")
        if scheduler is not None and str(scheduler).lower() not in SCHEDULERS:
            raise ValueError(f"callbacks.quality.scheduler={scheduler!r}: choose from {', '.join(SCHEDULERS)}")
        self.prompts = [str(p) for p in prompts]
        self.seeds = [int(seed) + i for i in range(int(images_per_prompt))]
        self.every_n_steps = int(every_n_steps or 0)
        self.guidance_scale, self.num_inference_steps = float(guidance_scale), int(num_inference_steps)
        self.negative_prompt, self.scheduler = negative_prompt or None, scheduler
        self.batch_size = max(1, int(batch_size))
        self.stop_on_collapse = bool(stop_on_collapse)
        self.guard = CollapseGuard(min_diversity=min_diversity, patience=patience, min_delta=float(min_delta))
        self.kid_weights, self.kid_feature, self.kid_real = kid_weights, kid_feature, int(kid_real)
        self.area_thresholds, self.area_labels = tuple(area_thresholds), tuple(area_labels)
        self.expected = {p: prompt_attributes(p, self.area_labels) for p in self.prompts}
        self.enabled = True
        self.checkpoint_steps: list[int] = []
        self.stop_reason: str | None = None
        self.last_scalars: dict[str, float] = {}
        self._last_step: int | None = None
        self._kid_skip: str | None = None
        self._real: list[np.ndarray] | None = None

    # -- when ---------------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        if getattr(pl_module, "task", None) != "text2image" or not hasattr(pl_module, "components"):
            self.enabled = False
            log.info("quality: off (it measures text-to-image models; this run trains %s)", type(pl_module).__name__)
            return
        watching = [cb for cb in trainer.checkpoint_callbacks
                    if isinstance(cb, ModelCheckpoint) and str(cb.monitor or "").startswith(PREFIX + "/")]
        if any(cb.monitor.startswith(f"{PREFIX}/fidelity") for cb in watching) and \
                not any(self.expected.values()):
            raise QualityConfigError(f"callbacks.checkpoint.monitor={watching[0].monitor}: none of the quality prompts "
                             f"names a view (CC/MLO) or an area ({'/'.join(self.area_labels)}), so prompt fidelity "
                             f"is never measured: {self.prompts}")
        self.checkpoint_steps = sorted({int(getattr(cb, "_every_n_train_steps", 0) or 0) for cb in watching} - {0})
        if self.kid_feature is None:
            self._kid_skip = skip_reason(self.kid_weights)
            if self._kid_skip and not self.kid_weights:
                self._kid_skip = f"no local Inception weights (callbacks.quality.kid_weights=/path/to/{WEIGHTS_FILE_NAME})"
            if self._kid_skip:
                log.info("quality: KID skipped: %s",
                         self._kid_skip.split("skipped: ", 1)[-1].replace("eval.fid.weights", "callbacks.quality.kid_weights"))

    def due(self, step: int) -> bool:
        if not self.enabled or step <= 0 or step == self._last_step:
            return False
        return any(n > 0 and step % n == 0 for n in [self.every_n_steps, *self.checkpoint_steps])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.due(step):
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.stop_reason is None:
            return
        for cb in trainer.checkpoint_callbacks:  # the step it stopped at, as last.ckpt
            if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath:
                path = Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
                trainer.save_checkpoint(path)
                cb.last_model_path = str(path)
                break

    # -- what ---------------------------------------------------------------------------------
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        step = trainer.global_step
        self._last_step = step
        scores = None
        if trainer.is_global_zero:
            started = time.perf_counter()
            scores = self.score(self.generate(pl_module), trainer, pl_module)
            scores["scalars"][f"{PREFIX}/seconds"] = time.perf_counter() - started
        scores = trainer.strategy.broadcast(scores, src=0)
        scalars = scores["scalars"]
        self.last_scalars = scalars
        for name, value in scalars.items():  # what ModelCheckpoint and EarlyStopping read
            trainer.callback_metrics[name] = torch.tensor(value)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=step)
        alarms = self.guard.update(step, scalars.get(f"{PREFIX}/diversity"), scalars.get(f"{PREFIX}/fidelity"),
                                   scores.get("least_diverse_prompt"))
        for alarm in alarms:
            log.warning("quality: %s%s", alarm, "; stopping (stop_on_collapse=true)" if self.stop_on_collapse else "")
        if alarms and self.stop_on_collapse:
            self.stop_reason = "collapse: " + "; ".join(alarms)
            trainer.should_stop = True
        return scalars

    def generate(self, pl_module: L.LightningModule) -> dict[str, list[np.ndarray]]:
        """Each prompt with every seed (a CPU generator each: the same noise on any device)."""
        images: dict[str, list[np.ndarray]] = {}
        jobs = [(p, s) for p in self.prompts for s in self.seeds]
        with sampling_pipeline(pl_module, self.scheduler) as pipeline:
            for start in range(0, len(jobs), self.batch_size):
                chunk = jobs[start:start + self.batch_size]
                out = pipeline(prompt=[p for p, _ in chunk], generator=[torch.Generator().manual_seed(s) for _, s in chunk],
                               negative_prompt=[self.negative_prompt] * len(chunk) if self.negative_prompt else None,
                               guidance_scale=self.guidance_scale, num_inference_steps=self.num_inference_steps,
                               output_type="np").images
                for (prompt, _), image in zip(chunk, to_uint8(out)):
                    images.setdefault(prompt, []).append(image)
        return images

    def score(self, images: dict[str, list[np.ndarray]], trainer=None, pl_module=None) -> dict:
        diversity = diversity_scores(images)
        fidelity = fidelity_scores(images, self.expected, self.area_thresholds, self.area_labels)
        kid = self.kid(images, trainer, pl_module) if trainer is not None else None
        return {"scalars": quality_scalars(diversity, fidelity, kid, PREFIX),
                "least_diverse_prompt": diversity["least_diverse_prompt"]}

    def kid(self, images: dict[str, list[np.ndarray]], trainer, pl_module) -> dict | None:
        if self.kid_feature is None and self._kid_skip:
            return None
        real = self.real_images(trainer, pl_module)
        if len(real) < 2:
            log.info("quality: KID skipped (fewer than 2 validation images)")
            return None
        if self.kid_feature is None:
            self.kid_feature = inception_features(self.kid_weights)
        fake = [image for group in images.values() for image in group]
        result = fid_kid(real, fake, feature=self.kid_feature, device=pl_module.device, kid_subsets=50)
        return result

    def real_images(self, trainer, pl_module) -> list[np.ndarray]:
        """Up to `kid_real` validation images (decoded from their latents under a latent cache), read once."""
        if self._real is None:
            dataset = getattr(getattr(trainer, "datamodule", None), "val_dataset", None)
            self._real = []
            for index in range(min(self.kid_real, len(dataset) if dataset is not None else 0)):
                item = dataset[index]
                if "pixel_values" in item:
                    pixels = item["pixel_values"].float()
                else:
                    vae = pl_module.components.vae
                    with torch.no_grad():
                        mean = item["latent_mean"].unsqueeze(0).to(pl_module.device, vae.dtype)
                        pixels = vae.decode(mean).sample[0].float().cpu()
                self._real.extend(to_uint8(((pixels.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).unsqueeze(0).numpy()))
        return self._real

    # -- resume ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"guard": self.guard.state_dict(), "last_scalars": dict(self.last_scalars)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.guard.load_state_dict(state_dict.get("guard") or {})
        self.last_scalars = dict(state_dict.get("last_scalars") or {})


def stop_reason(trainer: L.Trainer) -> str | None:
    """Why a quality callback stopped the run (None when none did)."""
    return next((cb.stop_reason for cb in trainer.callbacks if isinstance(cb, QualityMonitor) and cb.stop_reason),
                None)


__all__ = ["QualityConfigError", "QualityMonitor", "stop_reason", "to_uint8"]
