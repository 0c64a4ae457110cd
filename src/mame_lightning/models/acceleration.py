"""Speed switches of a training run that leave its arithmetic alone: the attention kernel, the memory
layout of the convolutions, and torch.compile of the UNet with a persistent compile cache.

Each is a config key of task.module (attention_backend, channels_last, compile); `make bench`
measures what they buy on the machine at hand.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

log = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("sdpa", "xformers", "default")
# torch.compile's on-disk cache of compiled kernels (FX graph and autotuning results), kept across runs
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def set_attention_backend(unet: torch.nn.Module, backend: str) -> None:
    """sdpa: torch scaled_dot_product_attention; default: the plain maths; xformers: if installed."""
    if backend == "sdpa":
        unet.set_attn_processor(AttnProcessor2_0())
    elif backend == "default":
        unet.set_attn_processor(AttnProcessor())
    elif backend == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError as error:
            raise ImportError(
                "attention_backend=xformers needs the xformers package: run "
                "`pip install mame_lightning[gpu]` on a CUDA machine, or use attention_backend=sdpa"
            ) from error
        unet.enable_xformers_memory_efficient_attention()
    else:
        raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")


def use_channels_last(*modules: torch.nn.Module) -> None:
    """NHWC weights: convolution kernels pick their channels-last paths (inputs follow the weights)."""
    for module in modules:
        module.to(memory_format=torch.channels_last)


def compile_options(compile: bool | Mapping | None) -> dict | None:
    """task.module.compile: false/null (eager), true (torch.compile defaults) or torch.compile keyword arguments."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return {}
    if isinstance(compile, Mapping):
        return dict(compile)
    raise ValueError(f"task.module.compile must be true, false or torch.compile options (a mapping), got {compile!r}")


def persistent_compile_cache(cache_dir: str | os.PathLike | None) -> Path | None:
    """Point inductor's kernel cache at `cache_dir` (unless the environment already chose one): a second run of
    the same model and shapes loads its kernels instead of compiling them again."""
    if os.environ.get(INDUCTOR_CACHE_ENV):
        return Path(os.environ[INDUCTOR_CACHE_ENV])
    if cache_dir is None:
        return None
    folder = Path(cache_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[INDUCTOR_CACHE_ENV] = str(folder)
    return folder


def compile_in_place(module: torch.nn.Module, options: Mapping) -> None:
    """nn.Module.compile: the module object and its state_dict keys stay as they were (checkpoints, EMA and
    export see the plain weights); only its forward runs through torch.compile."""
    module.compile(**dict(options))


class FirstStepTimer:
    """Times the first training step, where torch.compile pays its compilation, and says so once."""

    def __init__(self):
        self.started: float | None = None
        self.seconds: float | None = None

    def start(self) -> None:
        if self.seconds is None and self.started is None:
            self.started = time.perf_counter()

    def stop(self, cache: Path | None) -> float | None:
        if self.started is None or self.seconds is not None:
            return None
        self.seconds = time.perf_counter() - self.started
        where = f"kernel cache {cache}" if cache else "no persistent kernel cache"
        log.info("torch.compile: the first training step took %.1f s, compilation included (%s)", self.seconds, where)
        return self.seconds


__all__ = ["ATTENTION_BACKENDS", "FirstStepTimer", "compile_in_place", "compile_options", "persistent_compile_cache",
           "set_attention_backend", "use_channels_last"]
