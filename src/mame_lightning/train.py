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

import re
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

# An absolute folder: found the same way from `python -m`, a console command or an in-process call.
CONF_DIR = str(Path(__file__).resolve().parent / "conf")
_PLAIN_CHOICES = re.compile(r"^[\w.-]+(,[\w.-]+)*$")


def quote_numeric_choices(argv: list[str]) -> list[str]:
    """`precision=32` -> `precision='32'`: Hydra reads a bare number as an int, and a group option is a name.

    Only for groups of conf/ that have an option file of that name; sweeps (`precision=32,bf16-mixed`) too.
    """
    fixed = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        group = Path(CONF_DIR) / key
        if sep and group.is_dir() and _PLAIN_CHOICES.match(value):
            choices = value.split(",")
            if any((group / f"{c}.yaml").is_file() and re.fullmatch(r"[\d.]+", c) for c in choices):
                arg = key + "=" + ",".join(f"'{c}'" if re.fullmatch(r"[\d.]+", c) else c for c in choices)
        fixed.append(arg)
    return fixed


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    from mame_lightning.models.checkpoints import CheckpointError
    from mame_lightning.models.text2image import TrainingDiverged
    from mame_lightning.training import HardwareError, train

    try:
        result = train(cfg)
    except (TrainingDiverged, CheckpointError, FileNotFoundError, HardwareError) as exc:
        if _in_multirun():
            raise  # Hydra records the job as failed and the sweep goes on to its summary
        raise SystemExit(f"error: {exc}") from None  # one line naming the problem, exit status 1
    # what a sweeper optimises (Optuna): the run's `optimized_metric`; result.json keeps the whole record
    metric = result.get("optimized_metric")
    return metric["value"] if metric else None


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def cli() -> None:
    sys.argv = quote_numeric_choices(sys.argv)
    main()


if __name__ == "__main__":
    cli()
