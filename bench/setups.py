"""Models and data the benchmarks run on, made through the project's own configs and code.

Models come from conf/model (tiny or the full-size SD v1.5 architecture, built once and cached);
training images are phantoms from the synthetic raw set, prepared by the project's preparation
step. Everything is reused on the next run, so only the first run pays for building it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

import mame_lightning

CONF_DIR = Path(mame_lightning.__file__).resolve().parent / "conf"
SD15_BYTES = 4.3e9  # float32 weights of UNet + VAE + text encoder, as built by sd15_arch_components
PRECISIONS = {"32": ("32-true", None), "bf16-mixed": ("bf16-mixed", "bfloat16"), "16-mixed": ("16-mixed", "float16")}


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides)


def config_group(group: str, name: str) -> DictConfig:
    """One option file of a config group, e.g. conf/optimizer/adamw.yaml."""
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {group} config")
    return OmegaConf.load(path)


def model_config(name: str) -> DictConfig:
    return config_group("model", name)


def frozen_dtype_of(precision: str) -> str | None:
    """The frozen parts' dtype that conf/precision pairs with this Lightning precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision][1]


def lightning_precision(precision: str) -> str:
    frozen_dtype_of(precision)
    return PRECISIONS[precision][0]


def tiny_model(cache_dir: Path, *, size: int = 64, inpaint: bool = False, precision: str = "32",
               train_text_encoder: bool = True):
    """conf/model/tiny.yaml at `size` pixels, loaded fresh (training changes the weights)."""
    from mame_lightning.models.components import tiny_components

    cfg = model_config("tiny")
    return tiny_components(
        Path(cache_dir) / "models", words=list(cfg.words), unet=OmegaConf.to_container(cfg.unet),
        vae=OmegaConf.to_container(cfg.vae), text_encoder=OmegaConf.to_container(cfg.text_encoder),
        sample_size=size, seed=int(cfg.seed), inpaint=inpaint, frozen_dtype=frozen_dtype_of(precision),
        train_text_encoder=train_text_encoder,
    )


def sd15_model(cache_dir: Path, *, precision: str = "32", train_text_encoder: bool = False):
    """conf/model/sd15_arch.yaml: SD v1.5's architecture at full size with random weights."""
    from mame_lightning.models.components import sd15_arch_components

    cfg = model_config("sd15_arch")
    return sd15_arch_components(
        Path(cache_dir) / "models", inpaint=bool(cfg.inpaint), words=list(cfg.words), seed=int(cfg.seed),
        frozen_dtype=frozen_dtype_of(precision), train_text_encoder=train_text_encoder,
    )


def sd15_is_built(cache_dir: Path) -> bool:
    """Whether a full-size build is already in the model cache (then no build time or disk is needed)."""
    for config in (Path(cache_dir) / "models").glob("*/unet/config.json"):
        try:
            channels = json.loads(config.read_text())["block_out_channels"]
        except (OSError, ValueError, KeyError):
            continue
        if channels == [320, 640, 1280, 1280] and (config.parent.parent / "model_index.json").is_file():
            return True
    return False


def prepare_overrides(raw_dir: Path, prepared_dir: Path, *, size: int, n: int, height: int, width: int,
                      workers: int = 0, keep_all: bool = False, chunk_size: int = 4) -> list[str]:
    """The prepare.yaml overrides for a synthetic set; `keep_all` turns off the content filters
    (implants, special protocols) so every image goes through the whole preparation."""
    overrides = [
        "dataset=synthetic",
        f"dataset.raw_dir={raw_dir}",
        f"dataset.prepared_dir={prepared_dir}",
        f"dataset.size={size}",
        f"dataset.source.n={n}",
        f"dataset.source.height={height}",
        f"dataset.source.width={width}",
        "dataset.source.progress=false",
        f"preparation.num_workers={workers}",
        f"preparation.chunk_size={chunk_size}",
        "preparation.progress=false",
    ]
    if keep_all:
        overrides += ["dataset.filters.exclude_implants=false", "dataset.filters.exclude_special_protocols=false"]
    return overrides


def prepared_set(work_dir: Path, *, size: int, n: int = 48, height: int = 512, width: int = 416) -> Path:
    """A prepared set of `n` synthetic phantoms at `size` px (made on first use, then reused).

    Content filters are off: a benchmark needs images, whatever the phantoms show."""
    from mame_lightning.data.prepare.preparation import prepare_from_config

    raw = Path(work_dir) / f"raw_{n}_{height}x{width}"
    prepared = Path(work_dir) / f"prepared_all_{n}_{height}x{width}_{size}"
    cfg = compose("prepare", prepare_overrides(raw, prepared, size=size, n=n, height=height, width=width,
                                               keep_all=True))
    if not (prepared / "text2image" / "metadata.jsonl").is_file():
        prepare_from_config(cfg, echo=False)
    return prepared


def text2image_count(prepared: Path) -> int:
    path = Path(prepared) / "text2image" / "metadata.jsonl"
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
