"""The inner loops: one training epoch and one evaluation pass, as plain functions.

Speed matters here (a job must run at >= 0.97x a bare hand-written loop), so the step
loop does no per-step host work beyond what the bare loop does: the batch order is one
permutation per epoch, the running loss is summed on the device, and the host reads it
back (a CPU-GPU sync point) only every `sync_every` steps.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from worker.training.datasets import Split
from worker.training.errors import JobCancelled, UserError
from worker.training.sink import Sink

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Evaluation has no backward pass and no optimizer state: big batches are cheap.
EVAL_BATCH_SIZE = 1024


@dataclass
class LoopTracker:
    """Counts steps, turns the device-side loss sum into step_loss points, and reports
    progress to the sink at most every `progress_interval_s`.

    Everything here is a pure function of the step count except when progress is
    reported, so two runs with the same seed log identical metric points.
    """

    sink: Sink
    epochs: int
    steps_per_epoch: int
    should_stop: Callable[[], bool] = lambda: False
    sync_every: int = 20
    progress_interval_s: float = 1.0
    epoch: int = 0
    step: int = 0  # global, across epochs (and across a resume)
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


def _accumulator(device: torch.device) -> torch.Tensor:
    # float64 so that differences of the running sum (the step_loss windows) stay exact
    # enough over a long epoch; MPS has no float64.
    dtype = torch.float32 if device.type == "mps" else torch.float64
    return torch.zeros((), dtype=dtype, device=device)


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    data: Split,
    *,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    tracker: LoopTracker,
) -> float:
    """Train for one pass over `data` in an order drawn from `generator`; returns the
    mean training loss per sample. Raises JobCancelled or UserError (non-finite loss)."""
    model.train()
    x, y = data.x, data.y
    n = len(data)
    # The generator lives on the CPU so that a seed gives the same order on any device;
    # the permutation crosses to the device once per epoch, and split() pre-builds the
    # index views so the step loop does no slicing arithmetic in Python.
    batches = torch.randperm(n, generator=generator).to(device).split(batch_size)
    loss_sum = _accumulator(device)
    seen = 0  # samples, known on the host without a sync
    synced_sum, synced_seen = 0.0, 0

    def sync() -> None:
        nonlocal synced_sum, synced_seen
        total = loss_sum.item()  # the CPU-GPU sync point
        if not math.isfinite(total):
            raise UserError(
                f"training loss became non-finite at epoch {tracker.epoch}, step {tracker.step}; "
                "try a lower learning rate"
            )
        if seen > synced_seen:
            window = (total - synced_sum) / (seen - synced_seen)
            tracker.sink.log("step_loss", window, step=tracker.step, epoch=tracker.epoch)
        synced_sum, synced_seen = total, seen

    for idx in batches:
        tracker.check_stop()
        # index_select skips advanced indexing's Python-side parsing: ~3 us a step.
        xb, yb = x.index_select(0, idx), y.index_select(0, idx)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        loss.backward()
        optimizer.step()
        bs = idx.shape[0]
        loss_sum.add_(loss.detach(), alpha=bs)
        seen += bs
        tracker.after_step(bs)
        if tracker.step % tracker.sync_every == 0:
            sync()
    sync()
    return synced_sum / max(n, 1)


@dataclass(frozen=True)
class Evaluation:
    loss: float  # mean per sample
    accuracy: float
    predictions: torch.Tensor  # predicted class per sample, on the data's device


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loss_fn: LossFn,
    data: Split,
    *,
    device: torch.device,
    batch_size: int = EVAL_BATCH_SIZE,
) -> Evaluation:
    """Score `model` on `data` without dropout or autograd; leaves the model in eval mode."""
    model.eval()
    loss_sum = _accumulator(device)
    predictions = []
    for start in range(0, len(data), batch_size):
        xb = data.x[start : start + batch_size].to(device)
        yb = data.y[start : start + batch_size].to(device)
        logits = model(xb)
        loss_sum += loss_fn(logits, yb) * yb.shape[0]
        predictions.append(logits.argmax(dim=1))
    preds = (
        torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long, device=device)
    )
    correct = (preds == data.y.to(device)).sum()
    loss_total, correct_total = torch.stack([loss_sum, correct.to(loss_sum.dtype)]).tolist()
    n = max(len(data), 1)
    return Evaluation(loss=loss_total / n, accuracy=correct_total / n, predictions=preds)
