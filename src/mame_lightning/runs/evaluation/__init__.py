"""Evaluation runs over trained models (`python -m mame_lightning.evaluate`, conf/evaluate.yaml).

One module per mode: `guidance_sweep` (mode=sweep, MS-SSIM per guidance scale, MAM-E Table 3),
`fidelity` (prompt vs image), `fid` (FID/KID), `reader_study` (reader_make, reader_score),
`inpaint_fidelity`; `model_loop` loads each text-to-image model once for every mode asked for
(`mode=all`), `inputs` checks what a run works on before anything is generated, and
`multirun_table` combines the tables of a `-m` multirun over guidance scales. Generation goes
through `mame_lightning.pipelines` and the metrics through `mame_lightning.eval`; this package only
decides what to generate, in which order, and where the results go.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from mame_lightning.eval.reader_study import ReaderStudyError
from mame_lightning.io import write_json
from mame_lightning.pipelines.loading import ModelNotFoundError
from mame_lightning.pipelines.prompting import UnknownAttributeError
from mame_lightning.runs.evaluation.inpaint_fidelity import run_inpaint_fidelity
from mame_lightning.runs.evaluation.inputs import EvaluationError, model_paths, sweep_scales
from mame_lightning.runs.evaluation.model_loop import evaluate_models
from mame_lightning.runs.evaluation.reader_study import run_reader_make, run_reader_score

MODES = ("sweep", "fidelity", "fid", "all", "reader_make", "reader_score", "inpaint_fidelity")
MODEL_MODES = ("sweep", "fidelity", "fid")
SUMMARY_FILE = "summary.json"
# Errors caused by the command line or input files: one line, no traceback.
USER_ERRORS = (EvaluationError, ModelNotFoundError, UnknownAttributeError, ReaderStudyError, FileExistsError,
               FileNotFoundError, ValueError)


def run_model_modes(cfg: DictConfig, out: Path, mode: str, multirun_overrides: Sequence[str] | None,
                    feature=None) -> dict:
    """sweep, fidelity, fid or all (fid left out, and said so, without a real_dir) on every model."""
    summary: dict[str, Any] = {}
    modes = MODEL_MODES if mode == "all" else (mode,)
    if mode == "all" and not cfg.real_dir:
        modes = ("sweep", "fidelity")
        summary["fid"] = {"skipped": "no real_dir given (real_dir=PREPARED/text2image)"}
        print(f"FID/KID skipped: {summary['fid']['skipped']}")
    scales = sweep_scales(cfg, multirun_overrides) if "sweep" in modes else []
    if feature is None and cfg.eval.fid.get("feature"):
        from hydra.utils import instantiate

        feature = instantiate(cfg.eval.fid.feature)
    summary["models"] = model_paths(cfg)
    summary["scales"] = list(scales)
    summary.update(evaluate_models(cfg, out, modes, scales, feature))
    if isinstance(summary.get("sweep"), dict):
        summary["sweep"].pop("markdown", None)
    return summary


def run(cfg: DictConfig, out: str | Path | None = None, multirun_overrides: Sequence[str] | None = None,
        feature=None) -> dict:
    """Run `cfg.mode` into `out` (default cfg.out) and write out/summary.json; returns the summary."""
    mode = str(cfg.mode)
    if mode not in MODES:
        raise EvaluationError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    out = Path(str(out if out is not None else cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"mode": mode, "out": str(out)}
    if mode == "reader_make":
        summary["reader_study"] = run_reader_make(cfg, out)
    elif mode == "reader_score":
        summary["reader_study"] = run_reader_score(cfg, out)
    elif mode == "inpaint_fidelity":
        summary["models"] = model_paths(cfg)
        summary["inpaint_fidelity"] = run_inpaint_fidelity(cfg, out)
    else:
        summary.update(run_model_modes(cfg, out, mode, multirun_overrides, feature))
    summary["config"] = OmegaConf.to_container(cfg, resolve=True)
    write_json(out / SUMMARY_FILE, summary)
    print(f"results in {out} (summary: {out / SUMMARY_FILE})")
    return summary


__all__ = ["MODES", "SUMMARY_FILE", "USER_ERRORS", "run", "run_model_modes", "evaluate_models", "EvaluationError"]
