"""Export a trained module, or a training checkpoint, as a standard diffusers folder plus the
`mame_lightning.json` sidecar.

The folder loads with `StableDiffusionPipeline.from_pretrained` (or the inpainting pipeline for a
9-channel UNet) and no code of ours; the sidecar tells generation and evaluation which prompt
templates and attribute values the model was trained on, and README.md is the same told as a
Hugging Face model card. Weights are written in float32 (EMA weights when the run kept an
average), and the folder appears complete or not at all. A LoRA run exports the base pipeline plus
`pytorch_lora_weights.safetensors`, or the adapters merged (`export.merge_lora`; `models.lora`). A
checkpoint is exported by rebuilding its run's model from the run's resolved config (`models.building`)
and loading the weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mame_lightning.io import atomic_folder, write_text
from mame_lightning.models.building import RESOLVED_CONFIG
from mame_lightning.models.ema import ema_weights
from mame_lightning.models.lora import write_export as write_lora_export
from mame_lightning.models.model_card import write_model_card

METADATA_FILE = "mame_lightning.json"
ATTRIBUTE_KEYS = ("views", "densities", "areas", "vendors")


@contextmanager
def float32_weights(*modules: torch.nn.Module) -> Iterator[None]:
    """Cast modules to float32 for writing and back afterwards (fp16/bf16 -> fp32 -> back is exact)."""
    dtypes = [next(m.parameters()).dtype for m in modules]
    try:
        for module in modules:
            module.to(torch.float32)
        yield
    finally:
        for module, dtype in zip(modules, dtypes):
            module.to(dtype)


def export_metadata(*, task, templates=None, attributes=None, train_config=None, data_counts=None,
                    prepare_size: int = 0, ema: bool = False, lora: Mapping | None = None) -> dict:
    """The sidecar contents; attribute lists always carry the four keys (empty when unknown); `lora` (a LoRA
    run only): rank, alpha, target modules, whether merged and the adapter file."""
    attributes = dict(attributes or {})
    extra = {"lora": dict(lora)} if lora else {}
    return {
        "task": task,
        "templates": dict(templates or {}),
        "attributes": {key: list(attributes.get(key) or []) for key in ATTRIBUTE_KEYS},
        "train_config": dict(train_config or {}),
        "data_counts": dict(data_counts or {}),
        "prepare_size": int(prepare_size or 0),
        "ema_weights": bool(ema),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def check_export_target(folder: Path) -> None:
    """An export may replace an earlier export, never a file or a folder of something else."""
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder}: export target exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "model_index.json").is_file():
        raise FileExistsError(
            f"{folder}: exists, is not empty and is not a diffusers export; refusing to replace it"
        )


def export_pipeline(
    module,
    folder: str | os.PathLike,
    *,
    task: str | None = None,
    templates: Mapping | None = None,
    attributes: Mapping | None = None,
    train_config: Mapping | None = None,
    data_counts: Mapping | None = None,
    prepare_size: int = 0,
    metrics: Mapping | None = None,
    card: Mapping | None = None,
    merge_lora: bool = False,
) -> Path:
    """Write `module.components` as a diffusers pipeline folder (DPM-Solver++) + mame_lightning.json
    + README.md (model card with `metrics`; `card` may set its `license` and `base_model`); a LoRA module
    adds its adapter file, or with `merge_lora` its adapters fused into the weights."""
    components = module.components
    task = task or getattr(module, "task", None) or ("inpaint" if components.is_inpaint else "text2image")
    if task == "inpaint" and not components.is_inpaint:
        raise ValueError(f"task=inpaint but the UNet takes {components.unet.config.in_channels} input channels, not 9")
    ema, lora = getattr(module, "ema", None), getattr(module, "lora", None)
    folder = Path(folder)
    check_export_target(folder)
    with atomic_folder(folder) as tmp:
        if lora is not None:  # copies in float32 carry the adapters out: the live modules stay as they are
            with torch.no_grad(), float32_weights(components.vae):
                lora = write_lora_export(components, tmp, lora, merge=merge_lora)
        else:
            parts = [p for p in (components.unet, getattr(components, "vae", None),
                                 getattr(components, "text_encoder", None)) if p is not None]  # a pixel model: UNet alone
            with torch.no_grad(), ema_weights(ema, components.unet), float32_weights(*parts):
                components.save_pretrained(tmp)
        metadata = export_metadata(task=task, templates=templates, attributes=attributes, train_config=train_config,
                                   data_counts=data_counts, prepare_size=prepare_size, ema=ema is not None, lora=lora)
        text = json.dumps(metadata, indent=2, default=str)
        write_text(tmp / METADATA_FILE, text, fsync=False)  # the folder is flushed as a whole
        card = {k: v for k, v in dict(card or {}).items() if k in ("license", "base_model") and v}
        write_model_card(tmp, json.loads(text), metrics=metrics, **card)
    return folder


def read_export_metadata(folder: str | os.PathLike, missing_ok: bool = False) -> dict:
    """The sidecar of an exported folder ({} when absent and `missing_ok`: a folder from elsewhere);
    errors name the folder and what is wrong."""
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        if missing_ok:
            return {}
        raise FileNotFoundError(f"{path}: not found; is {folder} a folder written by mame_lightning's export?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from error


# -- from a run config and a checkpoint ------------------------------------------------------------
def merge_lora_of(cfg: DictConfig) -> bool:
    """`export.merge_lora`: a LoRA run's export holds the adapters merged into the weights."""
    export = cfg.get("export")
    return bool(export.get("merge_lora", False)) if isinstance(export, DictConfig) else False


def card_options(cfg: DictConfig) -> dict:
    """`export.license` / `export.base_model` for the model card (absent keys: derived from the run)."""
    export = cfg.get("export")
    if not isinstance(export, DictConfig):
        return {}
    return {key: export.get(key) for key in ("license", "base_model") if export.get(key)}


def export_with_config(module, folder: str | os.PathLike, cfg: DictConfig, *, attributes: Mapping | None = None,
               data_counts: Mapping | None = None, metrics: Mapping | None = None,
               merge_lora: bool | None = None) -> Path:
    """`export_pipeline` with what the run config says: task, prompt templates, the resolved config,
    the preparation size, the card options and `export.merge_lora` (unless `merge_lora` is given)."""
    templates = OmegaConf.to_container(cfg.dataset.get("templates") or {}, resolve=True)
    return Path(export_pipeline(
        module, folder, task=cfg.task.name, templates=templates, attributes=attributes,
        train_config=OmegaConf.to_container(cfg, resolve=True), data_counts=data_counts,
        prepare_size=int(cfg.dataset.get("size") or 0), metrics=metrics, card=card_options(cfg),
        merge_lora=merge_lora_of(cfg) if merge_lora is None else bool(merge_lora),
    ))


def find_run_config(ckpt: Path) -> Path:
    for folder in [ckpt.parent, *ckpt.parents]:
        candidate = folder / RESOLVED_CONFIG
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no {RESOLVED_CONFIG} found above {ckpt}; pass config=PATH to the run's {RESOLVED_CONFIG}"
    )


def _prepared_attributes(cfg: DictConfig) -> tuple[dict, dict]:
    """Attribute values (attributes.json) and images per value (metadata.jsonl) of the prepared
    set the run trained on, for the task's own part of it."""
    from collections import Counter

    from mame_lightning.data.loading.prepared_set import ATTRIBUTE_COLUMNS

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


def export_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike | None = None,
                      config: str | os.PathLike | None = None, merge_lora: bool | None = None) -> Path:
    """Rebuild the run's model from its resolved config (refusing builders outside the allow-list), load the
    checkpoint's weights (and EMA state) and export them; default folder: `<run>/export`. `merge_lora`
    (None: the run's `export.merge_lora`) merges a LoRA run's adapters."""
    from mame_lightning.models.building import build_components, build_module, check_targets
    from mame_lightning.models.checkpoints import check_checkpoint, load_checkpoint

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
    attributes, counts = _prepared_attributes(cfg)
    out = Path(out) if out else ckpt.parent.parent / "export"
    return export_with_config(module, out, cfg, attributes=attributes, data_counts=counts,
                              metrics=_run_metrics(config, int(state.get("global_step", -1))), merge_lora=merge_lora)
