"""Evaluation figures (confusion matrix, ROC curve, guidance sweep) as PNG files.

matplotlib runs on the Agg backend so figures render on headless machines, and each PNG is
rendered to memory and then written atomically.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend first)
import numpy as np  # noqa: E402

from mame_lightning.io import write_bytes  # noqa: E402


def save_figure(fig: "plt.Figure", path: str | os.PathLike, dpi: int = 120) -> Path:
    """Render `fig` to PNG bytes, write them atomically and close the figure."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return write_bytes(path, buffer.getvalue())


def plot_confusion_matrix(matrix: np.ndarray, labels: Sequence[str], path: str | os.PathLike,
                          title: str = "", expected_name: str = "expected (prompt)",
                          measured_name: str = "measured (image)") -> Path:
    """Counts with row-normalised shading: each row shows where images asked for one class went."""
    matrix = np.asarray(matrix)
    totals = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, totals, out=np.zeros(matrix.shape, float), where=totals > 0)
    size = 1.2 + 0.8 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(labels)), labels=list(labels), rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels=list(labels))
    ax.set_xlabel(measured_name)
    ax.set_ylabel(expected_name)
    for row in range(matrix.shape[0]):
        for col in range(matrix.shape[1]):
            ax.text(col, row, str(int(matrix[row, col])), ha="center", va="center",
                    color="white" if shares[row, col] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of row")
    ax.set_title(title)
    return save_figure(fig, path)


def plot_roc(fpr: Sequence[float], tpr: Sequence[float], auroc: float, path: str | os.PathLike,
             title: str = "Reader study") -> Path:
    """ROC curve with the chance diagonal (readers who cannot tell real from synthetic)."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance (AUROC 0.5)")
    ax.plot(fpr, tpr, marker="o", label=f"reader (AUROC {auroc:.2f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("false positive rate (real called synthetic)")
    ax.set_ylabel("true positive rate (synthetic called synthetic)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    return save_figure(fig, path)


def plot_guidance_sweep(rows: Sequence[dict], path: str | os.PathLike,
                        title: str = "Diversity vs guidance") -> Path:
    """Mean pairwise MS-SSIM (± std) against guidance scale, one line per (model, prompt)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    keys = list(dict.fromkeys((str(r["model"]), str(r.get("prompt", ""))) for r in rows))
    for model, prompt in keys:
        mine = sorted((r for r in rows if (str(r["model"]), str(r.get("prompt", ""))) == (model, prompt)),
                      key=lambda r: float(r["guidance"]))
        scales = [float(r["guidance"]) for r in mine]
        means = [float(r["ms_ssim_mean"]) for r in mine]
        stds = [float(r.get("ms_ssim_std") or 0.0) for r in mine]
        label = f"{model}: {prompt}" if prompt else model
        ax.errorbar(scales, means, yerr=stds, marker="o", capsize=3, label=label[:60])
    ax.set_xlabel("guidance scale")
    ax.set_ylabel("pairwise MS-SSIM (lower = more diverse)")
    ax.set_title(title)
    if keys:
        ax.legend(fontsize="small")
    return save_figure(fig, path)
