"""Write the synthetic raw set: ``python -m mame_lightning.synth out=DIR n=N [preset=demo]``.

The set stands in for restricted mammography data: phantoms in the VinDr-Mammo and OMI-DB
layouts, read back through the same source adapters real data goes through. Settings:
conf/synth.yaml; the work: `mame_lightning.runs.synthetic_set`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mame_lightning import CONF_DIR


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="synth")
def main(cfg: DictConfig) -> None:
    from mame_lightning.runs.synthetic_set import run

    run(cfg)


if __name__ == "__main__":
    main()
