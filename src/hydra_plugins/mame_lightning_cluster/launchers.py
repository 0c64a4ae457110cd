"""Hydra's submitit launchers, with two things they do not do themselves.

`hydra/launcher=slurm` (conf/hydra/launcher/slurm.yaml) is submitit's SLURM launcher: each multirun
job is one task of a SLURM job array. When sbatch refuses the array (a partition that does not
exist, more memory than a node has), the error names the `hydra.launcher.*` key to change instead
of ending in a submitit traceback.

`hydra/launcher=local_parallel` is submitit's local launcher: jobs run side by side on this
machine, each with its own GPU (`gpus_per_job` of the visible ones), at most one job per GPU
group at a time (`max_parallel` overrides that, e.g. for CPU-only jobs).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher import submitit_launcher

# sbatch's error text -> the launcher keys that set it (first match wins)
SBATCH_KEYS = [
    ("partition", ["partition"]),
    ("memory", ["mem_gb", "mem_per_gpu", "mem_per_cpu"]),
    ("gres", ["gpus_per_node", "gpus_per_task", "gres"]),
    ("generic resource", ["gpus_per_node", "gpus_per_task", "gres"]),
    ("account", ["account"]),
    ("qos", ["qos"]),
    ("time limit", ["timeout_min"]),
    ("node count", ["nodes"]),
    ("cpu", ["cpus_per_task", "cpus_per_gpu"]),
    ("constraint", ["constraint"]),
    ("feature", ["constraint"]),
]


class LauncherSettingError(ValueError):
    """SLURM refused a launcher setting; the message names the hydra.launcher key."""


def rejection_message(sbatch_error: str, params: dict[str, Any]) -> str:
    """One line naming the launcher key(s) behind sbatch's refusal, with sbatch's own words."""
    lines = [line.strip() for line in sbatch_error.splitlines() if "error" in line.lower()]
    reason = "; ".join(dict.fromkeys(lines)) or sbatch_error.strip()
    lowered = reason.lower()
    keys: list[str] = []
    for needle, candidates in SBATCH_KEYS:
        if needle in lowered:
            keys = [k for k in candidates if params.get(k) not in (None, "", {})] or candidates[:1]
            break
    settings = ", ".join(f"hydra.launcher.{k}={params.get(k)}" for k in keys) if keys else (
        "check the hydra.launcher settings: " + ", ".join(
            f"{k}={v}" for k, v in params.items()
            if k in ("partition", "mem_gb", "gpus_per_node", "cpus_per_task", "timeout_min", "nodes") and v is not None))
    return f"{settings}: SLURM refused the job array ({reason})"


def _sbatch_refusal(exc: BaseException) -> str | None:
    cause = exc.__cause__
    if isinstance(cause, subprocess.CalledProcessError) and "sbatch" in " ".join(map(str, cause.cmd or [])):
        return str(exc)
    return None


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    """submitit's SLURM launcher; a refused submission names the hydra.launcher key."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from submitit.core.utils import FailedJobError

        try:
            return super().launch(job_overrides, initial_job_idx)
        except FailedJobError as exc:
            refusal = _sbatch_refusal(exc)
            if refusal is None:
                raise
            raise LauncherSettingError(rejection_message(refusal, self.params)) from None


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES when set, else every device torch sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def job_gpus(gpus: Sequence[str], per_job: int, width: int, job_num: int) -> list[str]:
    """The GPUs of job `job_num` when `width` jobs run at once: consecutive jobs get disjoint groups."""
    slot = job_num % width
    return list(gpus[slot * per_job:(slot + 1) * per_job])


class LocalParallelLauncher(submitit_launcher.LocalLauncher):
    """submitit's local launcher, one GPU group per job and at most one job per group at a time."""

    def __init__(self, gpus_per_job: int = 1, max_parallel: int | None = None, **params: Any) -> None:
        super().__init__(**params)
        self.gpus_per_job = max(0, int(gpus_per_job))
        self.max_parallel = max_parallel
        self.gpus: list[str] = []
        self.width = 1

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        self.gpus = visible_gpus() if self.gpus_per_job else []
        groups = len(self.gpus) // self.gpus_per_job if self.gpus else 0
        if self.gpus_per_job and self.gpus and groups == 0:
            raise LauncherSettingError(f"hydra.launcher.gpus_per_job={self.gpus_per_job}: only {len(self.gpus)} "
                                       f"GPU(s) visible ({','.join(self.gpus)})")
        self.width = int(self.max_parallel or groups or 1)
        if groups:
            self.width = min(self.width, groups)
        self.params["gpus_per_node"] = 0  # each job narrows CUDA_VISIBLE_DEVICES itself (__call__)
        returns: list[JobReturn] = []
        for start in range(0, len(job_overrides), self.width):
            chunk = job_overrides[start:start + self.width]
            returns.extend(super().launch(chunk, initial_job_idx + start))
        return returns

    def __call__(self, sweep_overrides: list[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: dict) -> JobReturn:
        if self.gpus:  # runs in the job's process, before CUDA is initialised
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(job_gpus(self.gpus, self.gpus_per_job, self.width, job_num))
        return super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)
