"""Train a model: `python -m mame_lightning.train [dataset=...] [task=...] [model=...] [key=value ...]`.

Composes conf/train.yaml with the command-line overrides and hands it to
`mame_lightning.training.train`. `-m` runs a sweep (each job in its own folder) and writes a
summary table at the end. Add your own config folder with `--config-dir DIR`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from mame_lightning.models.checkpoints import CheckpointError
    from mame_lightning.models.text2image import TrainingDiverged
    from mame_lightning.training import train

    try:
        return train(cfg)
    except (TrainingDiverged, CheckpointError, FileNotFoundError) as exc:
        if _in_multirun():
            raise  # Hydra records the job as failed and the sweep goes on to its summary
        raise SystemExit(f"error: {exc}") from exc  # one line, exit status 1


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


if __name__ == "__main__":
    main()
