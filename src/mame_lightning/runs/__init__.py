"""The run layer: what one command does, from a composed config to the files it leaves.

`training` (fit, export, result.json), `evaluation` (one small module per mode, with the inputs
resolver), `generation` (what `python -m mame_lightning.generate` writes), `synthetic_set` (the raw
phantom set command), `multirun` (the summary of a Hydra multirun), `demo` (the `make demo` flow) and
`overrides` (command-line values Hydra would misread). Entry points call these; nothing below
imports them.
"""
