"""mame_lightning: synthetic mammography with diffusion models, composed by Hydra and run by Lightning."""

from pathlib import Path

__version__ = "0.1.0"

# The shipped config folder, by absolute path: every entry point and compose() call finds it the same
# way from `python -m`, a console command or an in-process call.
CONF_DIR = str(Path(__file__).resolve().parent / "conf")
