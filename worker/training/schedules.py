"""Learning-rate schedules as pure functions of the optimizer step (nanoGPT style).

The loop sets every param group's lr to `lr_at(step)` before each optimizer step, so
the schedule has no state of its own: resuming needs only the step count, and the
same step gives the same lr whatever happened before it.

Steps count optimizer updates (with gradient accumulation, one per `grad_accum_steps`
batches), `steps_per_epoch` is the number of updates in one epoch, and step 0 is the
first update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shared.spec import (
    ConstantSchedule,
    CosineSchedule,
    OneCycleSchedule,
    ScheduleSpec,
    StepSchedule,
)

# torch.optim.lr_scheduler.OneCycleLR's defaults, so "onecycle" means what people know:
# start at max_lr / 25, end at that / 1e4, cosine in both phases.
ONECYCLE_DIV_FACTOR = 25.0
ONECYCLE_FINAL_DIV_FACTOR = 1e4


@dataclass(frozen=True)
class Schedule:
    """A schedule spec bound to one run's lengths; call it with the step."""

    spec: ScheduleSpec  # type: ignore[valid-type]
    base_lr: float
    steps_per_epoch: int
    total_steps: int

    def __call__(self, step: int) -> float:
        return lr_at(step, self.spec, self.base_lr, self.steps_per_epoch, self.total_steps)

    @property
    def is_constant(self) -> bool:
        """True when every step gets base_lr: the loop can skip setting it."""
        return isinstance(self.spec, ConstantSchedule) and self.spec.warmup_epochs == 0


def warmup_steps(warmup_epochs: float, steps_per_epoch: int) -> int:
    return math.ceil(warmup_epochs * steps_per_epoch)


def _cosine(start: float, end: float, fraction: float) -> float:
    """From `start` (fraction 0) to `end` (fraction 1) along half a cosine."""
    fraction = min(max(fraction, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * fraction))


def _curve(step: int, spec: ScheduleSpec, base_lr: float, steps_per_epoch: int,  # type: ignore[valid-type]
           total_steps: int, warmup: int) -> float:  # fmt: skip
    """The schedule's lr at `step` before warmup is applied."""
    if isinstance(spec, ConstantSchedule):
        return base_lr
    if isinstance(spec, StepSchedule):
        # Decays at epoch boundaries, like StepLR stepped once per epoch.
        return base_lr * spec.gamma ** (step // (spec.step_epochs * steps_per_epoch))
    if isinstance(spec, CosineSchedule):
        # Decays after warmup and reaches min_lr exactly at the last update.
        span = max(total_steps - 1 - warmup, 1)
        return _cosine(base_lr, base_lr * spec.min_lr_ratio, (step - warmup) / span)
    raise ValueError(f"unknown schedule {spec!r}")


def _onecycle(step: int, spec: OneCycleSchedule, base_lr: float, total_steps: int) -> float:
    max_lr = spec.max_lr if spec.max_lr is not None else base_lr
    initial = max_lr / ONECYCLE_DIV_FACTOR
    final = initial / ONECYCLE_FINAL_DIV_FACTOR
    last = max(total_steps - 1, 1)
    peak = max(spec.pct_start * last, 1e-9)  # the step at which lr == max_lr
    if step <= peak:
        return _cosine(initial, max_lr, step / peak)
    return _cosine(max_lr, final, (step - peak) / max(last - peak, 1e-9))


def lr_at(
    step: int,
    spec: ScheduleSpec,  # type: ignore[valid-type]
    base_lr: float,
    steps_per_epoch: int,
    total_steps: int,
) -> float:
    """The learning rate of optimizer step `step` (0-based)."""
    if isinstance(spec, OneCycleSchedule):
        return _onecycle(step, spec, base_lr, total_steps)
    warmup = warmup_steps(spec.warmup_epochs, steps_per_epoch)
    lr = _curve(step, spec, base_lr, steps_per_epoch, total_steps, warmup)
    if step < warmup:
        # Linear ramp from ~0: the first update uses lr / (warmup + 1), never exactly 0.
        lr *= (step + 1) / (warmup + 1)
    return lr
