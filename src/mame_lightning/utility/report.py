"""utility.json, utility.md, one ROC figure per arm, and the Grad-CAM overlay figure.

Per arm the table gives the mean over seeds (± the spread between seeds) of the test AUROC, its
stratified bootstrap 95 % CI, the sensitivity at 90 % specificity, and the lesion localisation of
the saliency maxima against the chance level of a peak placed at random in the breast.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mame_lightning.eval.plots import plt, save_figure
from mame_lightning.eval.report import format_mean_std, markdown_table
from mame_lightning.io import write_json, write_text


def mean_std(values) -> tuple[float | None, float | None]:
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values))


def summarise_arm(runs: list[dict]) -> dict:
    """Mean and spread over seeds of every per-seed number."""
    summary = {}
    for key in ("auroc", "sensitivity_at_specificity", "localisation", "val_auroc"):
        mean, std = mean_std(r.get(key) for r in runs)
        summary[key] = {"mean": mean, "std": std}
    return summary


def plot_arm_roc(arm: str, runs: list[dict], path, ci=None) -> Path:
    """One curve per seed on the real test split, with the chance diagonal."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance (AUROC 0.5)")
    for run in runs:
        ax.plot(run["roc"]["fpr"], run["roc"]["tpr"], label=f"seed {run['seed']} (AUROC {run['auroc']:.2f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("false positive rate (healthy called lesion)")
    ax.set_ylabel("true positive rate (lesion called lesion)")
    title = f"{arm}: real test split"
    if ci:
        title += f"\n95 % CI of the mean AUROC {ci[0]:.2f}–{ci[1]:.2f}"
    ax.set_title(title, fontsize="medium")
    ax.legend(loc="lower right", fontsize="small")
    return save_figure(fig, path)


def _cell(ax, item: dict) -> None:
    ax.imshow(item["image"], cmap="gray", vmin=0, vmax=1)
    ax.imshow(item["saliency"], cmap="jet", alpha=0.4, vmin=0, vmax=max(float(np.max(item["saliency"])), 1e-6))
    for x0, y0, x1, y1 in item["boxes"]:
        ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=1))
    row, col = item["peak"]
    ax.plot(col, row, marker="+", color="white", markersize=8)
    ax.set_title(f"p={item['probability']:.2f} {'in box' if item['hit'] else 'outside'}", fontsize="x-small")
    ax.set_axis_off()


def plot_overlays(rows: dict[str, dict[str, list[dict]]], path, method: str = "gradcam") -> Path | None:
    """Rows = arms, columns = real test lesions then synthetic lesions (box green, peak +)."""
    rows = {arm: cols for arm, cols in rows.items() if cols["real"] or cols["synthetic"]}
    if not rows:
        return None
    width = max(len(c["real"]) + len(c["synthetic"]) for c in rows.values())
    fig, axes = plt.subplots(len(rows), width, figsize=(1.6 * width, 1.9 * len(rows)), squeeze=False)
    for r, (arm, cols) in enumerate(rows.items()):
        items = [("real", i) for i in cols["real"]] + [("synthetic", i) for i in cols["synthetic"]]
        for c in range(width):
            ax = axes[r][c]
            if c >= len(items):
                ax.set_axis_off()
                continue
            origin, item = items[c]
            _cell(ax, item)
            ax.set_title(f"{origin}\n" + ax.get_title(), fontsize="x-small")
        axes[r][0].text(-0.15, 0.5, arm, transform=axes[r][0].transAxes, rotation=90, ha="right", va="center")
    fig.suptitle(f"{method} of the lesion logit: real test lesions | synthetic lesions", fontsize="small")
    return save_figure(fig, path)


def _fmt(entry: dict, digits: int = 3) -> str:
    return format_mean_std(entry.get("mean"), entry.get("std"), digits)


def markdown(result: dict) -> str:
    """The human-readable report: arms table, the real-trained model on synthetic pairs, stages."""
    arms = result["arms"]
    header = ["arm", "train images (real + synthetic)", "steps", "test AUROC", "95 % CI",
              f"sensitivity @ {result['settings']['specificity']:.0%} specificity",
              f"lesion localisation ({result['settings']['saliency']})"]
    rows = []
    for name, arm in arms.items():
        s = arm["summary"]
        ci = arm["auroc_ci"]
        rows.append([name, f"{arm['train_real']} + {arm['train_synthetic']}", arm["steps"], _fmt(s["auroc"]),
                     f"{ci[0]:.3f}–{ci[1]:.3f}", _fmt(s["sensitivity_at_specificity"]), _fmt(s["localisation"], 2)])
    split = result["split"]
    lines = ["# Does synthetic data help a lesion classifier?", "",
             f"Real test split: {split['test']['lesion']} lesion and {split['test']['healthy']} healthy images "
             f"from {split['test']['studies']} studies (train {split['train']['images']}, "
             f"val {split['val']['images']}); seeds {result['settings']['seeds']}; "
             f"{result['synthesis']['n']} synthetic lesion images and as many healthy originals.", "",
             markdown_table(header, rows).rstrip(), "",
             "Cells are mean ± standard deviation over seeds; the CI is a stratified bootstrap "
             f"({result['settings']['bootstrap']} resamples of the test images) of the seed-mean AUROC. "
             f"Localisation: share of test lesions whose saliency maximum lies in the box "
             f"(chance, a random point in the breast: {_chance(result)}).", ""]
    synthetic = arms.get("real", {}).get("on_synthetic")
    if synthetic:
        lines += ["The real-only classifier on the synthetic pairs (lesion vs its healthy original): "
                  f"AUROC {_fmt(synthetic['auroc'])}, lesion localisation {_fmt(synthetic['localisation'], 2)}.", ""]
    lines += ["| stage | seconds | load (1 min) at start / end |", "|---|---|---|"]
    lines += [f"| {s['stage']} | {s['seconds']:.0f} | {s['load_start']:.2f} / {s['load_end']:.2f} |"
              for s in result["stages"]]
    lines += ["", f"Total: {sum(s['seconds'] for s in result['stages']) / 60:.1f} min on {result['device']}", ""]
    return "\n".join(lines)


def _chance(result: dict) -> str:
    value = result.get("localisation_chance")
    return "–" if value is None else f"{value:.2f}"


def write_report(result: dict, out) -> dict:
    out = Path(out)
    paths = {"json": str(out / "utility.json"), "markdown": str(out / "utility.md")}
    result = {**result, "files": {**result.get("files", {}), **paths}}
    write_text(out / "utility.md", markdown(result))
    write_json(out / "utility.json", result)
    return result
