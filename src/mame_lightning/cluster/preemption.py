"""Lightning's SLURM requeue, taken at an optimizer-step boundary so the resumed run is exact.

Under SLURM, Lightning's `SLURMEnvironment(auto_requeue=True)` answers the pre-timeout signal
(`sbatch --signal=USR1@90`) by saving `hpc_ckpt_<n>.ckpt` in the run folder and calling
`scontrol requeue`; the requeued job resumes from that checkpoint. Lightning does this inside the
signal handler, i.e. wherever Python happens to be, possibly between the moment/variance update
and the weight update of AdamW. A checkpoint taken there does not resume to the weights of an
uninterrupted run. This callback only moves the moment: the signal is noted, and Lightning's own
handler runs at the end of the next training batch that stepped the optimizer, where
`ModelCheckpoint` also saves (and from where resumes are exact). Under DDP the ranks agree first,
so all of them save at the same step.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

log = logging.getLogger(__name__)


class RequeueAtStepBoundary(L.Callback):
    """Defers Lightning's SLURM requeue handler to the next optimizer-step boundary (a no-op off SLURM)."""

    def __init__(self) -> None:
        self._signum: int | None = None
        self._lightning_handler: Any = None
        self._pending = False
        self._step_at_batch_start = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the environment Lightning's signal connector reads (single-device strategies do not carry one)
        env = getattr(trainer.strategy, "cluster_environment", None) or getattr(
            trainer._accelerator_connector, "cluster_environment", None)
        if not (isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal is not None):
            return
        handler = signal.getsignal(env.requeue_signal)
        if not callable(handler):
            return
        self._signum, self._lightning_handler = env.requeue_signal, handler
        signal.signal(self._signum, self._note_signal)
        log.info("SLURM requeue on signal %s, at the next optimizer-step boundary", signal.Signals(self._signum).name)

    def _note_signal(self, signum: int, frame: Any) -> None:
        self._pending = True

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._lightning_handler is None or trainer.global_step == self._step_at_batch_start:
            return  # off SLURM, or inside an accumulation window
        if not trainer.strategy.reduce_boolean_decision(self._pending, all=False):
            return
        self._pending = False
        log.info("requeue signal: checkpoint at step %d, then requeue", trainer.global_step)
        self._lightning_handler(self._signum, None)

    def teardown(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if self._lightning_handler is not None and signal.getsignal(self._signum) == self._note_signal:
            signal.signal(self._signum, self._lightning_handler)
        self._lightning_handler = None
