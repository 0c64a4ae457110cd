# mame_lightning — every target sets itself up (a local .venv) on a fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.13.0

.PHONY: setup lock test test-fast demo app chromium dicom3tools slurm bench bench-prepare utility unconditional-compare clean

# constraints.txt: the exact versions the suite passed with, so a later install does not drift.
LOCK    := constraints.txt

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c $(LOCK) "$(TORCH)"
	$(BIN)/pip install --quiet -c $(LOCK) -e ".[dev]"
	touch $(STAMP)

# Re-resolve every dependency from pyproject.toml in a scratch venv and write the versions to constraints.txt
# (then run `make test` and commit both files together).
lock:
	rm -rf .lock-venv && $(PY) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip
	.lock-venv/bin/pip install --quiet "$(TORCH)"
	.lock-venv/bin/pip install --quiet -e ".[dev]"
	( echo "# make lock: the versions the test suite passed with (pip install -c constraints.txt ...)"; \
	  .lock-venv/bin/pip freeze --exclude-editable | sed -e 's/^torch==\([0-9.]*\)+.*/torch==\1/' | grep -v '^-e ' ) > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .lock-venv

setup: $(STAMP)

# Browser tests drive Debian's chromium; without it they skip (CI runs as root and installs it).
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) || echo "chromium unavailable: browser tests will skip"

# The DICOM standard's IOD validator (dciodvfy) judges the DICOM we write; without it those tests skip.
dicom3tools:
	@command -v dciodvfy >/dev/null || (apt-get update -qq && apt-get install -y -qq dicom3tools) || echo "dicom3tools unavailable: DICOM validator tests will skip"


# The cluster tests start a one-node SLURM (munged, slurmctld, slurmd) as root; without it they skip.
slurm:
	@(command -v slurmctld >/dev/null && command -v munged >/dev/null) || [ "$$(id -u)" != 0 ] || (apt-get update -qq && apt-get install -y -qq slurm-wlm munge) || echo "slurm-wlm/munge unavailable: SLURM tests will skip"

test: $(STAMP) chromium dicom3tools slurm
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP)
	$(BIN)/python -m mame_lightning.demo

# Does synthetic data help a lesion classifier? On the phantoms, with the models `make demo` trains
# (run first when they are missing); other data: make utility ARGS="prepared_dir=DIR text2image_model=DIR ..."
utility: $(STAMP)
	@test -n "$(ARGS)" || test -f outputs/demo/inpaint/export/model_index.json || $(MAKE) demo
	$(BIN)/python -m mame_lightning.utility $(ARGS)

# Pixel-space DDPM vs latent diffusion from scratch, same budget (UNCOND_STEPS) on the phantoms: loss curves and
# sample grids in one figure, outputs/unconditional/pixel_vs_latent.png (the latent run uses the demo's autoencoder)
UNCOND_STEPS ?= 600
UNCOND_OUT   ?= outputs/unconditional
unconditional-compare: $(STAMP)
	rm -rf $(UNCOND_OUT)/pixel $(UNCOND_OUT)/latent  # fresh runs: TensorBoard would mix an earlier run's events in
	@test -f outputs/demo/autoencoder/export/vae/config.json || $(BIN)/python -m mame_lightning.train experiment=demo_autoencoder hydra.run.dir=outputs/demo/autoencoder
	$(BIN)/python -m mame_lightning.train experiment=unconditional model=ddpm_pixel trainer.max_steps=$(UNCOND_STEPS) hydra.run.dir=$(UNCOND_OUT)/pixel
	$(BIN)/python -m mame_lightning.train experiment=unconditional model=ldm_unconditional model.vae_path=outputs/demo/autoencoder/export/vae trainer.max_steps=$(UNCOND_STEPS) hydra.run.dir=$(UNCOND_OUT)/latent
	$(BIN)/python -m mame_lightning.runs.unconditional_comparison pixel=$(UNCOND_OUT)/pixel latent=$(UNCOND_OUT)/latent out=$(UNCOND_OUT)/pixel_vs_latent.png

# The combined GUI: make app ARGS="model.text2image=EXPORT_DIR model.inpaint=EXPORT_DIR"
app: $(STAMP)
	$(BIN)/python -m mame_lightning.app $(ARGS)

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

bench-prepare: $(STAMP)
	$(BIN)/python bench/bench_prepare.py

clean:
	rm -rf $(VENV) outputs/* data/
