"""A Hydra callback for `python -m mame_lightning.evaluate -m guidance.scale=4,8,...`: one sweep table.

Each job of such a multirun evaluates one guidance scale into its own folder; at the end of the
multirun their sweep.csv files are combined into sweep.{csv,md} and the plot in the sweep folder.
(The summary of a training multirun is another thing: `runs/multirun.py`.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class MultirunSweepTable(Callback):
    """After a multirun, one sweep table from every job's sweep.csv, in the sweep folder."""

    def __init__(self) -> None:
        self.folders: list[Path] = []

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        value = job_return._return_value if job_return.status == JobStatus.COMPLETED else None
        if isinstance(value, dict) and value.get("out"):
            self.folders.append(Path(value["out"]))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from mame_lightning.eval.msssim import read_guidance_sweep_csv
        from mame_lightning.runs.evaluation.guidance_sweep import write_sweep_outputs

        tables = [folder / "sweep.csv" for folder in self.folders if (folder / "sweep.csv").is_file()]
        if not tables:
            return
        rows = [row for table in tables for row in read_guidance_sweep_csv(table)]
        combined = write_sweep_outputs(rows, Path(config.hydra.sweep.dir))
        print(f"\ncombined sweep of {len(tables)} jobs: {combined['table']}\n{combined['markdown']}")


__all__ = ["MultirunSweepTable"]
