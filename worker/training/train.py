"""train_job: a TrainSpec in, a trained checkpoint and a metrics dict out."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shared.spec import TrainSpec
from worker.training.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from worker.training.datasets import load_dataset
from worker.training.device import device_name
from worker.training.errors import UserError
from worker.training.loop import LoopTracker, LossFn, evaluate, train_one_epoch
from worker.training.models import build_model, count_parameters
from worker.training.optimizers import build_optimizer
from worker.training.sink import Sink

log = logging.getLogger(__name__)

LOSSES: dict[str, LossFn] = {"cross_entropy": F.cross_entropy}

# What a checkpoint must share with the spec that resumes it; `epochs` may grow.
_RESUME_FIELDS = ("dataset", "model", "loss", "optimizer", "batch_size", "seed")

EPOCH_KEYS = ("train_loss", "val_loss", "val_accuracy", "lr")


def _never() -> bool:
    return False


def train_job(
    spec: TrainSpec,
    device: torch.device,
    sink: Sink,
    checkpoint_path: Path,
    should_stop: Callable[[], bool] = _never,
    *,
    resume_from: Path | None = None,
    checkpoint_every_s: float = 120.0,
) -> dict[str, Any]:
    """Train the model `spec` describes on `device` and return its result metrics.

    Metric points and progress go to `sink`; `should_stop` is polled between steps
    (JobCancelled). The final checkpoint is written atomically to `checkpoint_path`,
    and also at an epoch end when `checkpoint_every_s` has passed since the last one,
    so that a requeued attempt can pass it back as `resume_from`.
    Raises UserError for failures of the job itself (diverged loss, bad checkpoint).
    """
    job_start = time.perf_counter()
    torch.manual_seed(spec.seed)  # weight init and dropout
    # Batch order has its own generator so that it is saved and restored on its own.
    generator = torch.Generator().manual_seed(spec.seed)

    splits = load_dataset(spec.dataset.name, spec.dataset.val_fraction, device)
    model = build_model(spec.model, splits.info).to(device)
    optimizer = build_optimizer(spec.optimizer, model.parameters())
    loss_fn = LOSSES[spec.loss]

    tracker = LoopTracker(
        sink=sink,
        epochs=spec.epochs,
        steps_per_epoch=math.ceil(len(splits.train) / spec.batch_size),
        should_stop=should_stop,
    )
    state: dict[str, Any] = {"epoch": 0, "step": 0, "best_val_accuracy": None, "metrics": {}}
    if resume_from is not None:
        state = _restore(resume_from, spec, model, optimizer, generator, device)
        log.info("resuming %s from epoch %d", resume_from, state["epoch"])
    resumed_from_epoch = state["epoch"]

    log.info(
        "training %s on %s (%s): %d train / %d val samples, %d epochs",
        spec.model.name,
        spec.dataset.name,
        device,
        len(splits.train),
        len(splits.val),
        spec.epochs,
    )
    tracker.start(epoch=state["epoch"], step=state["step"])
    last_saved = time.perf_counter()
    for epoch in range(state["epoch"] + 1, spec.epochs + 1):
        tracker.epoch = epoch
        train_loss = train_one_epoch(
            model,
            optimizer,
            loss_fn,
            splits.train,
            batch_size=spec.batch_size,
            generator=generator,
            device=device,
            tracker=tracker,
        )
        tracker.check_stop()
        val = evaluate(model, loss_fn, splits.val, device=device)
        metrics = {
            "train_loss": train_loss,
            "val_loss": val.loss,
            "val_accuracy": val.accuracy,
            "lr": optimizer.param_groups[0]["lr"],
        }
        for key in EPOCH_KEYS:
            sink.log(key, metrics[key], step=epoch, epoch=epoch)
        tracker.report_progress()
        best = state["best_val_accuracy"]
        state.update(
            epoch=epoch,
            step=tracker.step,
            metrics=metrics,
            best_val_accuracy=val.accuracy if best is None else max(best, val.accuracy),
        )
        if epoch < spec.epochs and time.perf_counter() - last_saved >= checkpoint_every_s:
            save_checkpoint(
                checkpoint_path, _payload(spec, model, optimizer, generator, device, state)
            )
            last_saved = time.perf_counter()
    train_time = tracker.elapsed()

    save_checkpoint(checkpoint_path, _payload(spec, model, optimizer, generator, device, state))
    samples = tracker.samples_this_run
    result = {
        **{k: state["metrics"].get(k) for k in ("train_loss", "val_loss", "val_accuracy")},
        "best_val_accuracy": state["best_val_accuracy"],
        "epochs_run": state["epoch"],
        "steps": state["step"],
        "resumed_from_epoch": resumed_from_epoch,
        "duration_s": round(time.perf_counter() - job_start, 3),
        "train_time_s": round(train_time, 3),
        "samples_per_s": round(samples / train_time, 1) if samples and train_time > 0 else 0.0,
        "num_train_samples": len(splits.train),
        "num_val_samples": len(splits.val),
        "num_parameters": count_parameters(model),
        "device": device_name(device),
        "torch_version": str(torch.__version__),
        "seed": spec.seed,
    }
    log.info("trained %s: %s", spec.model.name, result)
    return result


def _payload(
    spec: TrainSpec,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    device: torch.device,
    state: dict[str, Any],
) -> dict[str, Any]:
    rng: dict[str, torch.Tensor] = {
        "torch": torch.get_rng_state(),
        "batch_order": generator.get_state(),
    }
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    # Only tensors, dicts, lists and scalars: loadable with weights_only=True.
    return {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": state["epoch"],
        "step": state["step"],
        "best_val_accuracy": state["best_val_accuracy"],
        "metrics": dict(state["metrics"]),
        "spec": spec.model_dump(mode="json"),
        "rng": rng,
        "torch_version": str(torch.__version__),
    }


def _restore(
    path: Path,
    spec: TrainSpec,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    device: torch.device,
) -> dict[str, Any]:
    try:
        ckpt = load_checkpoint(path, map_location=device)
    except FileNotFoundError:
        raise UserError(f"checkpoint to resume from not found: {path}") from None
    except Exception as exc:  # a truncated or foreign file
        raise UserError(f"checkpoint {path} cannot be read: {exc}") from exc
    saved = ckpt.get("spec", {})
    current = spec.model_dump(mode="json")
    differ = [k for k in _RESUME_FIELDS if saved.get(k) != current[k]]
    if ckpt.get("format") != CHECKPOINT_FORMAT or differ:
        raise UserError(
            f"checkpoint {path} is incompatible with this job"
            + (f" ({', '.join(differ)} differ)" if differ else " (unknown format)")
        )
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise UserError(f"checkpoint {path} is incompatible with this job: {exc}") from exc
    rng = ckpt["rng"]
    # RNG states must be CPU ByteTensors whatever map_location moved them to.
    torch.set_rng_state(rng["torch"].cpu())
    generator.set_state(rng["batch_order"].cpu())
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"].cpu(), device)
    return {
        "epoch": int(ckpt["epoch"]),
        "step": int(ckpt["step"]),
        "best_val_accuracy": ckpt["best_val_accuracy"],
        "metrics": dict(ckpt["metrics"]),
    }
