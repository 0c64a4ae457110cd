"""Generate synthetic mammograms from a trained model.

    python -m mame_lightning.generate model_path=EXPORT_DIR prompt="a mammogram in CC view" n=4 out=DIR
    python -m mame_lightning.generate model_path=EXPORT_DIR vendor=siemens view=MLO density=high area=small
    python -m mame_lightning.generate model_path=INPAINT_DIR image=FILE box=x0,y0,x1,y1 out=DIR
    python -m mame_lightning.generate mode=full model_path=T2I_DIR inpaint_model_path=INPAINT_DIR prompt=...

Every PNG is marked synthetic (text chunks); `dicom=true` adds a synthetic DICOM per image.
Settings: conf/generate.yaml; the work: `mame_lightning.runs.generation`.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from mame_lightning import CONF_DIR


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="generate")
def main(cfg: DictConfig) -> None:
    from mame_lightning.runs.command_line import one_line_errors
    from mame_lightning.runs.generation import USER_ERRORS, run

    with one_line_errors(USER_ERRORS):
        run(cfg)


def cli() -> None:
    from mame_lightning.runs.generation import protect_overrides

    sys.argv = protect_overrides(sys.argv)
    main()


if __name__ == "__main__":
    cli()
