"""train_job: a TrainSpec in, checkpoints and a metrics dict out.

Reproducibility rests on three generators, all saved in every checkpoint: the global
torch RNG (weight init, dropout), a CPU generator for the batch order (one permutation
per epoch) and a CPU generator for augmentation. A run stopped anywhere between two
batches and resumed from its last.pt therefore draws exactly what an uninterrupted run
draws, and on CPU ends with the same weights and metrics.

Data-parallel (a `parallel` of several ranks, worker/training/parallel.py): every rank
runs this same function. The batch order is global, so every rank draws the same one;
the global torch RNG and the augmentation generator are per rank (seeded apart, so
ranks draw different dropout masks), and a checkpoint holds each rank's. Rank 0 alone
validates, logs and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared import metric_catalog as mc
from shared.dataset_catalog import DATASETS, DatasetInfo
from shared.spec import AugmentSpec, TrainSpec
from worker.training.checkpoint import (
    BEST,
    CHECKPOINT_FORMAT,
    LAST,
    CheckpointWriter,
    capture_global_rng,
    checkpoint_file,
    load_checkpoint,
    restore_global_rng,
    save_checkpoint,
)
from worker.training.datasets import DataPaths, Splits, augment_batch, load_dataset
from worker.training.device import device_name
from worker.training.errors import JobCancelled, UserError
from worker.training.loop import (
    Augment,
    EpochProgress,
    Forward,
    LoopTracker,
    Recipe,
    epoch_batches,
    evaluate,
    loss_accumulator,
    train_one_epoch,
)
from worker.training.losses import build_loss, penalized_parameters
from worker.training.metrics import accuracy_and_f1, regression_metrics
from worker.training.models import build_model, count_parameters
from worker.training.optimizers import build_optimizer
from worker.training.parallel import SINGLE_PROCESS, Parallel
from worker.training.schedules import Schedule
from worker.training.sink import Sink

log = logging.getLogger(__name__)

# What a checkpoint must share with the spec that resumes it. `epochs` may grow (the
# schedule then stretches from the resume point on); precision, clipping, early
# stopping and the checkpoint cadence may change without breaking the saved state.
RESUME_FIELDS = (
    "dataset", "model", "loss", "optimizer", "schedule", "regularization",
    "batch_size", "grad_accum_steps", "seed",
)  # fmt: skip

# What each epoch logs, in the order its job-log line reads; shared/metric_catalog.py
# lists them as per-epoch series of their task.
CLASSIFICATION_EPOCH_KEYS = (mc.TRAIN_LOSS, mc.VAL_LOSS, mc.VAL_ACCURACY, mc.VAL_F1, mc.LR)
REGRESSION_EPOCH_KEYS = (mc.TRAIN_LOSS, mc.VAL_LOSS, mc.VAL_MSE, mc.VAL_MAE, mc.VAL_R2, mc.LR)

# Any constant works: it only has to give augmentation a stream of its own, apart from
# the batch order's (seeded with the job seed itself).
AUGMENT_SEED_OFFSET = 0x5EED_A06
# Rank r > 0 of a data-parallel job reseeds its own streams with seed + r * this (rank 0
# keeps the seed, so a 1-process run draws what rank 0 draws); any odd constant works.
RANK_SEED_STRIDE = 0x9E37_79B1

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _never() -> bool:
    return False


def epoch_keys(task: str) -> tuple[str, ...]:
    return CLASSIFICATION_EPOCH_KEYS if task == "classification" else REGRESSION_EPOCH_KEYS


# ---------------------------------------------------------------- run state


@dataclass(frozen=True)
class Monitor:
    """The validation metric that picks best.pt and drives early stopping."""

    metric: str
    mode: str  # "min" | "max"
    min_delta: float = 0.0
    patience: int | None = None  # None: no early stopping

    @classmethod
    def for_spec(cls, spec: TrainSpec) -> Monitor:
        es = spec.early_stopping
        if es is None:
            return cls(mc.VAL_LOSS, "min")
        return cls(es.metric, es.mode, es.min_delta, es.patience)

    def improved(self, value: float, best: float | None) -> bool:
        if not math.isfinite(value):
            return False
        if best is None:
            return True
        if self.mode == "max":
            return value > best + self.min_delta
        return value < best - self.min_delta


@dataclass
class RunState:
    """Everything about the run's position that a checkpoint carries besides tensors."""

    epoch: int = 0  # completed epochs
    step: int = 0  # batches done, across epochs
    metrics: dict[str, float] = field(default_factory=dict)  # of the last completed epoch
    best_value: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0  # epochs since the monitored metric last improved
    stopped_early: bool = False


@dataclass
class Run:
    """One job's live objects, built from the spec (and a checkpoint when resuming)."""

    spec: TrainSpec
    device: torch.device
    splits: Splits
    model: nn.Module  # the module whose state_dict is saved (never the compiled wrapper)
    forward: Forward  # model, or torch.compile(model)
    recipe: Recipe
    batch_order: torch.Generator
    augment_generator: torch.Generator
    monitor: Monitor
    parallel: Parallel = SINGLE_PROCESS
    eval_forward: Forward | None = None  # validation's forward when not `forward` (DDP)

    @property
    def task(self) -> str:
        return self.splits.info.task


# ---------------------------------------------------------------- setup


def _autocast(spec: TrainSpec, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if spec.precision == "fp32":
        return contextlib.nullcontext()
    if device.type != "cuda":
        # The issue asks for mixed precision on CUDA only; CPU autocast is slower for
        # most of these models and changes results, so CPU runs stay fp32.
        log.info(
            "precision=%s applies on CUDA only; training in fp32 on %s", spec.precision, device
        )
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=_AMP_DTYPES[spec.precision])


def _augment(spec: TrainSpec, generator: torch.Generator) -> Augment | None:
    augment: AugmentSpec = spec.dataset.augment
    if not augment.enabled:
        return None
    return lambda xb: augment_batch(xb, augment, generator)


def _load_splits(
    spec: TrainSpec, device: torch.device, paths: DataPaths, stats: dict[str, torch.Tensor] | None
) -> Splits:
    kind = DATASETS[spec.dataset.name].kind
    return load_dataset(
        spec.dataset.name,
        spec.dataset.params,
        spec.dataset.val_fraction,
        spec.dataset.resolved_normalize(kind),
        device,
        stats=stats,
        paths=paths,
    )


def _build_run(
    spec: TrainSpec,
    device: torch.device,
    paths: DataPaths,
    stats: dict[str, torch.Tensor] | None,
    parallel: Parallel = SINGLE_PROCESS,
) -> Run:
    splits = _load_splits(spec, device, paths, stats)
    if len(splits.train) == 0:
        raise UserError(f"dataset {spec.dataset.name!r} has no training samples")
    # Seeded right before the model is built, so weight init depends on the seed only,
    # not on whatever a dataset loader drew (and every rank builds the same weights).
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, splits.info).to(device)
    rank_seed = spec.seed + parallel.rank * RANK_SEED_STRIDE
    if parallel.rank:
        torch.manual_seed(rank_seed)  # this rank's dropout masks
    trained: nn.Module = parallel.wrap(model)
    forward: Forward = torch.compile(trained) if spec.compile else trained  # type: ignore[assignment]
    eval_forward = None
    if trained is not model:
        # Only rank 0 validates: a DDP forward there would wait for the other ranks.
        eval_forward = torch.compile(model) if spec.compile else model
    batch_order = torch.Generator().manual_seed(spec.seed)
    augment_generator = torch.Generator().manual_seed(rank_seed + AUGMENT_SEED_OFFSET)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(spec.optimizer, params)
    batches = math.ceil(len(splits.train) / spec.batch_size)
    steps_per_epoch = math.ceil(batches / spec.grad_accum_steps)
    l1 = spec.regularization.l1
    scaler = None
    if spec.precision == "fp16" and device.type == "cuda":
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range.
        scaler = torch.amp.GradScaler("cuda")
    recipe = Recipe(
        loss_fn=build_loss(spec.loss, splits.info.task),
        optimizer=optimizer,
        schedule=Schedule(
            spec.schedule, spec.optimizer.lr, steps_per_epoch, spec.epochs * steps_per_epoch
        ),
        params=params,
        l1=l1,
        l1_weights=penalized_parameters(model) if l1 else [],
        grad_clip_norm=spec.grad_clip_norm,
        grad_accum_steps=spec.grad_accum_steps,
        autocast=_autocast(spec, device),
        scaler=scaler,
        augment=_augment(spec, augment_generator),
    )
    return Run(spec, device, splits, model, forward, recipe, batch_order, augment_generator,
               Monitor.for_spec(spec), parallel, eval_forward)  # fmt: skip


# ---------------------------------------------------------------- checkpoints


def _payload(
    run: Run,
    state: RunState,
    epoch_start_order: torch.Tensor,
    progress: EpochProgress | None = None,
) -> dict[str, Any]:
    """A checkpoint of `run` at `state`; `progress` when stopped inside an epoch.

    `epoch_start_order` is the batch-order generator's state at the start of the epoch
    in progress (for an epoch boundary: its current state), so a resumed run re-draws
    that epoch's permutation and skips the batches already done.

    Data-parallel, every rank calls this (it gathers the ranks' RNG states and sums
    their loss so far) and rank 0 writes what it returns.
    """
    recipe = run.recipe
    parallel = run.parallel
    grads = None
    if progress is not None and progress.batch % recipe.grad_accum_steps:
        # Stopped inside an accumulation window: its summed gradients are state too.
        grads = [None if p.grad is None else p.grad.detach().cpu() for p in recipe.params]
    # Only tensors, dicts, lists and scalars: loadable with weights_only=True.
    return {
        "format": CHECKPOINT_FORMAT,
        "model": run.model.state_dict(),
        "optimizer": recipe.optimizer.state_dict(),
        "scheduler": {
            "name": run.spec.schedule.name,
            "optimizer_step": _optimizer_steps(run, state, progress),
        },
        "scaler": None if recipe.scaler is None else recipe.scaler.state_dict(),
        "epoch": state.epoch,
        "step": state.step,
        "epoch_progress": None if progress is None else _progress_state(parallel, progress),
        "grads": grads,
        "metrics": dict(state.metrics),
        "best": {
            "metric": run.monitor.metric,
            "value": state.best_value,
            "epoch": state.best_epoch,
            "bad_epochs": state.bad_epochs,
        },
        "stopped_early": state.stopped_early,
        "stats": {k: v.detach().cpu() for k, v in run.splits.stats.items()},
        "dataset_info": _info_to_dict(run.splits.info),
        "spec": run.spec.model_dump(mode="json"),
        "rng": {
            **capture_global_rng(run.device),
            "batch_order_epoch_start": epoch_start_order.clone(),
            "augment": run.augment_generator.get_state(),
            **_rank_rng(run),
        },
        "world_size": parallel.world_size,
        "torch_version": str(torch.__version__),
    }


def _rank_rng(run: Run) -> dict[str, Any]:
    """Data-parallel: every rank's own RNG states, in rank order, under "ranks"."""
    if not run.parallel.distributed:
        return {}
    mine = {**capture_global_rng(run.device), "augment": run.augment_generator.get_state()}
    return {"ranks": run.parallel.gather(mine)}


def _progress_state(parallel: Parallel, progress: EpochProgress) -> dict[str, Any]:
    """The epoch's progress with the loss so far summed over the ranks: a resumed run
    gives the sum to rank 0 and zero to the others (see `_restore`)."""
    state = progress.to_state()
    if parallel.distributed:
        total, samples = parallel.sum_loss(progress.loss_sum, progress.samples)
        state["loss_sum"] = torch.tensor(total, dtype=state["loss_sum"].dtype)
        state["samples"] = samples
    return state


def _optimizer_steps(run: Run, state: RunState, progress: EpochProgress | None) -> int:
    batches = math.ceil(len(run.splits.train) / run.spec.batch_size)
    done = state.epoch * run.recipe.optimizer_steps_per_epoch(batches)
    if progress is not None:
        done += progress.batch // run.recipe.grad_accum_steps
    return done


def _info_to_dict(info: DatasetInfo) -> dict[str, Any]:
    out = dataclasses.asdict(info)
    out["input_shape"] = list(info.input_shape)
    return out


def info_from_checkpoint(ckpt: dict[str, Any]) -> DatasetInfo | None:
    raw = ckpt.get("dataset_info")
    if not raw:
        return None
    return DatasetInfo(**{**raw, "input_shape": tuple(raw["input_shape"])})


def read_checkpoint(path: Path, purpose: str) -> dict[str, Any]:
    """load_checkpoint with failures turned into UserError (the job cannot succeed)."""
    try:
        return load_checkpoint(path)
    except FileNotFoundError:
        raise UserError(f"checkpoint {purpose} not found: {path}") from None
    except Exception as exc:  # truncated, or not a plain-data checkpoint
        raise UserError(f"checkpoint {path} cannot be read: {exc}") from exc


def _check_resumable(ckpt: dict[str, Any], spec: TrainSpec, path: Path) -> None:
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(
            f"checkpoint {path} has format {ckpt.get('format')}, this worker reads {CHECKPOINT_FORMAT}"
        )
    saved = ckpt.get("spec") or {}
    current = spec.model_dump(mode="json")
    differ = [k for k in RESUME_FIELDS if saved.get(k) != current[k]]
    if differ:
        raise UserError(
            f"checkpoint {path} is incompatible with this job ({', '.join(differ)} differ)"
        )
    if int(ckpt["epoch"]) > spec.epochs:
        raise UserError(
            f"checkpoint {path} is at epoch {ckpt['epoch']}, past this job's {spec.epochs} epochs"
        )


def _restore(run: Run, ckpt: dict[str, Any], path: Path) -> tuple[RunState, EpochProgress | None]:
    recipe = run.recipe
    try:
        run.model.load_state_dict(ckpt["model"])
        recipe.optimizer.load_state_dict(ckpt["optimizer"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise UserError(f"checkpoint {path} is incompatible with this job: {exc}") from exc
    if recipe.scaler is not None and ckpt.get("scaler"):
        recipe.scaler.load_state_dict(ckpt["scaler"])
    if ckpt.get("grads") is not None:
        for p, g in zip(recipe.params, ckpt["grads"], strict=True):
            p.grad = None if g is None else g.to(p.device)
    rng = ckpt["rng"]
    parallel = run.parallel
    ranks = rng.get("ranks")
    if ranks is not None and len(ranks) == parallel.world_size:
        mine = ranks[parallel.rank]
    elif parallel.is_main:
        mine = rng
    else:
        # Written by a run with other ranks: this rank keeps its fresh seeds, so the
        # resumed run is no longer the bit-exact continuation of that one.
        log.warning("checkpoint %s holds no RNG state for rank %d", path, parallel.rank)
        mine = None
    if mine is not None:
        restore_global_rng(mine, run.device)
        run.augment_generator.set_state(mine["augment"].cpu())
    run.batch_order.set_state(rng["batch_order_epoch_start"].cpu())
    best = ckpt["best"]
    same_monitor = best["metric"] == run.monitor.metric
    state = RunState(
        epoch=int(ckpt["epoch"]),
        step=int(ckpt["step"]),
        metrics=dict(ckpt["metrics"]),
        # A changed early-stopping metric starts its tracking afresh.
        best_value=best["value"] if same_monitor else None,
        best_epoch=best["epoch"] if same_monitor else None,
        bad_epochs=int(best["bad_epochs"]) if same_monitor else 0,
        stopped_early=bool(ckpt.get("stopped_early", False)),
    )
    raw = ckpt.get("epoch_progress")
    progress = None if raw is None else EpochProgress.from_state(raw, run.device)
    if progress is not None and not parallel.is_main:
        # The checkpoint holds the loss summed over all ranks; rank 0 carries it on.
        progress.loss_sum.zero_()
        progress.samples = 0
    return state, progress


# ---------------------------------------------------------------- epochs


def _validate(run: Run) -> dict[str, float]:
    """The validation metrics, computed by rank 0 and the same on every rank (early
    stopping and best.pt follow them)."""
    metrics = _score_validation(run) if run.parallel.is_main else None
    return run.parallel.broadcast(metrics)  # type: ignore[return-value]


def _score_validation(run: Run) -> dict[str, float]:
    result = evaluate(
        run.eval_forward or run.forward,
        run.model,
        run.recipe.loss_fn,
        run.splits.val,
        task=run.task,
        device=run.device,
        autocast=run.recipe.autocast,
    )
    if run.task == "classification":
        accuracy, f1 = accuracy_and_f1(
            run.splits.val.y, result.outputs, run.splits.info.num_classes
        )
        return {mc.VAL_LOSS: result.loss, mc.VAL_ACCURACY: accuracy, mc.VAL_F1: f1}
    scores = regression_metrics(run.splits.val.y, result.outputs)
    return {
        mc.VAL_LOSS: result.loss,
        mc.VAL_MSE: scores[mc.MSE],
        mc.VAL_MAE: scores[mc.MAE],
        mc.VAL_R2: scores[mc.R2],
    }


def _train_epochs(
    run: Run,
    state: RunState,
    progress: EpochProgress | None,
    tracker: LoopTracker,
    writer: CheckpointWriter,
    checkpoint_dir: Path,
) -> None:
    """Train from `state` (and `progress` inside an epoch) to the end or an early stop,
    validating and checkpointing after each epoch; updates `state` as it goes."""
    spec, sink = run.spec, tracker.sink
    last_file, best_file = (
        checkpoint_file(checkpoint_dir, LAST),
        checkpoint_file(checkpoint_dir, BEST),
    )
    saved_at: tuple[int, int] | None = None
    for epoch in range(state.epoch + 1, spec.epochs + 1):
        if state.stopped_early:
            break
        tracker.epoch = epoch
        epoch_start_order = run.batch_order.get_state()
        if progress is None:
            progress = EpochProgress(loss_accumulator(run.device))
        batches = epoch_batches(len(run.splits.train), spec.batch_size, run.batch_order, run.device)
        run.model.train()
        try:
            train_loss = train_one_epoch(
                run.forward, run.recipe, run.splits.train, batches,
                epoch_index=epoch - 1, progress=progress, tracker=tracker,
                parallel=run.parallel,
            )  # fmt: skip
            tracker.check_stop()  # a stop here resumes with this epoch's validation
        except JobCancelled:
            state.step = tracker.step
            _save(run, writer, last_file, _payload(run, state, epoch_start_order, progress))
            writer.flush()
            log.info("stopped at epoch %d, batch %d: wrote %s", epoch, progress.batch, last_file)
            raise
        progress = None
        metrics = {
            mc.TRAIN_LOSS: train_loss,
            **_validate(run),
            mc.LR: run.recipe.optimizer.param_groups[0]["lr"],
        }
        for key in epoch_keys(run.task):
            sink.log(key, metrics[key], step=epoch, epoch=epoch)
        tracker.report_progress()

        state.epoch, state.step, state.metrics = epoch, tracker.step, metrics
        targets = []
        if run.monitor.improved(metrics[run.monitor.metric], state.best_value):
            state.best_value, state.best_epoch, state.bad_epochs = (
                metrics[run.monitor.metric],
                epoch,
                0,
            )
            targets.append(best_file)
        else:
            state.bad_epochs += 1
            patience = run.monitor.patience
            if patience is not None and state.bad_epochs >= patience:
                state.stopped_early = True
                log.info("early stop at epoch %d: %s did not improve for %d epochs",
                         epoch, run.monitor.metric, patience)  # fmt: skip
        if epoch % spec.checkpoint_every_epochs == 0 or epoch == spec.epochs or state.stopped_early:
            targets.insert(0, last_file)
            saved_at = (state.epoch, state.step)
        if targets:
            # The batch-order generator now stands at the next epoch's start.
            payload = _payload(run, state, run.batch_order.get_state())
            _save(run, writer, targets[0], payload, also=targets[1:])
    if saved_at != (state.epoch, state.step):
        # Resumed from a finished run: still leave last.pt in this job's directory.
        _save(run, writer, last_file, _payload(run, state, run.batch_order.get_state()))


def _save(
    run: Run,
    writer: CheckpointWriter,
    path: Path,
    payload: dict[str, Any],
    also: Sequence[Path] = (),
) -> None:
    if run.parallel.is_main:  # the one writer of a data-parallel job's files
        writer.submit(path, payload, also=also)


def train_job(
    spec: TrainSpec,
    device: torch.device,
    sink: Sink,
    checkpoint_dir: Path,
    should_stop: Callable[[], bool] = _never,
    *,
    paths: DataPaths,
    resume_from: Path | None = None,
    parallel: Parallel = SINGLE_PROCESS,
) -> dict[str, Any]:
    """Train the model `spec` describes on `device` and return its result metrics.

    Writes `checkpoint_dir/last.pt` every `spec.checkpoint_every_epochs` epochs, at the
    end and when stopped, and `checkpoint_dir/best.pt` whenever the monitored metric
    improves. `should_stop` is polled before every batch: when it returns True, last.pt
    is written at that point (also mid-epoch) and JobCancelled raised. Passing that
    last.pt as `resume_from` continues the run exactly where it stopped.
    Raises UserError for failures of the job itself (diverged loss, bad checkpoint).

    With `parallel` of several ranks, every rank calls this with its own device; rank
    0's `sink`, `should_stop` and checkpoint writes count, the other ranks follow rank
    0's decision to stop (worker/training/distributed.py runs the ranks).
    """
    job_start = time.perf_counter()
    checkpoint_dir = Path(checkpoint_dir)
    ckpt = None
    if resume_from is not None:
        ckpt = read_checkpoint(Path(resume_from), "to resume from")
        _check_resumable(ckpt, spec, Path(resume_from))
    # A resumed run normalizes with the statistics it trained with.
    run = _build_run(spec, device, paths, None if ckpt is None else ckpt.get("stats"), parallel)
    state, progress = RunState(), None
    if ckpt is not None and resume_from is not None:
        state, progress = _restore(run, ckpt, Path(resume_from))
        if parallel.is_main:
            _carry_best(Path(resume_from).parent, checkpoint_dir)
        log.info("resuming %s from epoch %d, step %d", resume_from, state.epoch, state.step)
    resumed = (state.epoch, state.step) if ckpt is not None else (None, None)
    del ckpt

    batches_per_epoch = math.ceil(len(run.splits.train) / spec.batch_size)
    if parallel.distributed:
        should_stop = _rank_zero_decides(parallel, should_stop)
    tracker = LoopTracker(sink=sink, epochs=spec.epochs, steps_per_epoch=batches_per_epoch,
                          should_stop=should_stop)  # fmt: skip
    log.info(
        "training %s on %s (%s%s): %d train / %d val samples, %d epochs",
        spec.model.name, spec.dataset.name, device,
        f", rank {parallel.rank} of {parallel.world_size}" if parallel.distributed else "",
        len(run.splits.train), len(run.splits.val), spec.epochs,
    )  # fmt: skip
    tracker.start(epoch=state.epoch, step=state.step)
    with CheckpointWriter() as writer:
        _train_epochs(run, state, progress, tracker, writer, checkpoint_dir)
        writer.flush()  # the last checkpoint is on disk before the job counts as done
        train_time = tracker.elapsed()

    samples = tracker.samples_this_run
    result: dict[str, Any] = {
        **{k: state.metrics.get(k) for k in epoch_keys(run.task)},
        mc.BEST_METRIC: run.monitor.metric,
        mc.BEST_METRIC_VALUE: state.best_value,
        mc.BEST_EPOCH: state.best_epoch,
        mc.STOPPED_EARLY: state.stopped_early,
        mc.EPOCHS_RUN: state.epoch,
        mc.STEPS: state.step,
        mc.RESUMED_FROM_EPOCH: resumed[0],
        mc.RESUMED_FROM_STEP: resumed[1],
        mc.DURATION_S: round(time.perf_counter() - job_start, 3),
        mc.TRAIN_TIME_S: round(train_time, 3),
        mc.SAMPLES_PER_S: round(samples / train_time, 1) if samples and train_time > 0 else 0.0,
        mc.NUM_TRAIN_SAMPLES: len(run.splits.train),
        mc.NUM_VAL_SAMPLES: len(run.splits.val),
        mc.NUM_PARAMETERS: count_parameters(run.model),
        mc.DEVICE: _devices_name(device, parallel),
        mc.TORCH_VERSION: str(torch.__version__),
        mc.SEED: spec.seed,
    }
    if parallel.is_main:
        log.info("trained %s: %s", spec.model.name, result)
    return result


def _rank_zero_decides(parallel: Parallel, should_stop: Callable[[], bool]) -> Callable[[], bool]:
    """Every rank stops at the same step, when rank 0's `should_stop` says so."""

    def agreed() -> bool:
        return parallel.agree_to_stop(parallel.is_main and should_stop())

    return agreed


def _devices_name(device: torch.device, parallel: Parallel) -> str:
    name = device_name(device)
    return f"{parallel.world_size} x {name}" if parallel.distributed else name


def _carry_best(source_dir: Path, checkpoint_dir: Path) -> None:
    """Resuming into another directory: bring the best checkpoint along, so that this
    job's best.pt is the best of the whole run, not of the part after the resume."""
    source, target = checkpoint_file(source_dir, BEST), checkpoint_file(checkpoint_dir, BEST)
    if source.is_file() and not target.exists() and source.resolve() != target.resolve():
        save_checkpoint(target, load_checkpoint(source))
