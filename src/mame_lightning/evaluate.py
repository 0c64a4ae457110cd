"""Evaluate trained models: guidance sweep (MAM-E Table 3), prompt fidelity, FID/KID, reader study.

    python -m mame_lightning.evaluate model_path=EXPORT_DIR out=DIR                    # guidance sweep
    python -m mame_lightning.evaluate model_path=EXPORT_DIR mode=fidelity out=DIR
    python -m mame_lightning.evaluate model_path=EXPORT_DIR mode=fid real_dir=PREPARED/text2image \\
        eval.fid.weights=pt_inception-2015-12-05.pth out=DIR
    python -m mame_lightning.evaluate -m model_path=EXPORT_DIR guidance.scale=4,8,14 out=DIR   # one job per scale
    python -m mame_lightning.evaluate mode=reader_make real_dir=PREPARED fake_dir=GENERATED n=53 out=DIR
    python -m mame_lightning.evaluate mode=reader_score ratings=DIR/ratings.csv key=KEY out=DIR

Settings and the meaning of each key: conf/evaluate.yaml. The work is done in `mame_lightning.evaluation`.
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from mame_lightning import CONF_DIR


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the command line or input files: one line, no traceback."""
    from mame_lightning.eval.reader_study import ReaderStudyError
    from mame_lightning.evaluation_inputs import EvaluationError
    from mame_lightning.pipelines.loading import ModelNotFoundError
    from mame_lightning.pipelines.prompting import UnknownAttributeError

    return (EvaluationError, ModelNotFoundError, UnknownAttributeError, ReaderStudyError, FileExistsError,
            FileNotFoundError, ValueError)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> dict:
    from mame_lightning.evaluation import run

    runtime = HydraConfig.get()
    overrides = list(runtime.overrides.task) if runtime.mode == RunMode.MULTIRUN else None
    try:
        return run(cfg, out=runtime.runtime.output_dir, multirun_overrides=overrides)
    except user_errors() as exc:
        raise SystemExit(f"error: {exc}") from exc


if __name__ == "__main__":
    main()
