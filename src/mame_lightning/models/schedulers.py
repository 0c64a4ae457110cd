"""Inference schedulers by name: one table (conf/schedulers.yaml) for training sample grids,
generation, evaluation and the app."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

TABLE = Path(__file__).resolve().parents[1] / "conf" / "schedulers.yaml"
DEFAULT_SCHEDULER = "dpmsolver++"


def read_table(path: Path = TABLE) -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (diffusers scheduler class name, extra from_config arguments)."""
    table = OmegaConf.to_container(OmegaConf.load(path))
    return {str(name): (entry["class"], dict(entry.get("kwargs") or {})) for name, entry in table.items()}


SCHEDULERS = read_table()


def make_scheduler(name: str, config: dict):
    """A scheduler of the named kind built from a pipeline's (or the training) scheduler config."""
    import diffusers

    key = str(name).lower()
    if key not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
    class_name, extra = SCHEDULERS[key]
    return getattr(diffusers, class_name).from_config(config, **extra)


__all__ = ["DEFAULT_SCHEDULER", "SCHEDULERS", "make_scheduler", "read_table"]
