"""LoRA fine-tuning through peft, the way diffusers' example trainers do it (train_text_to_image_lora.py,
train_dreambooth_lora.py).

`add_lora` puts low-rank adapters on the attention projections of the UNet (and of the CLIP text encoder) with
`add_adapter(LoraConfig(...))` and freezes everything else: the base weights take the frozen parts' dtype (the
VAE's, which the precision group sets: half precision under fp16/bf16 mixed precision) and only the adapters,
cast to float32 master weights, train. A checkpoint keeps only the adapters (`adapter_state`), which is what
makes it small; `check_adapter_state` refuses one that does not fit. `write_export` writes the base pipeline
plus `pytorch_lora_weights.safetensors` (what `load_lora_weights` reads), or, merged, a plain pipeline.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from pathlib import Path

import torch

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file name diffusers' load_lora_weights looks for
PARTS = ("unet", "text_encoder")
CHECKPOINT_KEY = "lora"  # a LoRA run's checkpoint says so: its state_dict holds the adapters only


class LoraStateError(ValueError):
    """A checkpoint's weights do not fit this run's adapters; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class LoraOptions:
    """The `lora` config group: rank, alpha (None: = rank), dropout and the target modules of each part."""

    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    init: str | bool = "gaussian"  # peft's init_lora_weights; "gaussian" as diffusers' trainers
    unet: tuple[str, ...] = ()
    text_encoder: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, options: Mapping | None) -> LoraOptions | None:
        """None when no part has target modules (`lora=none`)."""
        if not options:
            return None
        options = dict(options)
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"lora: unknown keys {unknown}; expected rank, alpha, dropout, init, unet, text_encoder")
        targets = {part: tuple(options.pop(part, None) or ()) for part in PARTS}
        if not any(targets.values()):
            return None
        made = cls(**options, **targets)
        if int(made.rank) < 1 or not 0.0 <= float(made.dropout) < 1.0:
            raise ValueError(f"lora.rank must be at least 1 and lora.dropout in [0, 1), "
                             f"got {made.rank} and {made.dropout}")
        return made

    @property
    def parts(self) -> list[str]:
        return [part for part in PARTS if getattr(self, part)]

    def peft_config(self, part: str):
        from peft import LoraConfig

        return LoraConfig(r=int(self.rank), lora_alpha=float(self.alpha if self.alpha is not None else self.rank),
                          lora_dropout=float(self.dropout), init_lora_weights=self.init,
                          target_modules=list(getattr(self, part)))

    def summary(self) -> dict:
        """Plain values for the export sidecar, the model card and the checkpoint."""
        return {"rank": int(self.rank), "alpha": float(self.alpha if self.alpha is not None else self.rank),
                "dropout": float(self.dropout), **{part: list(getattr(self, part)) for part in self.parts}}


def adapter_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The adapter weights peft injected (lora_A, lora_B, ... of every tuner layer)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [getattr(layer, name) for layer in model.modules() if isinstance(layer, BaseTunerLayer)
            for name in layer.adapter_layer_names]


def attach_adapter(model: torch.nn.Module, config) -> None:
    """`add_adapter(config)` on a diffusers model; on the transformers text encoder what its own `add_adapter`
    does (peft's `inject_adapter_in_model`, adapter "default"), which transformers gates behind a newer peft
    release than diffusers needs."""
    from diffusers import ModelMixin
    from peft import inject_adapter_in_model

    if isinstance(model, ModelMixin):
        model.add_adapter(config)
        return
    inject_adapter_in_model(config, model, "default")
    model._hf_peft_config_loaded = True  # as transformers marks it: gradient checkpointing then feeds the adapters


def add_lora(components, options: Mapping | None) -> LoraOptions | None:
    """Adapters on the parts `options` targets; every base weight frozen in the frozen parts' dtype.

    Returns the options, or None (nothing changed) when no part is targeted.
    """
    lora = LoraOptions.from_config(options)
    if lora is None:
        return None
    frozen = components.vae.dtype
    for part in PARTS:
        model = getattr(components, part)
        model.requires_grad_(False).to(frozen)
        if part not in lora.parts:
            continue
        try:
            attach_adapter(model, lora.peft_config(part))
        except ValueError as error:  # peft: "Target modules {...} not found in the base model"
            raise ValueError(f"lora.{part}={list(getattr(lora, part))}: {error}") from error
        for layer in adapter_modules(model):
            layer.requires_grad_(True).to(torch.float32)  # fp32 master weights (diffusers' cast_training_params)
    return lora


def trainable_names(module: torch.nn.Module) -> set[str]:
    return {name for name, parameter in module.named_parameters() if parameter.requires_grad}


def adapter_state(module: torch.nn.Module, state_dict: Mapping) -> dict:
    """The part of a module's state_dict that trains: what a LoRA checkpoint holds."""
    keep = trainable_names(module)
    return {key: value for key, value in state_dict.items() if key in keep}


def check_adapter_state(module: torch.nn.Module, state_dict: Mapping) -> None:
    """A LoRA checkpoint must hold exactly this run's adapter weights."""
    expected, given = trainable_names(module), set(state_dict)
    extra, missing = sorted(given - expected), sorted(expected - given)
    if extra and len(extra) > len(given & expected):
        raise LoraStateError(f"the checkpoint holds full model weights (e.g. {extra[0]}), not LoRA adapters: it is "
                             "not from a LoRA run. Train LoRA from its export instead (model.pretrained=RUN/export)")
    if extra or missing:
        example = (extra or missing)[0]
        raise LoraStateError(f"the checkpoint's adapters do not match this run's lora settings ({len(missing)} "
                             f"missing, {len(extra)} unexpected, e.g. {example}): resume with the lora group, "
                             "rank and target modules the run was started with")


def check_checkpoint_kind(checkpoint: Mapping, lora: LoraOptions | None) -> None:
    """A LoRA checkpoint resumes only a LoRA run (its state_dict lacks the base weights), and vice versa."""
    saved = checkpoint.get(CHECKPOINT_KEY)
    if saved and lora is None:
        parts = " and ".join(p for p in PARTS if p in saved)
        group = "unet_text" if "text_encoder" in saved else "unet"
        raise LoraStateError(f"the checkpoint holds LoRA adapters only ({parts}, rank {saved.get('rank')}): resume "
                             f"it with the lora group it was trained with (lora={group})")


def write_export(components, folder: Path, lora: LoraOptions, merge: bool = False) -> dict:
    """Write the pipeline folder of a LoRA run; returns the sidecar's `lora` entry.

    Unmerged: the base pipeline (the adapters removed) plus `pytorch_lora_weights.safetensors`, written by
    `save_lora_weights` with the adapter configs as metadata so `load_lora_weights` restores alpha and rank.
    Merged (`export.merge_lora=true`): the adapters fused into the weights (`fuse_lora`), no LoRA file.
    The live modules are left as they are: the work happens on float32 copies of the UNet and text encoder.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    copies = {part: copy.deepcopy(getattr(components, part)).to(torch.float32) for part in PARTS}
    pipe = dataclasses.replace(components, **copies).pipeline()
    layers, metadata = {}, {}
    for part in lora.parts:
        layers[f"{part}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(copies[part]))
        metadata[f"{part}_lora_adapter_metadata"] = copies[part].peft_config["default"].to_dict()
    if merge:
        pipe.fuse_lora(components=lora.parts)
    pipe.unload_lora_weights()
    pipe.save_pretrained(str(folder))
    if not merge:
        type(pipe).save_lora_weights(str(folder), **layers, **metadata, safe_serialization=True)
    return {**lora.summary(), "merged": bool(merge), "weights": None if merge else LORA_WEIGHTS}


def has_lora_weights(folder: str | Path) -> bool:
    """An export of a LoRA run that was not merged: the base pipeline plus the adapter file."""
    return (Path(folder) / LORA_WEIGHTS).is_file()


__all__ = ["CHECKPOINT_KEY", "LORA_WEIGHTS", "LoraOptions", "LoraStateError", "adapter_state", "add_lora",
           "check_adapter_state", "check_checkpoint_kind", "has_lora_weights", "write_export"]
