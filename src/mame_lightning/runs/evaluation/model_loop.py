"""The text-to-image modes (sweep, fidelity, fid) over one or several models, each model loaded once.

Models are checked before the first image is drawn, then loaded one at a time (memory stays
bounded) and every asked-for mode runs on it; with several models each gets its own folder
(fidelity, fid) and one sweep table compares them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig

from mame_lightning.runs.evaluation.fid import fid_model, fid_skip_reason, real_set
from mame_lightning.runs.evaluation.fidelity import fidelity_model
from mame_lightning.runs.evaluation.guidance_sweep import sweep_model, write_sweep_outputs
from mame_lightning.runs.evaluation.inputs import EvaluationError, check_model_paths, model_labels, model_paths
from mame_lightning.runs.evaluation.loading import load_for, release_memory


def evaluate_models(cfg: DictConfig, out: Path, modes: Sequence[str], scales: Sequence[float] = (),
                    feature=None) -> dict:
    """Load each model once and run the asked-for modes on it; results by mode (fid/fidelity by model)."""
    paths = check_model_paths(model_paths(cfg))
    labels = model_labels(paths)
    results: dict[str, Any] = {}
    real_entries, real_images = [], []
    if "fid" in modes:
        if not cfg.real_dir:
            raise EvaluationError("mode=fid needs real_dir=PREPARED/text2image (the real images to compare with)")
        real_entries, real_images = real_set(cfg)
        reason = fid_skip_reason(cfg, feature)
        if reason:
            print(reason)
            results["fid"] = {"skipped": reason}
            modes = [m for m in modes if m != "fid"]
    rows: list[dict] = []
    for path, label in zip(paths, labels):
        if not modes:
            break
        several = len(paths) > 1
        model_out, tag = (out / label, f" ({label})") if several else (out, "")
        model = load_for(cfg, path, "project")
        if model.task != "text2image":
            raise EvaluationError(f"{path} is an {model.task} model; sweep, fidelity and fid evaluate text2image models")
        if "sweep" in modes:
            rows += sweep_model(model, label, cfg, scales, out)
        if "fidelity" in modes:
            results.setdefault("fidelity", {})[label] = fidelity_model(model, label, cfg, model_out, tag)
        if "fid" in modes:
            results.setdefault("fid", {})[label] = fid_model(model, label, cfg, model_out, real_entries,
                                                            real_images, feature, tag)
        del model
        release_memory()
    if rows:
        results["sweep"] = write_sweep_outputs(rows, out)
        results["sweep"].update(tensorboard=str(out / "tensorboard"), samples=str(out / "samples"))
        print(results["sweep"]["markdown"])
        print(f"sweep: {results['sweep']['csv']}, {results['sweep']['table']}, {results['sweep']['plot']}; "
              f"sample grids in {out / 'samples'}; tensorboard --logdir {out / 'tensorboard'}")
    return results


__all__ = ["evaluate_models"]
