"""Speed switches of a training run that leave its arithmetic alone: the attention kernel and the memory
layout of the convolutions.

Each is a config key of task.module (attention_backend, channels_last, vae_channels_last); `make bench`
measures what they buy on the machine at hand. torch.compile of the UNet is not offered for training: on
torch 2.13's CPU inductor the compiled UNet's backward returned gradients that differ from eager ones
(docs/benchmarks.md).
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

ATTENTION_BACKENDS = ("sdpa", "xformers", "default")


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


__all__ = ["ATTENTION_BACKENDS", "set_attention_backend", "use_channels_last"]
