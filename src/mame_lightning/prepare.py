"""Prepare a raw mammography set for training: ``python -m mame_lightning.prepare dataset=NAME``.

Datasets: vindr, omi_h, fusion, folder, synthetic (default; generated on first use). Any folder of
DICOMs works with ``dataset=folder dataset.raw_dir=IN dataset.prepared_dir=OUT``. Re-running
resumes an interrupted run and leaves a finished one as it is. Settings: conf/prepare.yaml.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mame_lightning import CONF_DIR


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="prepare")
def main(cfg: DictConfig) -> None:
    from mame_lightning.data.prepare.preparation import prepare_from_config
    from mame_lightning.data.prepare.sources import SourceError
    from mame_lightning.runs.command_line import one_line_errors

    # Hydra's logging already shows the summary on the console and keeps it in the run's log.
    with one_line_errors((SourceError,)):  # a missing raw_dir or annotation file
        prepare_from_config(cfg, echo=False)


if __name__ == "__main__":
    main()
