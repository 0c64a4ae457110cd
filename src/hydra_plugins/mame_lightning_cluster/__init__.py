"""Hydra launcher plugins of mame_lightning (Hydra loads launchers only from the hydra_plugins namespace)."""
