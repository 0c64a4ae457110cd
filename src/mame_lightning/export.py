"""Export a training checkpoint to a standard diffusers folder.

`python -m mame_lightning.export ckpt=RUN/checkpoints/last.ckpt [out=DIR] [push_to_hub=OWNER/NAME]`
rebuilds the run's model from `RUN/resolved_config.yaml`, loads the checkpoint weights (EMA weights
when the run kept them) and writes the pipeline folder plus `mame_lightning.json` and the model card
README.md (default `RUN/export`); `push_to_hub` uploads it (token: HF_TOKEN).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from mame_lightning.models.hub import check_push, push_folder

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
    """Attribute values (attributes.json) and images per value (metadata.jsonl) of the prepared
    set the run trained on, for the task's own part of it."""
    from mame_lightning.data.datamodule import ATTRIBUTE_COLUMNS

    root = Path(cfg.dataset.prepared_dir)
    data_task = cfg.task.get("data_task") or cfg.task.name
    path = root / "attributes.json"
    if not path.is_file():
        return {}, {}
    data = json.loads(path.read_text())
    task_attrs = (data.get("tasks") or {}).get(data_task) or data
    attrs = {k: task_attrs[k] for k in ATTRIBUTE_COLUMNS if k in task_attrs}
    counts: dict = {"prepared": task_attrs.get("count")} if task_attrs.get("count") is not None else {}
    lines = root / data_task / "metadata.jsonl"
    if lines.is_file():
        records = [json.loads(line) for line in lines.read_text().splitlines() if line.strip()]
        counts["by_attribute"] = {
            name: dict(sorted(Counter(str(r[col]) for r in records if r.get(col) is not None).items()))
            for name, col in ATTRIBUTE_COLUMNS.items()}
        counts["by_attribute_scope"] = "prepared"
    return attrs, counts


def _run_metrics(run_config: Path, global_step: int) -> dict | None:
    """The run's final losses (result.json) when the checkpoint is the run's last step."""
    path = run_config.parent / "result.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    if result.get("global_step") != global_step:
        return {"global_step": global_step}
    metrics = {"global_step": global_step, "train/loss": result.get("train_loss"), "val/loss": result.get("val_loss")}
    return {k: v for k, v in metrics.items() if v is not None}


def export_checkpoint(ckpt: str | Path, out: str | Path | None = None, config: str | Path | None = None) -> Path:
    from mame_lightning.models.checkpoints import check_checkpoint, load_checkpoint
    from mame_lightning.models.export import export_pipeline
    from mame_lightning.training import build_components, build_module, card_options

    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint not found: {ckpt}")
    check_checkpoint(ckpt)  # before the model is built: a bad file fails in a second
    config = Path(config) if config else find_run_config(ckpt)
    cfg = OmegaConf.load(config)
    check_targets(cfg, config)
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
            metrics=_run_metrics(config, int(state.get("global_step", -1))), card=card_options(cfg),
        )
    )


# An absolute folder: found the same way from `python -m`, a console command or an in-process call.
CONF_DIR = str(Path(__file__).resolve().parent / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    if not cfg.get("ckpt"):
        raise SystemExit("usage: python -m mame_lightning.export ckpt=RUN/checkpoints/last.ckpt [out=DIR] [config=FILE]")
    try:
        token = check_push(cfg.push_to_hub) if cfg.get("push_to_hub") else None
        folder = export_checkpoint(cfg.ckpt, cfg.get("out"), cfg.get("config"))
    except (ValueError, OSError) as exc:  # a bad checkpoint or config: one line, no traceback
        raise SystemExit(f"error: {exc}") from exc
    print(f"exported diffusers pipeline to {folder}")
    if token:
        print(f"uploaded to {push_folder(folder, cfg.push_to_hub, private=bool(cfg.private), token=token)}")


if __name__ == "__main__":
    main()
