"""`python -m mame_lightning.utility prepared_dir=DIR text2image_model=EXPORT inpaint_model=EXPORT [n_synthetic=N] [seeds=[0,1,2]]`

Trains a lesion classifier on real, real + synthetic and synthetic images (equal steps, several
seeds) and reports AUROC, sensitivity at 90 % specificity and Grad-CAM localisation on the real
test split: OUT/utility.{json,md}, roc_<arm>.png, gradcam_real_vs_synthetic.png. Settings and their
meaning: conf/utility.yaml (`--help` lists them).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from mame_lightning import CONF_DIR


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="utility")
def main(cfg: DictConfig) -> None:
    from mame_lightning.pipelines.loading import ModelNotFoundError
    from mame_lightning.utility.checks import UtilityError
    from mame_lightning.utility.study import run

    # Lightning sets its own INFO level on import: one line per stage, not its banner for every run.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    try:
        result = run(cfg)
    except (UtilityError, ModelNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error
    print(f"\n{Path(result['files']['markdown']).read_text()}\nwrote {result['files']['json']}")


if __name__ == "__main__":
    main()
