"""Evaluate trained models: guidance sweep (MAM-E Table 3), prompt fidelity, FID/KID, reader study.

    python -m mame_lightning.evaluate model_path=EXPORT_DIR out=DIR                    # guidance sweep
    python -m mame_lightning.evaluate model_path=EXPORT_DIR mode=fidelity out=DIR
    python -m mame_lightning.evaluate model_path=EXPORT_DIR mode=fid real_dir=PREPARED/text2image \\
        eval.fid.weights=pt_inception-2015-12-05.pth out=DIR
    python -m mame_lightning.evaluate -m model_path=EXPORT_DIR guidance.scale=4,8,14 out=DIR   # one job per scale
    python -m mame_lightning.evaluate mode=reader_make real_dir=PREPARED fake_dir=GENERATED n=53 out=DIR
    python -m mame_lightning.evaluate mode=reader_score ratings=DIR/ratings.csv key=KEY out=DIR

Settings and the meaning of each key: conf/evaluate.yaml; the work: `mame_lightning.runs.evaluation`.
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from mame_lightning import CONF_DIR


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> dict:
    from mame_lightning.runs.command_line import one_line_errors
    from mame_lightning.runs.evaluation import USER_ERRORS, run

    runtime = HydraConfig.get()
    overrides = list(runtime.overrides.task) if runtime.mode == RunMode.MULTIRUN else None
    with one_line_errors(USER_ERRORS):
        return run(cfg, out=runtime.runtime.output_dir, multirun_overrides=overrides)


if __name__ == "__main__":
    main()
