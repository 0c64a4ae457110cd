"""mame_lightning: synthetic mammography with diffusion models, composed by Hydra and run by Lightning."""

__version__ = "0.1.0"
