"""Does synthetic data help a lesion classifier? MAM-E's closing question as one command.

    python -m mame_lightning.utility prepared_dir=DIR text2image_model=EXPORT inpaint_model=EXPORT \
        [n_synthetic=N] [seeds=[0,1,2]]

The real prepared set is split by patient/study into train / validation / test (test: real images
only); `n_synthetic` lesion images come from the full pipeline (healthy text-to-image, then a lesion
painted into a box inside the breast) together with their healthy originals as controls; a MONAI
2-D classifier is trained in Lightning under three arms with equal steps (real, real + synthetic,
synthetic), repeated over seeds, and scored on the real test split: AUROC with a bootstrap CI,
sensitivity at 90 % specificity, and how often its Grad-CAM peak falls inside the lesion box.

Modules, one concept each: `checks` (bad input, before any work), `split`, `synthesis`, `images`,
`classifier` (the LightningModule), `fit` (one arm and seed), `metrics`, `saliency`, `report`, and
`study` (the run that ties them together). Settings: conf/utility.yaml.
"""
