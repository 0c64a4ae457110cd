"""Test helpers: builders of tiny models, prepared sets, DICOM files, a SLURM cluster; shared fixtures live in
tests/conftest.py."""
