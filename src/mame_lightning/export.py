"""Export a training checkpoint to a standard diffusers folder.

`python -m mame_lightning.export ckpt=RUN/checkpoints/last.ckpt [out=DIR]` rebuilds the run's
model from `RUN/resolved_config.yaml`, loads the checkpoint weights (EMA weights when the run kept
them) and writes the pipeline folder plus `mame_lightning.json` (default `RUN/export`).
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

# What a run config found next to a checkpoint may build: our models and modules, optimizers.
# A config is code (`_target_` names a callable), so one from elsewhere is held to this list.
ALLOWED_TARGETS = ("mame_lightning.models.", "torch.optim.", "bitsandbytes.optim.", "diffusers.", "transformers.")
BUILT_SECTIONS = ("model", "optimizer", "task")


def find_run_config(ckpt: Path) -> Path:
    for folder in [ckpt.parent, *ckpt.parents]:
        candidate = folder / "resolved_config.yaml"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no resolved_config.yaml found above {ckpt}; pass config=PATH to the run's resolved_config.yaml"
    )


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


def check_targets(cfg: DictConfig, source: Path, allowed: tuple[str, ...] = ALLOWED_TARGETS) -> None:
    """Refuse a run config that would build anything outside `allowed` (it would run that code)."""
    for section in BUILT_SECTIONS:
        node = OmegaConf.to_container(cfg[section], resolve=True) if section in cfg else None
        for where, target in _targets(node, section):
            if not target.startswith(allowed):
                raise ValueError(
                    f"{source}: {where}._target_={target} is not one of the builders a checkpoint export may "
                    f"call ({', '.join(allowed)}); refusing to run it. Export from a run config you trust "
                    "(config=FILE) that builds only those"
                )


def _prepared_attributes(cfg: DictConfig) -> tuple[dict, dict]:
    """Attribute values and counts of the prepared set the run trained on (attributes.json)."""
    path = Path(cfg.dataset.prepared_dir) / "attributes.json"
    if not path.is_file():
        return {}, {}
    data = json.loads(path.read_text())
    task_attrs = data.get(cfg.task.name, data)
    attrs = {k: task_attrs[k] for k in ("views", "densities", "areas", "vendors") if k in task_attrs}
    return attrs, data.get("counts", {})


def export_checkpoint(ckpt: str | Path, out: str | Path | None = None, config: str | Path | None = None) -> Path:
    from mame_lightning.models.checkpoints import check_checkpoint, load_checkpoint
    from mame_lightning.models.export import export_pipeline
    from mame_lightning.training import build_components, build_module

    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint not found: {ckpt}")
    check_checkpoint(ckpt)  # before the model is built: a bad file fails in a second
    config_path = Path(config) if config else find_run_config(ckpt)
    cfg = OmegaConf.load(config_path)
    check_targets(cfg, config_path)
    module = build_module(cfg, build_components(cfg))
    state = load_checkpoint(ckpt)
    module.load_state_dict(state["state_dict"])
    if hasattr(module, "on_load_checkpoint"):
        module.on_load_checkpoint(state)
    attrs, counts = _prepared_attributes(cfg)
    out = Path(out) if out else ckpt.parent.parent / "export"
    templates = OmegaConf.to_container(cfg.dataset.get("templates") or {}, resolve=True)
    return Path(
        export_pipeline(
            module, out, task=cfg.task.name, templates=templates, attributes=attrs,
            train_config=OmegaConf.to_container(cfg, resolve=True), data_counts=counts,
            prepare_size=int(cfg.dataset.get("size") or 0),
        )
    )


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    if not cfg.get("ckpt"):
        raise SystemExit("usage: python -m mame_lightning.export ckpt=RUN/checkpoints/last.ckpt [out=DIR] [config=FILE]")
    try:
        folder = export_checkpoint(cfg.ckpt, cfg.get("out"), cfg.get("config"))
    except (ValueError, OSError) as exc:  # a bad checkpoint or config: one line, no traceback
        raise SystemExit(f"error: {exc}") from exc
    print(f"exported diffusers pipeline to {folder}")


if __name__ == "__main__":
    main()
