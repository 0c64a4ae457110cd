"""Evaluation of generated mammograms: pure, model-agnostic functions on images.

- msssim: pairwise MS-SSIM diversity and the guidance-sweep table (MAM-E Table 3)
- fidelity: prompt attributes measured back on images (area class, view) and their agreement
- fid: FID/KID from local Inception weights only (skips with a message when they are absent)
- reader_study: blinded real-vs-synthetic reader study and its ROC/AUROC
- plots, report: figures and atomic table/CSV/JSON writers shared by the above

Submodules are imported on demand so that one metric does not pull in every dependency.
"""
