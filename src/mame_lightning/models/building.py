"""Models from a run config: the components (conf/model), the task's LightningModule (conf/task) with
its optimizer and learning-rate schedule partials, and the check that keeps an untrusted config
from building anything else.

Training builds through here, and so does exporting a checkpoint, so a checkpoint is always
rebuilt exactly as its run built it.
"""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

# The fully resolved config of a run, written beside its checkpoints; readable without Hydra's runtime.
RESOLVED_CONFIG = "resolved_config.yaml"
# What a run config found next to a checkpoint may build: our models and modules, optimizers, schedules.
# A config is code (`_target_` names a callable), so one from elsewhere is held to this list.
ALLOWED_TARGETS = ("mame_lightning.models.", "torch.optim.", "bitsandbytes.optim.", "diffusers.", "transformers.")
BUILT_SECTIONS = ("model", "optimizer", "lr_scheduler", "task")


def build_components(cfg: DictConfig):
    """Model components from conf/model, shaped by the precision group and the task.

    The precision group's dtype applies to frozen parts unless the model config sets one; the
    inpainting task asks for a 9-channel UNet (a tiny one built so, a 4-channel checkpoint widened).
    """
    kwargs: dict[str, Any] = {}
    frozen = cfg.precision.get("frozen_dtype")
    if frozen and "frozen_dtype" in cfg.model and cfg.model.frozen_dtype is None:
        kwargs["frozen_dtype"] = frozen
    if cfg.task.get("data_task") == "inpaint" and cfg.task.name == "inpaint":
        if "inpaint" in cfg.model and not cfg.model.inpaint:
            kwargs["inpaint"] = True
        elif "inpaint_in_channels" in cfg.model and cfg.model.inpaint_in_channels is None:
            kwargs["inpaint_in_channels"] = 9
    return instantiate(cfg.model, **kwargs)


def build_module(cfg: DictConfig, components):
    """The task's LightningModule around `components`, with the optimizer (and LR schedule) partials and,
    when the `lora` group targets a part, the LoRA options.

    Objects are handed to the partial, not to instantiate: Hydra would turn a dataclass into config.
    """
    options = {"components": components, "optimizer": instantiate(cfg.optimizer)}
    if cfg.get("lr_scheduler") is not None:
        options["lr_scheduler"] = instantiate(cfg.lr_scheduler)
    lora = OmegaConf.to_container(cfg.lora, resolve=True) if cfg.get("lora") else None
    if lora and any(lora.get(part) for part in ("unet", "text_encoder")):  # conf/lora/: adapters, base frozen
        if cfg.task.name not in ("text2image", "inpaint"):
            raise ValueError(f"the lora group trains adapters on Stable Diffusion's UNet and text encoder: use it with "
                             f"task=text2image or task=inpaint, not task={cfg.task.name} (or lora=none)")
        options["lora"] = lora
    return instantiate(cfg.task.module, _partial_=True)(**options)


def _targets(node, where: str):
    """(key path, `_target_`) of every object the node would build."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_":
                yield where, str(value)
            else:
                yield from _targets(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _targets(value, f"{where}[{i}]")


def check_targets(cfg: DictConfig, source, allowed: tuple[str, ...] = ALLOWED_TARGETS) -> None:
    """Refuse a run config that would build anything outside `allowed` (it would run that code)."""
    for section in BUILT_SECTIONS:
        node = OmegaConf.to_container(cfg[section], resolve=True) if cfg.get(section) is not None else None
        for where, target in _targets(node, section):
            if not target.startswith(allowed):
                raise ValueError(
                    f"{source}: {where}._target_={target} is not one of the builders a checkpoint export may "
                    f"call ({', '.join(allowed)}); refusing to run it. Export from a run config you trust "
                    "(config=FILE) that builds only those"
                )


__all__ = ["ALLOWED_TARGETS", "RESOLVED_CONFIG", "build_components", "build_module", "check_targets"]
