"""Learning-rate schedules by diffusers' names, as conf/lr_scheduler builds them (a partial handed the optimizer).

`lr_scheduler=constant|cosine|linear|polynomial` picks one; `lr_scheduler.num_warmup_steps=N` warms any
of them up linearly over N optimizer steps. The decaying ones reach zero at `num_training_steps`
(trainer.max_steps). The schedule advances once per optimizer step, never per micro-batch.
"""

from __future__ import annotations

from diffusers.optimization import SchedulerType, get_scheduler

SCHEDULE_NAMES = tuple(kind.value for kind in SchedulerType)
# schedules whose shape does not depend on the run's length
UNBOUNDED = ("constant", "constant_with_warmup", "piecewise_constant")


def lr_schedule(optimizer, name: str = "constant_with_warmup", num_warmup_steps: int = 0,
                num_training_steps: int | None = None, **options):
    """`diffusers.optimization.get_scheduler(name, ...)`, with the mistakes named before training starts."""
    if name not in SCHEDULE_NAMES:
        raise ValueError(f"lr_scheduler.name must be one of diffusers' schedules {SCHEDULE_NAMES}, got {name!r}")
    if int(num_warmup_steps) < 0:
        raise ValueError(f"lr_scheduler.num_warmup_steps must be at least 0, got {num_warmup_steps}")
    if name not in UNBOUNDED and (num_training_steps is None or int(num_training_steps) <= 0):
        raise ValueError(f"lr_scheduler={name} decays to zero at trainer.max_steps; set trainer.max_steps (> 0), "
                         f"got {num_training_steps}")
    steps = None if num_training_steps is None else int(num_training_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=int(num_warmup_steps), num_training_steps=steps, **options)


def constant_schedule(optimizer):
    """The schedule of a module built without one: the optimizer's learning rate throughout."""
    return lr_schedule(optimizer, "constant_with_warmup", 0)


__all__ = ["SCHEDULE_NAMES", "constant_schedule", "lr_schedule"]
