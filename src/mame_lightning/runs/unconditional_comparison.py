"""Pixel-space DDPM against latent diffusion from scratch, at the same data and budget (MAM-E 4.1: the
pixel model denoises to breast-like images in far fewer steps than a latent model trained from scratch).

Reads what the two training runs already wrote, nothing else: the `train/loss` scalars of their
TensorBoard events and the sample grids the `SampleGrid` callback saved (`tensorboard/samples/
step_*.png`, the same seeds at every step), and draws one figure: the loss curves on top, then a row
per run with its samples at the steps both runs sampled. `make unconditional-compare` trains both and
calls `python -m mame_lightning.runs.unconditional_comparison pixel=RUN latent=RUN out=FILE`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from mame_lightning.eval.plots import plt, save_figure
from mame_lightning.io import write_json

STEP_FILE = re.compile(r"step_(\d+)\.png$")


def loss_curve(run_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(steps, train/loss) from the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    if "train/loss" not in events.Tags()["scalars"]:
        raise FileNotFoundError(f"{run_dir}/tensorboard: no train/loss scalars; is it a training run folder?")
    scalars = events.Scalars("train/loss")
    return np.array([s.step for s in scalars]), np.array([s.value for s in scalars])


def sample_grids(run_dir: str | Path) -> dict[int, Path]:
    """step -> sample grid PNG of the run."""
    folder = Path(run_dir) / "tensorboard" / "samples"
    return {int(m.group(1)): p for p in sorted(folder.glob("step_*.png")) if (m := STEP_FILE.search(p.name))}


def shared_steps(grids: Sequence[Mapping[int, Path]], columns: int) -> list[int]:
    """Up to `columns` steps every run sampled, spread from the first to the last."""
    common = sorted(set.intersection(*(set(g) for g in grids)))
    if not common:
        raise FileNotFoundError("the runs share no sample-grid step (tensorboard/samples/step_*.png)")
    if len(common) <= columns:
        return common
    picks = np.unique(np.round(np.linspace(0, len(common) - 1, columns)).astype(int))
    return [common[i] for i in picks]


def smoothed(values: np.ndarray, window: int) -> np.ndarray:
    window = max(1, min(int(window), len(values)))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def compare_runs(runs: Mapping[str, str | Path], out: str | Path, columns: int = 4, window: int = 20) -> dict:
    """Write the figure at `out` (and `out` with .json: final losses, steps shown); returns that summary."""
    if len(runs) < 2:
        raise ValueError(f"compare at least two runs, got {list(runs)}")
    curves = {label: loss_curve(path) for label, path in runs.items()}
    grids = {label: sample_grids(path) for label, path in runs.items()}
    steps = shared_steps(list(grids.values()), columns)
    # the same budget for every curve: up to the last step all runs sampled
    curves = {label: (x[x <= steps[-1]], y[x <= steps[-1]]) if (x <= steps[-1]).any() else (x, y)
              for label, (x, y) in curves.items()}
    with Image.open(grids[next(iter(runs))][steps[0]]) as first:
        aspect = first.height / first.width  # a grid is one row of seeds: wide and short
    width = 3.2 * len(steps)
    rows = [width / len(steps) * aspect * 1.35] * len(runs)
    fig = plt.figure(figsize=(width, 3.0 + sum(rows)))
    spec = fig.add_gridspec(1 + len(runs), len(steps), height_ratios=[3.0] + rows, hspace=0.6)
    axis = fig.add_subplot(spec[0, :])
    for label, (x, y) in curves.items():
        points = max(1, min(int(window), len(y) // 8))  # a running mean over logged points, from the start
        smooth = smoothed(y, points)
        axis.plot(x[len(x) - len(smooth):], smooth, label=f"{label} (running mean of {points} logged values)")
    axis.set_yscale("log")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("train/loss (noise MSE)")
    axis.legend(loc="upper right")
    axis.set_title("same data, same steps and batch: pixel-space DDPM vs latent diffusion from scratch")
    for row, label in enumerate(runs, start=1):
        for column, step in enumerate(steps):
            panel = fig.add_subplot(spec[row, column])
            with Image.open(grids[label][step]) as image:
                panel.imshow(np.asarray(image.convert("L")), cmap="gray", vmin=0, vmax=255)
            panel.set_xticks([])
            panel.set_yticks([])
            panel.set_title(f"step {step}", fontsize=9)
            if column == 0:
                panel.set_ylabel(label)
    path = save_figure(fig, out)
    summary = {"figure": str(path), "steps_shown": steps,
               "runs": {label: {"run_dir": str(runs[label]), "last_step": int(curves[label][0][-1]),
                                "loss_points": len(curves[label][1]),
                                "final_loss": float(np.mean(curves[label][1][-window:]))} for label in runs}}
    write_json(Path(out).with_suffix(".json"), summary)
    return summary


def main(argv: Sequence[str] | None = None) -> dict:
    """`label=RUN_DIR ... out=FILE [columns=N]`."""
    pairs = dict(arg.split("=", 1) for arg in (sys.argv[1:] if argv is None else argv) if "=" in arg)
    out = pairs.pop("out", "unconditional_comparison.png")
    columns = int(pairs.pop("columns", 4))
    summary = compare_runs(pairs, out, columns=columns)
    for label, entry in summary["runs"].items():
        print(f"{label}: {entry['loss_points']} logged steps, final train/loss {entry['final_loss']:.4f}")
    print(f"figure: {summary['figure']}")
    return summary


if __name__ == "__main__":
    main()
