"""DeepCache-style reuse of a UNet's deep features across adjacent sampling steps (opt-in).

Adjacent denoising steps change the deep, low-resolution UNet features little (Ma et al., 2023,
"DeepCache"). diffusers' own cache hooks (FirstBlockCache, PyramidAttentionBroadcast, FasterCache,
MagCache) target transformer denoisers and none skips a UNet2DConditionModel's deep blocks, so
this module does, through diffusers' hook registry. On a full step the whole UNet runs and every
block below the outermost level keeps its output (so the input of the last up block is kept); on a
cached step those blocks hand back the kept outputs without running, and only conv_in, the time
embedding, the first down block, the last up block (kept deep features + fresh skip connections)
and the output convolutions run. A full step comes every `interval` UNet calls (one call per
sampling step, classifier-free guidance included); interval 1 is the plain UNet. The hooks live
for one sampling call; two calls at once on one UNet would share them (the app does not use it).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from diffusers.hooks import HookRegistry, ModelHook

ACCELERATE = ("none", "deepcache")
HOOK_NAME = "mame_lightning_deep_cache"


class StepClock:
    """Which UNet call of the current sampling run this is, and whether it runs in full.

    A run starts again (full step) when the timestep does not go down or the latents change
    shape: samplers walk timesteps downwards, so either means a new image or a new batch.
    """

    def __init__(self, interval: int):
        if int(interval) < 1:
            raise ValueError(f"deepcache.interval={interval}: use a whole number of 1 or more")
        self.interval = int(interval)
        self.calls = 0
        self.full = True
        self._last: tuple[float, tuple] | None = None

    def tick(self, sample: torch.Tensor, timestep) -> None:
        t = float(torch.as_tensor(timestep).flatten()[0])
        shape = tuple(sample.shape)
        if self._last is None or t >= self._last[0] or shape != self._last[1]:
            self.calls = 0
        self.full = self.calls % self.interval == 0
        self.calls += 1
        self._last = (t, shape)


class ClockHook(ModelHook):
    """On the UNet itself: advance the clock before every call."""

    def __init__(self, clock: StepClock):
        super().__init__()
        self.clock = clock

    def pre_forward(self, module, *args, **kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        self.clock.tick(sample, timestep)
        return args, kwargs


class ReuseHook(ModelHook):
    """On a deep block: run and keep the output on full steps, hand it back on cached ones."""

    def __init__(self, clock: StepClock):
        super().__init__()
        self.clock = clock
        self.output = None

    def new_forward(self, module, *args, **kwargs):
        if self.clock.full or self.output is None:
            self.output = self.fn_ref.original_forward(*args, **kwargs)
        return self.output


def deep_blocks(unet) -> list[torch.nn.Module]:
    """Every block below the outermost resolution: down blocks 2.., the mid block, up blocks ..n-1."""
    if len(unet.down_blocks) < 2 or len(unet.up_blocks) < 2 or unet.mid_block is None:
        raise ValueError("accelerate=deepcache needs a UNet with at least two down and up blocks and a mid block")
    return [*unet.down_blocks[1:], unet.mid_block, *unet.up_blocks[:-1]]


@contextmanager
def deep_cache(unet, interval: int = 3):
    """Within the block, `unet` reuses its deep features on all but every `interval`-th call."""
    clock = StepClock(interval)
    modules = [unet, *deep_blocks(unet)]
    registries = [HookRegistry.check_if_exists_or_initialize(m) for m in modules]
    registries[0].register_hook(ClockHook(clock), HOOK_NAME)
    for registry in registries[1:]:
        registry.register_hook(ReuseHook(clock), HOOK_NAME)
    try:
        yield clock
    finally:
        for registry in registries:
            registry.remove_hook(HOOK_NAME, recurse=False)


def accelerated(unet, accelerate: str, interval: int = 3):
    """The context a sampling call runs in: plain (`none`) or with deep-feature caching."""
    if accelerate == "deepcache":
        return deep_cache(unet, interval)
    if accelerate == "none":
        return nullcontext()
    raise ValueError(f"accelerate={accelerate!r}: choose from {', '.join(ACCELERATE)}")


__all__ = ["ACCELERATE", "accelerated", "deep_blocks", "deep_cache", "StepClock"]
