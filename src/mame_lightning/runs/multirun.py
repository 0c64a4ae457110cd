"""The multirun summary: one record per job of a Hydra multirun (`-m`), one table once every job has ended.

Each job records itself in `<sweep dir>/.sweep/jobs/<num>.json` as it ends, in the process that ran
it (this one, a submitit local job or a SLURM array task): overrides, status, the value it returned
to the sweeper (`optimized_metric`), its result.json, its SLURM job id, and for a failed job the
error and the tail of its log. `sweep_summary.{csv,md,json}` is written once: by the process that
records the last job the sweeper will run (the product of the sweep lists, or Optuna's n_trials),
else by the multirun process at its end. `python -m mame_lightning.sweep DIR` writes it again from
a finished (or interrupted) multirun folder. (Evaluation's guidance sweep is another thing:
`runs/evaluation/guidance_sweep.py`.)
"""

from __future__ import annotations

import csv
import io
import json
import os
import traceback
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mame_lightning.io import write_text

COLUMNS = ["job", "overrides", "status", "objective", "train_loss", "val_loss", "global_step", "seconds",
           "slurm_job_id", "run_dir", "log_tail"]
TABLE_COLUMNS = ["job", "overrides", "objective", "train_loss", "val_loss", "global_step", "seconds", "slurm_job_id",
                 "status"]
RECORDS = ".sweep"
LOG_TAIL_LINES = 30


# -- records --------------------------------------------------------------------------------------
def expected_jobs(config: DictConfig) -> int | None:
    """How many jobs the sweeper will launch, as Hydra's own sweepers count them (None: unknown)."""
    sweeper = config.hydra.sweeper
    target = str(sweeper.get("_target_", ""))
    if target.endswith("OptunaSweeper"):
        return int(sweeper.n_trials)
    if not target.endswith("BasicSweeper"):
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    try:
        overrides = OverridesParser.create().parse_overrides([*params, *config.hydra.overrides.task])
        return sum(len(batch) for batch in BasicSweeper.split_arguments(overrides, None))
    except Exception:  # the sweeper itself reports what it cannot sweep; the end of the multirun summarises
        return None


def _slurm_job_id() -> str | None:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def _tail(text: str, n: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


def _number(value: Any) -> float | None:
    try:
        return float(value) if value is not None and not isinstance(value, (dict, list, str, bool)) else None
    except (TypeError, ValueError):
        return None


def job_record(config: DictConfig, job_return: JobReturn) -> dict[str, Any]:
    """What one job leaves for the summary; read in the job's own process."""
    ok = job_return.status == JobStatus.COMPLETED
    run_dir = Path(OmegaConf.select(config, "run_dir", default=None) or config.hydra.runtime.output_dir)
    result_file = run_dir / "result.json"
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    returned = job_return._return_value
    record = {
        "job": int(config.hydra.job.num),
        "overrides": " ".join(job_return.overrides or []),
        "status": "ok" if ok else "failed",
        "objective": _number(returned) if ok else None,
        "slurm_job_id": _slurm_job_id(),
        "run_dir": str(run_dir),
        "result": result,
        "error": None,
        "log_tail": "",
    }
    if not ok:
        log_file = run_dir / f"{config.hydra.job.name}.log"
        log_text = log_file.read_text(errors="replace") if log_file.is_file() else ""
        error = "".join(traceback.format_exception(returned)) if isinstance(returned, BaseException) else repr(returned)
        record["error"] = f"{type(returned).__name__}: {returned}"[:500]
        record["log_tail"] = _tail(_tail(log_text, LOG_TAIL_LINES // 2) + "\n" + _tail(error, LOG_TAIL_LINES // 2))
    return record


def write_record(sweep_dir: Path, record: dict[str, Any]) -> None:
    folder = sweep_dir / RECORDS / "jobs"
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / f"{record['job']}.json", json.dumps(record, indent=2, default=str))


def _records_from_job_folders(sweep_dir: Path) -> list[dict[str, Any]]:
    """For folders without records: every job folder Hydra wrote (.hydra/overrides.yaml)."""
    records = []
    for overrides_file in sorted(sweep_dir.glob("*/.hydra/overrides.yaml")):
        run_dir = overrides_file.parent.parent
        result_file = run_dir / "result.json"
        result = json.loads(result_file.read_text()) if result_file.is_file() else {}
        num = run_dir.name if run_dir.name.isdigit() else len(records)
        records.append({"job": int(num), "overrides": " ".join(OmegaConf.load(overrides_file)),
                        "status": "ok" if result else "no result.json", "objective": _number(
                            (result.get("optimized_metric") or {}).get("value")),
                        "slurm_job_id": None, "run_dir": str(run_dir), "result": result, "log_tail": ""})
    return records


def read_records(sweep_dir: Path) -> list[dict[str, Any]]:
    folder = sweep_dir / RECORDS / "jobs"
    files = sorted(folder.glob("*.json"), key=lambda p: int(p.stem)) if folder.is_dir() else []
    if not files:
        return _records_from_job_folders(sweep_dir)
    records = [json.loads(p.read_text()) for p in files]
    expected = _read_expected(sweep_dir)
    seen = {r["job"] for r in records}
    for num in range(expected or 0):
        if num not in seen:  # killed, or still running: no on_job_end ran
            records.append({"job": num, "overrides": "", "status": "no record (still running, or killed)",
                            "result": {}, "log_tail": ""})
    return sorted(records, key=lambda r: r["job"])


def _read_expected(sweep_dir: Path) -> int | None:
    path = sweep_dir / RECORDS / "expected.json"
    return json.loads(path.read_text()).get("expected") if path.is_file() else None


# -- the table ------------------------------------------------------------------------------------
def summary_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for record in records:
        result = record.get("result") or {}
        status = record.get("status", "")
        if record.get("error"):
            status = f"failed: {record['error']}"[:200]
        rows.append({
            "job": record["job"],
            "overrides": record.get("overrides", ""),
            "status": status,
            "objective": record.get("objective"),
            "train_loss": result.get("train_loss"),
            "val_loss": result.get("val_loss"),
            "global_step": result.get("global_step"),
            "seconds": result.get("seconds"),
            "slurm_job_id": record.get("slurm_job_id"),
            "run_dir": record.get("run_dir") or result.get("run_dir"),
            "log_tail": record.get("log_tail", ""),
        })
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def rows_to_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in TABLE_COLUMNS) + " |" for r in rows]
    for row in rows:
        if row.get("log_tail"):
            lines += ["", f"### job {row['job']} ({row['overrides']}): {row['status']}", "", "```",
                      row["log_tail"], "```"]
    return "\n".join(lines) + "\n"


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """(Re)write sweep_summary.{csv,md,json} from the records in `sweep_dir`."""
    rows = summary_rows(read_records(sweep_dir))
    write_text(sweep_dir / "sweep_summary.csv", rows_to_csv(rows))
    write_text(sweep_dir / "sweep_summary.md", rows_to_markdown(rows))
    write_text(sweep_dir / "sweep_summary.json", json.dumps(rows, indent=2, default=str))
    return rows


def _claim_summary(sweep_dir: Path) -> bool:
    """True for exactly one caller per multirun: the one that writes the summary."""
    try:
        os.close(os.open(sweep_dir / RECORDS / "summary.lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


class MultirunSummary(Callback):
    """Records each multirun job where it runs and writes the sweep table once all have ended."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        folder = sweep_dir / RECORDS
        (folder / "jobs").mkdir(parents=True, exist_ok=True)
        for stale in [*folder.glob("jobs/*.json"), folder / "summary.lock"]:
            stale.unlink(missing_ok=True)  # a previous multirun into the same folder
        write_text(folder / "expected.json", json.dumps({"expected": expected_jobs(config)}))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        write_record(sweep_dir, job_record(config, job_return))
        expected = _read_expected(sweep_dir)
        recorded = len(list((sweep_dir / RECORDS / "jobs").glob("*.json")))
        if expected is not None and recorded >= expected and _claim_summary(sweep_dir):
            rows = write_summary(sweep_dir)
            print(f"\nSweep summary ({len(rows)} runs): {sweep_dir / 'sweep_summary.md'}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not (sweep_dir / RECORDS / "jobs").is_dir():
            return
        if _claim_summary(sweep_dir):
            write_summary(sweep_dir)
        summary = sweep_dir / "sweep_summary.md"
        if summary.is_file():
            print(f"\nSweep summary: {summary}\n{summary.read_text()}")
