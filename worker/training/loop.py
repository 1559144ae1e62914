"""The inner loops: one training epoch and one evaluation pass, as plain functions.

Speed matters here (a job must run at >= 0.97x a bare hand-written loop), so the step
loop does no per-step host work beyond what the bare loop does: the batch order is one
permutation per epoch, batches are gathered with index_select from tensors already on
the device, the running loss is summed on the device, and the host reads it back (a
CPU-GPU sync point) only every `sync_every` steps. Recipe options that are off cost a
Python branch per step and nothing else.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shared.metric_catalog import STEP_LOSS
from worker.training.datasets import Split
from worker.training.errors import JobCancelled, UserError
from worker.training.losses import LossFn, l1_penalty
from worker.training.parallel import SINGLE_PROCESS, Parallel
from worker.training.schedules import Schedule
from worker.training.sink import Sink

log = logging.getLogger(__name__)

# Evaluation has no backward pass and no optimizer state: big batches are cheap.
EVAL_BATCH_SIZE = 1024

Forward = Callable[[torch.Tensor], torch.Tensor]
Augment = Callable[[torch.Tensor], torch.Tensor]

# Reused: entering a nullcontext costs nothing, and it is what CPU "autocast" is.
_NO_AUTOCAST = contextlib.nullcontext()


@dataclass
class LoopTracker:
    """Counts steps, reports progress to the sink at most every `progress_interval_s`
    and polls `should_stop`.

    Everything logged as a metric point is a pure function of the step count, so two
    runs with the same seed log identical points; only progress depends on the clock.
    """

    sink: Sink
    epochs: int
    steps_per_epoch: int  # batches
    should_stop: Callable[[], bool] = lambda: False
    sync_every: int = 20
    progress_interval_s: float = 1.0
    epoch: int = 0
    step: int = 0  # batches, global across epochs (and across a resume)
    _run_start_step: int = 0
    _run_samples: int = 0
    _started: float = field(default_factory=time.perf_counter)
    _next_progress: float = 0.0

    def start(self, epoch: int, step: int) -> None:
        """Start the clock; `epoch`/`step` are where a resumed run picks up."""
        self.epoch, self.step, self._run_start_step = epoch, step, step
        self._run_samples = 0
        self._started = time.perf_counter()
        self._next_progress = self._started + self.progress_interval_s

    @property
    def steps_total(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def samples_this_run(self) -> int:
        return self._run_samples

    def elapsed(self) -> float:
        return time.perf_counter() - self._started

    def check_stop(self) -> None:
        if self.should_stop():
            raise JobCancelled(f"cancelled at epoch {self.epoch}, step {self.step}")

    def after_step(self, batch_samples: int) -> None:
        self.step += 1
        self._run_samples += batch_samples
        now = time.perf_counter()
        if now >= self._next_progress:
            self.report_progress(now)

    def report_progress(self, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        self._next_progress = now + self.progress_interval_s
        elapsed = max(now - self._started, 1e-9)
        steps_run = self.step - self._run_start_step
        remaining = self.steps_total - self.step
        eta = remaining * elapsed / steps_run if steps_run else None
        self.sink.progress(self.progress_dict(self._run_samples / elapsed, eta))

    def progress_dict(self, samples_per_s: float, eta_s: float | None) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "epochs": self.epochs,
            "step": self.step,
            "steps_total": self.steps_total,
            "samples_per_s": round(samples_per_s, 1),
            "eta_s": None if eta_s is None else round(eta_s, 1),
            "fraction": round(self.step / self.steps_total, 4) if self.steps_total else 1.0,
        }


def loss_accumulator(device: torch.device) -> torch.Tensor:
    # float64 so that differences of the running sum (the step_loss windows) stay exact
    # enough over a long epoch; MPS has no float64.
    dtype = torch.float32 if device.type == "mps" else torch.float64
    return torch.zeros((), dtype=dtype, device=device)


@dataclass
class EpochProgress:
    """How far the current epoch got: what a mid-epoch checkpoint must carry so that a
    resumed run finishes the epoch with the same train_loss and step_loss points."""

    loss_sum: torch.Tensor  # sum over samples of the batch-mean loss, on the device
    batch: int = 0  # batches done this epoch
    samples: int = 0
    synced_sum: float = 0.0  # loss_sum and samples when step_loss was last logged
    synced_samples: int = 0

    def to_state(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "loss_sum": self.loss_sum.detach().cpu(),
            "samples": self.samples,
            "synced_sum": self.synced_sum,
            "synced_samples": self.synced_samples,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> EpochProgress:
        return cls(
            loss_sum=state["loss_sum"].to(device),
            batch=int(state["batch"]),
            samples=int(state["samples"]),
            synced_sum=float(state["synced_sum"]),
            synced_samples=int(state["synced_samples"]),
        )


@dataclass
class Recipe:
    """What one training step applies besides the model and the data."""

    loss_fn: LossFn
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    params: list[nn.Parameter]  # all trainable parameters (clipping)
    l1: float = 0.0
    l1_weights: list[nn.Parameter] = field(default_factory=list)
    grad_clip_norm: float | None = None
    grad_accum_steps: int = 1
    autocast: contextlib.AbstractContextManager[Any] = _NO_AUTOCAST
    scaler: torch.amp.GradScaler | None = None
    augment: Augment | None = None

    def optimizer_steps_per_epoch(self, batches: int) -> int:
        return math.ceil(batches / self.grad_accum_steps)


def epoch_batches(
    n: int, batch_size: int, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """The epoch's batches of sample indices, in an order drawn from `generator`.

    The generator lives on the CPU so that a seed gives the same order on any device;
    the permutation crosses to the device once per epoch, and split() pre-builds the
    index views so the step loop does no slicing arithmetic in Python.
    """
    return torch.randperm(n, generator=generator).to(device).split(batch_size)


def train_one_epoch(
    forward: Forward,
    recipe: Recipe,
    data: Split,
    batches: tuple[torch.Tensor, ...],
    *,
    epoch_index: int,
    progress: EpochProgress,
    tracker: LoopTracker,
    parallel: Parallel = SINGLE_PROCESS,
) -> float:
    """Train on `batches` of `data` from batch `progress.batch` on; returns the epoch's
    mean training loss per sample (the loss term only, without the L1 penalty, so it
    compares with val_loss).

    `epoch_index` (0-based) places the epoch's optimizer steps on the lr schedule.
    `progress` is updated as batches finish, so that the caller can checkpoint it when
    this raises JobCancelled (between batches). Raises UserError on a non-finite loss.

    Data-parallel (`parallel` of several ranks): `batches` are the global batches, the
    same on every rank; each rank steps on its share of each, and `forward` (a DDP
    module) averages the gradients, so every rank takes the optimizer step one process
    would take on the whole batch. `progress` then counts this rank's samples, and the
    loss it reports and returns is the sum over all ranks.
    """
    x, y = data.x, data.y
    n, batch_size = len(data), batches[0].shape[0] if batches else 1
    nb = len(batches)
    accum, scaler, augment, schedule = (
        recipe.grad_accum_steps,
        recipe.scaler,
        recipe.augment,
        recipe.schedule,
    )
    set_lr = not schedule.is_constant
    first_opt_step = epoch_index * recipe.optimizer_steps_per_epoch(nb)
    sync_every = tracker.sync_every
    sharded, world = parallel.distributed, parallel.world_size

    def sync() -> None:
        # The CPU-GPU sync point; data-parallel, also a sum over the ranks, so the
        # check below fails on every rank or on none.
        total, samples = parallel.sum_loss(progress.loss_sum, progress.samples)
        if not math.isfinite(total):
            raise UserError(
                f"training loss became non-finite at epoch {tracker.epoch}, step {tracker.step}; "
                "try a lower learning rate"
            )
        if samples > progress.synced_samples:
            window = (total - progress.synced_sum) / (samples - progress.synced_samples)
            tracker.sink.log(STEP_LOSS, window, step=tracker.step, epoch=tracker.epoch)
        progress.synced_sum, progress.synced_samples = total, samples

    for i in range(progress.batch, nb):
        tracker.check_stop()
        idx = batches[i]
        bs = counted = idx.shape[0]  # the global batch's samples; this rank's that count
        if sharded:
            idx, counted = parallel.shard(idx)
        # index_select skips advanced indexing's Python-side parsing: ~3 us a step.
        xb, yb = x.index_select(0, idx), y.index_select(0, idx)
        if augment is not None:
            xb = augment(xb)
        with recipe.autocast:
            loss = recipe.loss_fn(forward(xb), yb)
        objective = loss
        if recipe.l1:
            objective = objective + recipe.l1 * l1_penalty(recipe.l1_weights)
        if accum > 1:
            # Weight each batch by its share of the window's samples, so k accumulated
            # batches give the gradient of one batch k times as big (also for a short
            # last window or batch).
            start = (i // accum) * accum
            window = min(n, min(start + accum, nb) * batch_size) - start * batch_size
            objective = objective * (bs / window)
        if sharded:
            # DDP averages the ranks' gradients; weighting each rank's mean by its share
            # of the global batch (times the ranks) makes that average the gradient of
            # the global batch's mean, whatever the split.
            objective = objective * (counted * world / bs)
        if scaler is not None:
            scaler.scale(objective).backward()
        else:
            objective.backward()
        if (i + 1) % accum == 0 or i + 1 == nb:
            _optimizer_step(recipe, first_opt_step + i // accum, set_lr)
        progress.loss_sum.add_(loss.detach(), alpha=counted)
        progress.samples += counted
        progress.batch = i + 1
        tracker.after_step(bs)
        if tracker.step % sync_every == 0:
            sync()
    sync()
    return progress.synced_sum / max(n, 1)


def _optimizer_step(recipe: Recipe, opt_step: int, set_lr: bool) -> None:
    opt, scaler = recipe.optimizer, recipe.scaler
    if set_lr:
        lr = recipe.schedule(opt_step)
        for group in opt.param_groups:
            group["lr"] = lr
    if recipe.grad_clip_norm is not None:
        if scaler is not None:
            scaler.unscale_(opt)  # clip the true gradients, not the loss-scaled ones
        torch.nn.utils.clip_grad_norm_(recipe.params, recipe.grad_clip_norm)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)


@dataclass(frozen=True)
class Evaluation:
    loss: float  # mean per sample
    outputs: torch.Tensor  # class index (classification) or value (regression) per sample


@torch.inference_mode()
def evaluate(
    forward: Forward,
    model: nn.Module,
    loss_fn: LossFn,
    data: Split,
    *,
    task: str,
    device: torch.device,
    batch_size: int = EVAL_BATCH_SIZE,
    autocast: contextlib.AbstractContextManager[Any] = _NO_AUTOCAST,
) -> Evaluation:
    """Score `forward` on `data` without dropout or autograd.

    `model` is the module behind `forward` (which may be its torch.compile wrapper):
    it is put in eval mode here and back in train mode by the caller.
    """
    model.eval()
    loss_sum = loss_accumulator(device)
    outputs = []
    for start in range(0, len(data), batch_size):
        xb = data.x[start : start + batch_size]
        yb = data.y[start : start + batch_size]
        with autocast:
            out = forward(xb)
            loss_sum += loss_fn(out, yb) * yb.shape[0]
        outputs.append(out.argmax(dim=1) if task == "classification" else out.squeeze(-1).float())
    if outputs:
        preds = torch.cat(outputs)
    else:
        preds = torch.empty(
            0, dtype=torch.long if task == "classification" else torch.float32, device=device
        )
    return Evaluation(loss=loss_sum.item() / max(len(data), 1), outputs=preds)
