"""Train a model: `python -m mame_lightning.train [dataset=...] [task=...] [model=...] [key=value ...]`.

Composes conf/train.yaml with the command-line overrides and hands it to
`mame_lightning.training.train`. `-m` runs a sweep (each job in its own folder) and writes a
summary table at the end. Add your own config folder with `--config-dir DIR`.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig


# An absolute folder: found the same way from `python -m`, a console command or an in-process call.
CONF_DIR = str(Path(__file__).resolve().parent / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    from mame_lightning.training import train

    result = train(cfg)
    return result


if __name__ == "__main__":
    main()
