"""Prepare a raw mammography set for training: ``python -m mame_lightning.prepare dataset=NAME``.

Datasets: vindr, omi_h, fusion, folder, synthetic (default; generated on first use). Any folder of
DICOMs works with ``dataset=folder dataset.raw_dir=IN dataset.prepared_dir=OUT``. Re-running
resumes an interrupted run and leaves a finished one as it is.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from mame_lightning.data.preparation import prepare_from_config


# An absolute folder: found the same way from `python -m`, a console command or an in-process call.
CONF_DIR = str(Path(__file__).resolve().parent / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="prepare")
def main(cfg: DictConfig) -> None:
    from mame_lightning.data.sources import SourceError

    # Hydra's logging already shows the summary on the console and keeps it in the run's log.
    try:
        prepare_from_config(cfg, echo=False)
    except SourceError as exc:  # a missing raw_dir or annotation file: one line, no traceback
        raise SystemExit(f"error: {exc}") from exc


if __name__ == "__main__":
    main()


__all__ = ["main", "prepare_from_config"]
