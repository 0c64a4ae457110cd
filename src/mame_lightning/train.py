"""Train a model: `python -m mame_lightning.train [dataset=...] [task=...] [model=...] [key=value ...]`.

Composes conf/train.yaml with the command-line overrides and hands it to
`mame_lightning.training.train`. A real dataset (vindr, omi_h, fusion, folder) trains MAM-E's recipe
for that dataset × task (conf/recipe/); the synthetic default trains the tiny model on CPU.
`name=NAME` keeps the run in outputs/train/NAME, so `name=NAME resume=auto` continues it. `-m`
runs a sweep (each job in its own folder) and writes a summary table at the end; the value returned
to the sweeper is the run's `optimized_metric` (val/loss by default), so `hparams_search=optuna_lr`
searches with Optuna. Add your own config folder with `--config-dir DIR`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from mame_lightning.training import HardwareError, train

    try:
        result = train(cfg)
    except HardwareError as exc:  # one line naming the override, not a traceback
        raise SystemExit(f"error: {exc}") from None
    # what a sweeper optimises (Optuna): the run's `optimized_metric`; result.json keeps the whole record
    metric = result.get("optimized_metric")
    return metric["value"] if metric else None


if __name__ == "__main__":
    main()
