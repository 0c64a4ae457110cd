"""Raw data to a prepared set: sources (VinDr-Mammo, OMI-DB, folders, the phantoms), the per-image
steps (decode, filter, crop, tissue, prompt), PHI-safe paths and the preparation report."""
