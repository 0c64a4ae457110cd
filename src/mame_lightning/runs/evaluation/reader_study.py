"""`mode=reader_make` / `mode=reader_score`: can a reader tell real mammograms from synthetic ones?

reader_make shuffles real and generated images into anonymous cases with a ratings sheet and a key
kept apart; reader_score turns the filled sheet into an AUROC (0.5: cannot tell) and a ROC plot.
The study itself is `eval/reader_study.py`; this module checks the inputs and reports.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from mame_lightning.runs.evaluation.inputs import EvaluationError, image_entries


def run_reader_make(cfg: DictConfig, out: str | Path) -> dict:
    """The cases (images/), the blank ratings sheet and the key (.key/key.json unless key= is given)."""
    from mame_lightning.eval.reader_study import make_reader_study

    if not cfg.real_dir or not cfg.fake_dir:
        raise EvaluationError("mode=reader_make needs real_dir=DIR and fake_dir=DIR")
    real = [e.path for e in image_entries(cfg.real_dir, "real_dir")]
    fake = [e.path for e in image_entries(cfg.fake_dir, "fake_dir")]
    key = make_reader_study(real, fake, out, n=int(cfg.n), real_fraction=float(cfg.real_fraction),
                            seed=int(cfg.seed), key_path=cfg.key, size=cfg.size, overwrite=bool(cfg.overwrite))
    print(f"reader study: {cfg.n} cases in {Path(out) / 'images'}, ratings sheet {Path(out) / 'ratings.csv'}\n"
          f"key: {key} (keep it away from the reader; score with mode=reader_score ratings=... key={key})")
    return {"images": str(Path(out) / "images"), "ratings": str(Path(out) / "ratings.csv"), "key": str(key),
            "n": int(cfg.n)}


def run_reader_score(cfg: DictConfig, out: str | Path) -> dict:
    """AUROC of the filled ratings sheet against the key, and the ROC plot."""
    from mame_lightning.eval.reader_study import score_reader_study

    if not cfg.ratings:
        raise EvaluationError("mode=reader_score needs ratings=FILE (the filled ratings.csv)")
    ratings = Path(cfg.ratings)
    key = Path(cfg.key) if cfg.key else ratings.parent / ".key" / "key.json"
    for path, what in ((ratings, "ratings sheet"), (key, "reader-study key (key=FILE)")):
        if not path.is_file():
            raise EvaluationError(f"{what} not found: {path}")
    summary = score_reader_study(ratings, key, out)
    print(f"reader study: AUROC {summary['auroc']:.3f} over {summary['n']} cases (0.5 = cannot tell); "
          f"ROC {summary['roc_plot']}")
    return summary


__all__ = ["run_reader_make", "run_reader_score"]
