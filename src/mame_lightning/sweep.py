"""Hydra callback that turns a multirun into one table: overrides → final loss, steps, time."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

COLUMNS = ["job", "overrides", "status", "train_loss", "val_loss", "global_step", "seconds", "run_dir"]


def summary_rows(returns: list[JobReturn]) -> list[dict[str, Any]]:
    rows = []
    for num, ret in enumerate(returns):
        ok = ret.status == JobStatus.COMPLETED
        value = ret._return_value if ok else None
        value = value if isinstance(value, dict) else {}
        rows.append({
            "job": num,
            "overrides": " ".join(ret.overrides or []),
            "status": "ok" if ok else f"failed: {ret._return_value!r}"[:200],
            "train_loss": value.get("train_loss"),
            "val_loss": value.get("val_loss"),
            "global_step": value.get("global_step"),
            "seconds": value.get("seconds"),
            "run_dir": value.get("run_dir"),
        })
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def rows_to_markdown(rows: list[dict[str, Any]]) -> str:
    cols = ["overrides", "train_loss", "val_loss", "global_step", "seconds", "status"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class SweepSummary(Callback):
    """Collects each job's result and writes sweep_summary.{csv,md,json} into the sweep folder."""

    def __init__(self) -> None:
        self.returns: list[JobReturn] = []

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        self.returns.append(job_return)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.returns:
            return
        out = Path(config.hydra.sweep.dir)
        out.mkdir(parents=True, exist_ok=True)
        rows = summary_rows(self.returns)
        _atomic_write(out / "sweep_summary.csv", rows_to_csv(rows))
        _atomic_write(out / "sweep_summary.md", rows_to_markdown(rows))
        _atomic_write(out / "sweep_summary.json", json.dumps(rows, indent=2, default=str))
        print(f"\nSweep summary ({len(rows)} runs): {out / 'sweep_summary.md'}\n{rows_to_markdown(rows)}")
