"""Train a model: `python -m mame_lightning.train [dataset=...] [task=...] [model=...] [key=value ...]`.

Composes conf/train.yaml with the command-line overrides and hands it to `runs.training.train`. A
real dataset (vindr, omi_h, fusion, folder) trains MAM-E's recipe for that dataset × task
(conf/recipe/); the synthetic default trains the tiny model on CPU. `name=NAME` keeps the run in
outputs/train/NAME, so `name=NAME resume=auto` continues it. `lr_scheduler=cosine` (or linear,
polynomial; constant by default) with `lr_scheduler.num_warmup_steps=N` shapes the learning rate.
`-m` runs a sweep (each job in its own folder) and writes a summary table at the end; the value
returned to the sweeper is the run's `optimized_metric` (val/loss by default), so
`hparams_search=optuna_lr` searches with Optuna. Add your own config folder with `--config-dir DIR`.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from mame_lightning import CONF_DIR


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    from mame_lightning.runs.command_line import one_line_errors
    from mame_lightning.runs.training import USER_ERRORS, objective, train

    with one_line_errors(USER_ERRORS, raise_in_multirun=True):
        return objective(train(cfg))


def cli() -> None:
    from mame_lightning.runs.command_line import quote_numeric_choices

    sys.argv = quote_numeric_choices(sys.argv)
    main()


if __name__ == "__main__":
    cli()
