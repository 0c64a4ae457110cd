"""Export a training checkpoint to a standard diffusers folder.

`python -m mame_lightning.export ckpt=RUN/checkpoints/last.ckpt [out=DIR] [push_to_hub=OWNER/NAME]`
rebuilds the run's model from `RUN/resolved_config.yaml`, loads the checkpoint weights (EMA weights
when the run kept them) and writes the pipeline folder plus `mame_lightning.json` and the model card
README.md (default `RUN/export`); `merge_lora=true` merges a LoRA run's adapters into the weights;
`push_to_hub` uploads it (token: HF_TOKEN). The work is
`mame_lightning.models.export.export_checkpoint`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mame_lightning import CONF_DIR


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    from mame_lightning.models.export import export_checkpoint
    from mame_lightning.models.hub import check_push, push_folder

    if not cfg.get("ckpt"):
        raise SystemExit("usage: python -m mame_lightning.export ckpt=RUN/checkpoints/last.ckpt [out=DIR] [config=FILE]")
    try:
        token = check_push(cfg.push_to_hub) if cfg.get("push_to_hub") else None
        folder = export_checkpoint(cfg.ckpt, cfg.get("out"), cfg.get("config"), cfg.get("merge_lora"))
    except (ValueError, OSError) as exc:  # a bad checkpoint or config: one line, no traceback
        raise SystemExit(f"error: {exc}") from exc
    print(f"exported diffusers pipeline to {folder}")
    if token:
        print(f"uploaded to {push_folder(folder, cfg.push_to_hub, private=bool(cfg.private), token=token)}")


if __name__ == "__main__":
    main()
