"""Running on clusters: preemption at optimizer-step boundaries (the launchers live in hydra_plugins.mame_lightning_cluster)."""
