"""Exponential moving average of the UNet weights, over diffusers' EMAModel.

Averaged weights give smoother samples than the last optimiser step; they are only swapped into
the live UNet for sampling and export, and swapped back out afterwards so training continues
from the raw weights.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from diffusers.training_utils import EMAModel


def build_ema(unet: torch.nn.Module, options: Mapping | None) -> EMAModel | None:
    """An EMAModel over the UNet parameters, or None when `options` is empty/None.

    `options` are EMAModel keyword arguments, e.g. {"decay": 0.9999, "use_ema_warmup": True}.
    """
    if not options:
        return None
    options = dict(options)
    if not 0.0 < float(options.get("decay", 0.9999)) <= 1.0:
        raise ValueError(f"ema.decay must be in (0, 1], got {options['decay']}")
    return EMAModel(unet.parameters(), **options)


def ema_on_device(ema: EMAModel, device: torch.device) -> None:
    """Move the averaged weights next to the model (they start wherever the model was built)."""
    if ema.shadow_params and ema.shadow_params[0].device != torch.device(device):
        ema.to(device=device)


@torch.no_grad()
def ema_step(ema: EMAModel, unet: torch.nn.Module) -> None:
    """Fold the current UNet weights into the average (call once per optimiser step)."""
    parameters = list(unet.parameters())
    ema_on_device(ema, parameters[0].device)
    ema.step(parameters)


@contextmanager
def ema_weights(ema: EMAModel | None, unet: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Temporarily load the averaged weights into `unet`; a no-op when there is no EMA."""
    if ema is None:
        yield unet
        return
    parameters = list(unet.parameters())
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield unet
    finally:
        ema.restore(parameters)
