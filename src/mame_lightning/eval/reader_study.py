"""Blinded reader study: can a reader tell real mammograms from synthetic ones? (MAM-E, AUROC 0.49)

`make_reader_study` draws a shuffled mix of real and synthetic images, re-encodes every one of
them the same way (same PNG encoder, grey mode, size, no text chunks or other metadata) under a
neutral name, and writes an empty ratings sheet for the reader plus a key, kept apart from the
images, that says which case is which. `score_reader_study` checks the filled sheet against the key
and reports the ROC curve and its area.

Rating scale: the MAM-E paper's (section 3.8.1), 0 = definitely real, 1 = probably real,
2 = not sure, 3 = probably synthetic, 4 = definitely synthetic. As in the paper, the ratings are the
scores of a synthetic-vs-real classifier: synthetic is the positive class, so AUROC 1.0 means the
reader always spots the synthetic images, 0.5 means the reader cannot tell them apart (the paper's
radiologist: 0.49), and values below 0.5 mean the real images were taken for synthetic more often.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torchmetrics.functional.classification import binary_auroc, binary_roc

from mame_lightning.eval.plots import plot_roc
from mame_lightning.eval.report import read_csv, write_csv
from mame_lightning.io import write_json, write_png, write_text

SCALE = {0: "definitely real", 1: "probably real", 2: "not sure", 3: "probably synthetic", 4: "definitely synthetic"}
SCORE_MIN, SCORE_MAX = min(SCALE), max(SCALE)
REAL, SYNTHETIC = "real", "synthetic"
POSITIVE = SYNTHETIC  # the class a high score points to
MAX_LISTED_PROBLEMS = 20


class ReaderStudyError(ValueError):
    """A ratings sheet or key that cannot be scored; the message names every bad row."""


def _instructions(n: int) -> str:
    lines = [f"Reader study: {n} mammograms in images/, some real and some synthetic.",
             "For each case write a score in ratings.csv, from 0 (definitely real) to 4 (definitely synthetic):", ""]
    lines += [f"  {score} = {meaning}" for score, meaning in SCALE.items()]
    lines += ["", "Whole numbers only. Rate every case; do not rename the files."]
    return "\n".join(lines) + "\n"


def _load_grey(path: str | os.PathLike, mode: str) -> Image.Image:
    """Decode an image into `mode` with 8 bits per channel; 16-bit greys are rescaled, not clipped."""
    with Image.open(path) as image:
        image.load()
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(image, dtype=np.float64)
            top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
            image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        # A fresh image from the raw pixels carries no info dict (text, ICC, dpi) into the copy.
        return Image.fromarray(np.asarray(image.convert(mode)), mode)


def _choose(paths: Sequence, count: int, rng: np.random.Generator, what: str) -> list[str]:
    paths = sorted(str(p) for p in paths)  # listing order must not change the draw
    if count > len(paths):
        raise ValueError(f"reader study needs {count} {what} images, only {len(paths)} given")
    return [paths[i] for i in sorted(rng.choice(len(paths), size=count, replace=False))]


def make_reader_study(real_paths: Sequence, fake_paths: Sequence, out_dir: str | os.PathLike,
                      n: int = 53, real_fraction: float = 0.5, seed: int = 0,
                      key_path: str | os.PathLike | None = None, size: int | None = None,
                      mode: str = "L", overwrite: bool = False) -> Path:
    """Write out_dir/images/case_001.png..., out_dir/ratings.csv, out_dir/README.txt and the key
    (default out_dir/.key/key.json; give `key_path` outside out_dir to keep it away from the reader).

    round(n * real_fraction) cases are real. Images are re-encoded in `mode` ("L" grey), and resized
    to size x size when `size` is given; without it, images of different sizes are refused because
    the size alone would give their origin away. The same inputs and seed give the same study.
    """
    if n < 1 or not 0.0 <= real_fraction <= 1.0:
        raise ValueError(f"need n >= 1 and 0 <= real_fraction <= 1, got n={n}, real_fraction={real_fraction}")
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    key_path = Path(key_path) if key_path is not None else out_dir / ".key" / "key.json"
    existing = sorted(images_dir.glob("case_*.png")) if images_dir.is_dir() else []
    if existing and not overwrite:
        raise FileExistsError(f"{images_dir} already holds {len(existing)} cases; pass overwrite=True")

    rng = np.random.default_rng(seed)
    n_real = int(n * real_fraction + 0.5)
    chosen = [(REAL, p) for p in _choose(real_paths, n_real, rng, REAL)]
    chosen += [(SYNTHETIC, p) for p in _choose(fake_paths, n - n_real, rng, SYNTHETIC)]
    chosen = [chosen[i] for i in rng.permutation(n)]

    images = [_load_grey(path, mode) for _, path in chosen]
    if size is not None:
        images = [im if im.size == (size, size) else im.resize((size, size), Image.Resampling.LANCZOS)
                  for im in images]
    sizes = {(truth, im.size) for (truth, _), im in zip(chosen, images)}
    if len({s for _, s in sizes}) > 1:
        raise ValueError(f"images differ in size {sorted(sizes)}; the size would reveal their origin, "
                         "pass size=<pixels> to resize them all")

    for stale in existing:
        stale.unlink()
    width = max(3, len(str(n)))
    cases = {}
    for index, ((truth, source), image) in enumerate(zip(chosen, images), start=1):
        case = f"case_{index:0{width}d}"
        write_png(images_dir / f"{case}.png", image)
        cases[case] = {"truth": truth, "source": os.path.abspath(source)}

    write_csv(out_dir / "ratings.csv", [{"case": case, "score": None} for case in cases], ["case", "score"])
    write_text(out_dir / "README.txt", _instructions(n))
    write_json(key_path, {"seed": seed, "n": n, "n_real": n_real, "n_synthetic": n - n_real,
                          "scale": {str(k): v for k, v in SCALE.items()}, "cases": cases})
    return key_path


def _parse_score(text: str) -> int | None:
    """An integer on the rating scale from CSV text, None when it is not one."""
    try:
        value = float(text)
    except ValueError:
        return None
    if not value.is_integer() or not SCORE_MIN <= value <= SCORE_MAX:
        return None
    return int(value)


def read_ratings(ratings_csv: str | os.PathLike, cases: dict) -> dict[str, int]:
    """case -> score from a filled ratings sheet; every problem (unknown, duplicate, missing or
    unrated case, score off the scale) is collected and raised together, each naming its line."""
    rows = read_csv(ratings_csv)
    header = set(rows[0]) if rows else set()
    if rows and not {"case", "score"} <= header:
        raise ReaderStudyError(f"{ratings_csv}: header must have columns 'case' and 'score', got {sorted(header)}")
    scores, problems = {}, []
    for line, row in enumerate(rows, start=2):
        case, text = (row.get("case") or "").strip(), (row.get("score") or "").strip()
        if case not in cases:
            problems.append(f"line {line}: case {case!r} is not in the key")
        elif case in scores:
            problems.append(f"line {line}: case {case} is rated twice")
        elif not text:
            problems.append(f"line {line}: case {case} has no score")
        elif (score := _parse_score(text)) is None:
            problems.append(f"line {line}: score {text!r} for case {case} is not a whole number "
                            f"from {SCORE_MIN} to {SCORE_MAX}")
        else:
            scores[case] = score
    rated_or_listed = {(row.get("case") or "").strip() for row in rows}
    missing = [case for case in cases if case not in rated_or_listed]
    if missing:
        problems.append(f"{len(missing)} case(s) missing from the sheet: {', '.join(missing[:10])}"
                        + (" ..." if len(missing) > 10 else ""))
    if problems:
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = len(problems) - len(shown)
        raise ReaderStudyError(f"{ratings_csv}: {len(problems)} problem(s):\n  " + "\n  ".join(shown)
                               + (f"\n  ... and {more} more" if more else ""))
    return scores


def _load_key(key_path: str | os.PathLike) -> dict:
    try:
        key = json.loads(Path(key_path).read_text(encoding="utf-8"))
        cases = key["cases"]
        bad = [c for c, v in cases.items() if v.get("truth") not in (REAL, SYNTHETIC)]
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as error:
        raise ReaderStudyError(f"{key_path}: not a reader-study key ({error})") from error
    if bad:
        raise ReaderStudyError(f"{key_path}: cases with no real/synthetic truth: {', '.join(bad[:10])}")
    return key


def score_reader_study(ratings_csv: str | os.PathLike, key_path: str | os.PathLike,
                       out_dir: str | os.PathLike) -> dict:
    """AUROC of the reader's scores (synthetic = positive, as in the paper), the ROC curve, score
    histograms; writes out_dir/roc.png and out_dir/reader_study.json and returns the same summary."""
    key = _load_key(key_path)
    scores = read_ratings(ratings_csv, key["cases"])
    cases = list(key["cases"])
    truth = torch.tensor([key["cases"][c]["truth"] == POSITIVE for c in cases], dtype=torch.long)
    rating = torch.tensor([scores[c] for c in cases], dtype=torch.float64)
    if truth.min() == truth.max():
        raise ReaderStudyError(f"{key_path}: AUROC needs both real and synthetic cases")
    preds = rating / SCORE_MAX  # already in [0, 1], so torchmetrics applies no sigmoid
    auroc = float(binary_auroc(preds, truth))
    fpr, tpr, thresholds = binary_roc(preds, truth)

    synthetic, real = truth == 1, truth == 0
    histogram = {label: {str(s): int(((rating == s) & (synthetic if label == SYNTHETIC else real)).sum())
                         for s in SCALE} for label in (REAL, SYNTHETIC)}
    midpoint = (SCORE_MIN + SCORE_MAX) / 2
    summary = {
        "auroc": auroc, "n": len(cases), "n_real": int(real.sum()), "n_synthetic": int(synthetic.sum()),
        "mean_score_real": float(rating[real].mean()), "mean_score_synthetic": float(rating[synthetic].mean()),
        "real_called_real": int(((rating < midpoint) & real).sum()),
        "synthetic_called_synthetic": int(((rating > midpoint) & synthetic).sum()),
        "cannot_tell": int((rating == midpoint).sum()),
        "histogram": histogram,
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist(),
                "thresholds": (thresholds * SCORE_MAX).clamp(max=SCORE_MAX).tolist()},
        "scale": {str(k): v for k, v in SCALE.items()},
        "positive_class": POSITIVE,
    }
    out_dir = Path(out_dir)
    summary["roc_plot"] = str(plot_roc(summary["roc"]["fpr"], summary["roc"]["tpr"], auroc, out_dir / "roc.png"))
    summary["summary_path"] = str(out_dir / "reader_study.json")
    write_json(out_dir / "reader_study.json", summary)
    return summary
