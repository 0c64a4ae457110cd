"""Training callbacks: sample grids, throughput/memory/gradient statistics and a guard against saving
diverged weights."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image

from mame_lightning.io import write_png
from mame_lightning.models.ema import ema_weights
from mame_lightning.models.loggers import log_image, logging_step
from mame_lightning.models.schedulers import SCHEDULERS, make_scheduler


# -- helpers ----------------------------------------------------------------------------------
def run_folder(trainer: L.Trainer) -> Path:
    """The logger's folder, read locally: `trainer.log_dir` is a collective under DDP, and the
    grid is drawn on rank 0 alone, so calling it there would leave the other ranks waiting."""
    logger = trainer.logger
    log_dir = getattr(logger, "log_dir", None) if logger is not None else None
    return Path(log_dir or trainer.default_root_dir)


def image_grid(rows: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """uint8 grid from rows of HxWx3 float images in [0, 1]."""
    lines = [np.concatenate(list(row), axis=1) for row in rows]
    return (np.clip(np.concatenate(lines, axis=0), 0, 1) * 255).round().astype(np.uint8)


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """3xHxW (or 1xHxW) tensor in [-1, 1] -> RGB PIL image."""
    array = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
    if array.shape[0] == 1:
        array = array.repeat(3, 1, 1)
    return Image.fromarray(array.permute(1, 2, 0).numpy())


def mask_to_pil(mask: torch.Tensor) -> Image.Image:
    return Image.fromarray((mask.detach().float().cpu().reshape(mask.shape[-2:]) > 0.5).byte().numpy() * 255)


def mixed_dtype_autocast(modules: Sequence[torch.nn.Module], device: torch.device):
    """Autocast to the low-precision dtype when the parts disagree (fp32 UNet, fp16 frozen VAE)."""
    dtypes = {next(m.parameters()).dtype for m in modules}
    low = [d for d in dtypes if d != torch.float32]
    if not low:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=low[0])


@contextmanager
def sampling_pipeline(pl_module: L.LightningModule, scheduler: str | None = None) -> Iterator:
    """The module's in-memory pipeline (`scheduler` by name, else DPM-Solver++) for sampling mid-training:
    eval mode, no gradients, EMA weights when kept, mixed-dtype autocast; training modes restored after."""
    components = pl_module.components
    parts = (components.unet, components.vae, components.text_encoder)
    modes = {module: module.training for module in pl_module.modules()}
    pl_module.eval()
    try:
        with torch.no_grad(), ema_weights(getattr(pl_module, "ema", None), components.unet), \
                mixed_dtype_autocast(parts, pl_module.device):
            chosen = make_scheduler(scheduler, components.noise_scheduler.config) if scheduler else None
            pipeline = components.pipeline(chosen)
            pipeline.set_progress_bar_config(disable=True)
            yield pipeline
    finally:
        for module, training in modes.items():
            module.training = training


def first_item(trainer: L.Trainer) -> Mapping | None:
    """Item 0 of the validation (else training) dataset, read directly so no sampler RNG moves.

    The datamodule's val_dataset comes first: Lightning loads validation loaders only when it
    first validates, after on_train_start.
    """
    datamodule = getattr(trainer, "datamodule", None)
    datasets = [getattr(datamodule, "val_dataset", None)]
    for loaders in (trainer.val_dataloaders, trainer.train_dataloader):
        for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
            datasets.append(getattr(loader, "dataset", None))
    for dataset in datasets:
        if dataset is not None and len(dataset):
            return dataset[0]
    return None


# -- sample grid ------------------------------------------------------------------------------
class SampleGrid(L.Callback):
    """Fixed prompts x fixed seeds, sampled with classifier-free guidance (DPM-Solver++ unless
    ``scheduler`` names another, see models/schedulers.py), with ``negative_prompt`` when set.

    Rows are prompts, columns seeds; every image of a column starts from the same noise, so rows
    differ by the prompt only. Logged to every logger (TensorBoard, W&B, MLflow) as `samples` and saved as
    `<log dir>/samples/step_XXXXXX.png`. For an inpainting module the validation image and mask
    come from `inpaint_image`/`inpaint_mask` files, else from item 0 of the validation set.
    """

    def __init__(self, prompts: Sequence[str], seeds: Sequence[int], every_n_steps: int = 100,
                 guidance_scale: float = 4.0, num_inference_steps: int = 24, at_start: bool = True,
                 at_end: bool = True, negative_prompt: str | None = None, scheduler: str | None = None,
                 inpaint_image: str | None = None, inpaint_mask: str | None = None):
        if not prompts or not seeds:
            raise ValueError("SampleGrid needs at least one prompt and one seed")
        self.prompts = [str(p) for p in prompts]
        self.seeds = [int(s) for s in seeds]
        self.every_n_steps = int(every_n_steps or 0)
        self.guidance_scale = float(guidance_scale)
        self.num_inference_steps = int(num_inference_steps)
        self.at_start, self.at_end = at_start, at_end
        self.negative_prompt = negative_prompt or None
        self.scheduler = scheduler
        if scheduler is not None and str(scheduler).lower() not in SCHEDULERS:
            raise ValueError(f"SampleGrid scheduler {scheduler!r}: choose from {', '.join(SCHEDULERS)}")
        self.inpaint_paths = (inpaint_image, inpaint_mask)
        self._reference: tuple[Image.Image, Image.Image] | None = None
        self._last_step: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        if self.at_start:
            self.log_grid(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.log_grid(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end and trainer.global_step != self._last_step:
            self.log_grid(trainer, pl_module)

    def log_grid(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        step = trainer.global_step
        self._last_step = step
        if not trainer.is_global_zero:
            return None
        grid = self.render(pl_module, trainer)
        path = write_png(run_folder(trainer) / "samples" / f"step_{step:06d}.png", grid)
        for logger in trainer.loggers:
            log_image(logger, "samples", grid, step)
        return path

    def render(self, pl_module: L.LightningModule, trainer: L.Trainer | None = None) -> np.ndarray:
        """The grid as uint8 HxWx3, sampled with the EMA weights when the module keeps them."""
        if hasattr(pl_module, "render_samples"):  # an unconditional model: one row, a column per seed
            return pl_module.render_samples(self.seeds, self.num_inference_steps, self.scheduler)
        with sampling_pipeline(pl_module, self.scheduler) as pipeline:
            columns = [self.sample_seed(pipeline, seed, pl_module.components, pl_module, trainer) for seed in self.seeds]
        return image_grid([[column[row] for column in columns] for row in range(len(self.prompts))])

    def sample_seed(self, pipeline, seed: int, components, pl_module, trainer) -> np.ndarray:
        """One image per prompt, all from the same starting noise (CPU generators: device-independent)."""
        generators = [torch.Generator().manual_seed(seed) for _ in self.prompts]
        negative = [self.negative_prompt] * len(self.prompts) if self.negative_prompt else None
        options = dict(prompt=self.prompts, negative_prompt=negative, generator=generators,
                       guidance_scale=self.guidance_scale, num_inference_steps=self.num_inference_steps,
                       output_type="np")
        if components.is_inpaint:
            image, mask = self.reference(components, pl_module, trainer)
            options.update(image=image, mask_image=mask, height=image.height, width=image.width, strength=1.0)
        return pipeline(**options).images

    def reference(self, components, pl_module, trainer) -> tuple[Image.Image, Image.Image]:
        """The fixed (image, mask) the inpainting grid paints into; read once, then reused."""
        if self._reference is None:
            image_path, mask_path = self.inpaint_paths
            if image_path and mask_path:
                self._reference = (Image.open(image_path).convert("RGB"), Image.open(mask_path).convert("L"))
            else:
                self._reference = self.reference_from_data(components, pl_module, trainer)
        return self._reference

    @staticmethod
    def reference_from_data(components, pl_module, trainer) -> tuple[Image.Image, Image.Image]:
        item = first_item(trainer) if trainer is not None else None
        if item is None or "mask" not in item:
            raise ValueError(
                "SampleGrid for inpainting needs an image and mask: set inpaint_image and inpaint_mask, "
                "or give the datamodule a dataset whose items carry 'mask'"
            )
        if "pixel_values" in item:
            pixels = item["pixel_values"]
        else:  # latent cache: decode the mean latent back to pixels
            mean = item["latent_mean"].unsqueeze(0).to(pl_module.device, components.vae.dtype)
            pixels = components.vae.decode(mean).sample[0]
        return to_pil(pixels), mask_to_pil(item["mask"])


# -- statistics -------------------------------------------------------------------------------
def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on CUDA; the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def gradient_norm(module: torch.nn.Module) -> torch.Tensor | None:
    """Total L2 norm of the gradients of the trainable parameters (None before any backward)."""
    norms = [p.grad.detach().float().norm(2) for p in module.parameters() if p.requires_grad and p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else None


def batch_size_of(batch: Mapping) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return len(value)
    return len(next(iter(batch.values())))


class TrainingStats(L.Callback):
    """Logs perf/images_per_s (global batch / per-batch wall clock), perf/peak_mem_mb and
    train/grad_norm (before clipping; Lightning unscales mixed-precision gradients first), every
    trainer.log_every_n_steps steps."""

    def __init__(self):
        self._started: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._started is None or not logging_step(trainer):
            return
        seconds = max(time.perf_counter() - self._started, 1e-9)
        size = batch_size_of(batch)
        images = size * trainer.world_size
        pl_module.log("perf/images_per_s", images / seconds, on_step=True, on_epoch=False, batch_size=size)
        pl_module.log("perf/peak_mem_mb", peak_memory_mb(pl_module.device), on_step=True, on_epoch=False,
                      batch_size=size)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not logging_step(trainer):  # a pass over every gradient: only on the steps that are logged
            return
        norm = gradient_norm(pl_module)
        if norm is not None:
            pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False)


# -- guard ------------------------------------------------------------------------------------
def nonfinite_weights(pl_module: torch.nn.Module) -> list[str]:
    """Names of trainable weights (and EMA averages) holding NaN or inf."""
    named = [(name, p) for name, p in pl_module.named_parameters() if p.requires_grad]
    ema = getattr(pl_module, "ema", None)
    if ema is not None:
        named += [(f"ema.shadow_params[{i}]", p) for i, p in enumerate(ema.shadow_params)]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(p.detach()).all().cpu() for _, p in named])
    return [name for (name, _), ok in zip(named, finite.tolist()) if not ok]


class FiniteCheckpointGuard(L.Callback):
    """Never save a checkpoint with non-finite weights.

    Callback.on_save_checkpoint runs while Lightning assembles the checkpoint dict, before the
    file is written, so raising here stops the write (and the run) with the reason.
    """

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        bad = nonfinite_weights(pl_module)
        if bad:
            raise RuntimeError(
                f"refusing to save a checkpoint at global step {trainer.global_step}: {len(bad)} trainable "
                f"weight tensors hold NaN/inf (e.g. {', '.join(bad[:3])}). Training diverged: resume from the "
                "last good checkpoint with a lower learning rate or precision=bf16-mixed"
            )
