"""The bodies of the post-training jobs: prune, quantize and export a finished model.

Each reads the source job's checkpoint (a train job's best.pt/last.pt or a prune job's
model file), scores the model on the source dataset's test split before its work (the
same fixed held-out samples every job on that dataset is scored on, prepared with the
checkpoint's normalization statistics), writes its output into `out_dir`, scores the
result the same way, and returns one flat dict of metrics: `before_<key>` and
`after_<key>` for every key of model_report.measure, plus the job's own.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared import metric_catalog as mc
from shared.spec import ConstantSchedule, ExportSpec, PruneSpec, QuantizeSpec
from worker.training.checkpoint import BEST, LAST, checkpoint_file
from worker.training.compression import (
    QUANTIZED_METHOD,
    float_layer_names,
    make_permanent,
    prune_model,
    quantize_model,
    sparsity,
)
from worker.training.datasets import DataPaths, Splits, load_dataset
from worker.training.device import device_name
from worker.training.errors import UserError
from worker.training.export import export_model, model_card
from worker.training.loop import (
    EpochProgress,
    LoopTracker,
    Recipe,
    epoch_batches,
    evaluate,
    loss_accumulator,
    train_one_epoch,
)
from worker.training.losses import build_loss
from worker.training.metrics import accuracy_and_f1, regression_metrics
from worker.training.model_file import LoadedModel, load_model_file, save_model_file
from worker.training.model_report import measure
from worker.training.models import build_model
from worker.training.optimizers import build_optimizer
from worker.training.schedules import Schedule
from worker.training.sink import Sink

log = logging.getLogger(__name__)

CPU = torch.device("cpu")
QUANTIZED_FILE = "model.pt"
# The keys besides before_/after_ live in shared/metric_catalog.py.
SPARSITY_TARGET = mc.SPARSITY_TARGET
SPARSITY_ACHIEVED = mc.SPARSITY_ACHIEVED
PRUNED_TENSORS = mc.PRUNED_TENSORS
PRUNED_CHANNELS = mc.PRUNED_CHANNELS
FINE_TUNE_EPOCHS = mc.FINE_TUNE_EPOCHS
FINE_TUNE_LR = mc.FINE_TUNE_LR
QUANTIZED_LAYERS = mc.QUANTIZED_LAYERS
FLOAT_LAYERS = mc.FLOAT_LAYERS
# The per-epoch series a fine-tuning logs: train.py's, without the (constant) lr.
CLASSIFICATION_EPOCH_KEYS = (mc.TRAIN_LOSS, mc.VAL_LOSS, mc.VAL_ACCURACY, mc.VAL_F1)
REGRESSION_EPOCH_KEYS = (mc.TRAIN_LOSS, mc.VAL_LOSS, mc.VAL_MSE, mc.VAL_MAE, mc.VAL_R2)


def _never() -> bool:
    return False


# ---------------------------------------------------------------- shared steps


def _load_source(source_ckpt: Path) -> LoadedModel:
    return load_model_file(Path(source_ckpt), "of the source job")


def _load_splits(source: LoadedModel, device: torch.device, paths: DataPaths) -> Splits:
    """The source's dataset, split as it was, normalized with its statistics."""
    spec = source.train_spec
    splits = load_dataset(
        spec.dataset.name,
        spec.dataset.params,
        spec.dataset.val_fraction,
        spec.dataset.resolved_normalize(source.info.kind),
        device,
        stats=source.stats,
        paths=paths,
    )
    problem = splits.info.compatible_with(source.info)
    if problem:  # the dataset's files changed since the source trained on them
        raise UserError(problem)
    if len(splits.test) == 0:
        raise UserError(f"dataset {spec.dataset.name!r} has no test samples to measure on")
    return splits


def _measure(
    model: nn.Module, source: LoadedModel, splits: Splits, batch_size: int
) -> dict[str, Any]:
    return measure(
        model,
        splits.test,
        task=source.info.task,
        num_classes=source.info.num_classes,
        batch_size=batch_size,
    )


def _before_after(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    return {
        **{f"{mc.BEFORE}{k}": v for k, v in before.items()},
        **{f"{mc.AFTER}{k}": v for k, v in after.items()},
    }


def _common(
    source: LoadedModel, splits: Splits, started: float, device: torch.device
) -> dict[str, Any]:
    return {
        mc.NUM_SAMPLES: len(splits.test),
        mc.SPLIT: "test",
        mc.DATASET: source.train_spec.dataset.name,
        mc.CHECKPOINT_EPOCH: source.epoch,
        mc.DEVICE: device_name(device),
        mc.DURATION_S: round(time.perf_counter() - started, 3),
    }


def _derived_from(source_ckpt: Path, source: LoadedModel) -> dict[str, Any]:
    return {"file": Path(source_ckpt).name, "derived": source.derived, **source.extra}


# ---------------------------------------------------------------- prune


def prune_job(
    spec: PruneSpec,
    source_ckpt: Path,
    out_dir: Path,
    device: torch.device,
    *,
    paths: DataPaths,
    sink: Sink,
    should_stop: Callable[[], bool] = _never,
) -> dict[str, Any]:
    """Prune the source model to `spec.sparsity`, fine-tune it `spec.fine_tune_epochs`
    on `device` with the masks held, and write it to out_dir/best.pt (last.pt is the
    same file): a model file that evaluation.py also reads as a train checkpoint.

    should_stop is polled before every fine-tuning batch (JobCancelled; nothing is
    written). Raises UserError for a bad source or a diverging fine-tuning.
    """
    started = time.perf_counter()
    source = _load_source(source_ckpt)
    if source.quantized:
        raise UserError("the source model is quantized: prune the float model instead")
    tuning = spec.fine_tune_epochs > 0
    splits = _load_splits(source, device if tuning else CPU, paths)
    model = source.model
    before = _measure(model, source, splits, spec.batch_size)

    try:
        pruning = prune_model(model, spec.sparsity, spec.scope, spec.structured)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    lr = spec.fine_tune_lr or source.train_spec.optimizer.lr / 10
    if tuning:
        _fine_tune(model, source, splits, spec, lr, device, sink, should_stop)
    model.cpu()
    make_permanent(model)
    achieved = sparsity(model)
    after = _measure(model, source, splits, spec.batch_size)

    out_dir = Path(out_dir)
    extra = {
        "pruning": {
            "sparsity": spec.sparsity,
            "scope": spec.scope,
            "structured": spec.structured,
            "achieved": achieved,
            "fine_tune_epochs": spec.fine_tune_epochs,
            "fine_tune_lr": lr if tuning else None,
        },
        "derived_from": _derived_from(source_ckpt, source),
    }
    save_model_file(
        checkpoint_file(out_dir, BEST),
        model,
        spec_json=source.train_spec.model_dump(mode="json"),
        dataset_info=source.info,
        stats=source.stats,
        quantized=None,
        extra=extra,
        epoch=source.epoch,
        also=[checkpoint_file(out_dir, LAST)],
    )
    result = {
        **_before_after(before, after),
        SPARSITY_TARGET: spec.sparsity,
        SPARSITY_ACHIEVED: achieved,
        PRUNED_TENSORS: pruning["pruned_tensors"],
        PRUNED_CHANNELS: pruning["pruned_channels"],
        FINE_TUNE_EPOCHS: spec.fine_tune_epochs,
        FINE_TUNE_LR: lr if tuning else None,
        **_common(source, splits, started, device if tuning else CPU),
    }
    log.info("pruned %s: %s", source_ckpt, result)
    return result


def _fine_tune(
    model: nn.Module,
    source: LoadedModel,
    splits: Splits,
    spec: PruneSpec,
    lr: float,
    device: torch.device,
    sink: Sink,
    should_stop: Callable[[], bool],
) -> None:
    """A plain loop: the source's loss and optimizer kind at `lr` (constant), its
    gradient clipping, no augmentation or regularization; one validation per epoch,
    logged as training logs it. The masks keep the pruned weights at zero."""
    train_spec = source.train_spec
    task = source.info.task
    model.to(device)
    torch.manual_seed(train_spec.seed)  # dropout masks: the same run twice gives the same model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(train_spec.optimizer.model_copy(update={"lr": lr}), params)
    batches_per_epoch = math.ceil(len(splits.train) / spec.batch_size)
    total = spec.fine_tune_epochs * batches_per_epoch
    recipe = Recipe(
        loss_fn=build_loss(train_spec.loss, task),
        optimizer=optimizer,
        schedule=Schedule(ConstantSchedule(name="constant"), lr, batches_per_epoch, total),
        params=params,
        grad_clip_norm=train_spec.grad_clip_norm,
    )
    tracker = LoopTracker(sink=sink, epochs=spec.fine_tune_epochs,
                          steps_per_epoch=batches_per_epoch, should_stop=should_stop)  # fmt: skip
    order = torch.Generator().manual_seed(train_spec.seed)
    keys = CLASSIFICATION_EPOCH_KEYS if task == "classification" else REGRESSION_EPOCH_KEYS
    tracker.start(epoch=0, step=0)
    for epoch in range(1, spec.fine_tune_epochs + 1):
        tracker.epoch = epoch
        model.train()
        train_loss = train_one_epoch(
            model, recipe, splits.train,
            epoch_batches(len(splits.train), spec.batch_size, order, device),
            epoch_index=epoch - 1, progress=EpochProgress(loss_accumulator(device)),
            tracker=tracker,
        )  # fmt: skip
        metrics = {
            mc.TRAIN_LOSS: train_loss,
            **_validate(model, recipe, splits, task, source, device),
        }
        for key in keys:
            sink.log(key, metrics[key], step=epoch, epoch=epoch)
        tracker.report_progress()


def _validate(
    model: nn.Module,
    recipe: Recipe,
    splits: Splits,
    task: str,
    source: LoadedModel,
    device: torch.device,
) -> dict[str, float]:
    result = evaluate(model, model, recipe.loss_fn, splits.val, task=task, device=device)
    if task == "classification":
        accuracy, f1 = accuracy_and_f1(splits.val.y, result.outputs, source.info.num_classes)
        return {mc.VAL_LOSS: result.loss, mc.VAL_ACCURACY: accuracy, mc.VAL_F1: f1}
    scores = regression_metrics(splits.val.y, result.outputs)
    return {
        mc.VAL_LOSS: result.loss,
        mc.VAL_MSE: scores[mc.MSE],
        mc.VAL_MAE: scores[mc.MAE],
        mc.VAL_R2: scores[mc.R2],
    }


# ---------------------------------------------------------------- quantize


def quantize_job(
    spec: QuantizeSpec,
    source_ckpt: Path,
    out_dir: Path,
    device: torch.device,
    *,
    paths: DataPaths,
) -> dict[str, Any]:
    """Quantize the source model (int8 dynamic: Linear, LSTM, GRU; conv and embedding
    layers stay float) and write it to out_dir/model.pt. Runs on the CPU whatever
    `device` is: these int8 kernels exist only there."""
    del device  # kept for the runner's one call shape
    started = time.perf_counter()
    if spec.method != QUANTIZED_METHOD:
        raise UserError(f"unknown quantization method {spec.method!r}")
    source = _load_source(source_ckpt)
    if source.quantized:
        raise UserError("the source model is already quantized")
    splits = _load_splits(source, CPU, paths)
    before = _measure(source.model, source, splits, spec.batch_size)
    qmodel, quantized = quantize_model(source.model)
    if not quantized:
        raise UserError("the model has no Linear, LSTM or GRU layer to quantize")
    kept_float = float_layer_names(qmodel)
    after = _measure(qmodel, source, splits, spec.batch_size)

    path = Path(out_dir) / QUANTIZED_FILE
    save_model_file(
        path,
        qmodel,
        spec_json=source.train_spec.model_dump(mode="json"),
        dataset_info=source.info,
        stats=source.stats,
        quantized=QUANTIZED_METHOD,
        extra={
            QUANTIZED_LAYERS: quantized,
            "float_layers": kept_float,
            "derived_from": _derived_from(source_ckpt, source),
        },
        epoch=source.epoch,
    )
    _check_round_trip(qmodel, path, splits, spec.batch_size)
    result = {
        **_before_after(before, after),
        QUANTIZED_LAYERS: len(quantized),
        FLOAT_LAYERS: len(kept_float),
        **_common(source, splits, started, CPU),
    }
    log.info("quantized %s (%s; float: %s): %s", source_ckpt, quantized, kept_float, result)
    return result


def _check_round_trip(model: nn.Module, path: Path, splits: Splits, batch_size: int) -> None:
    """The written file must give back the very model measured: a prediction server
    loads it with load_model_file."""
    x = splits.test.x[:batch_size].cpu()
    reloaded = load_model_file(path, "just written").model
    with torch.inference_mode():
        same = torch.equal(model(x), reloaded(x))
    if not same:
        raise RuntimeError(f"{path} does not load back as the model it was written from")


# ---------------------------------------------------------------- export


def export_job(
    spec: ExportSpec,
    source_ckpt: Path,
    out_dir: Path,
    device: torch.device,
    *,
    paths: DataPaths,
) -> dict[str, Any]:
    """Export the source model in `spec.formats` into `out_dir` with model_card.json,
    each format checked against the model on up to `spec.batch_size` validation
    samples. Returns the model's measurements (unprefixed: nothing changes) and
    `<format>_size_bytes`, `<format>_max_abs_diff` per format. Runs on the CPU."""
    del device
    started = time.perf_counter()
    source = _load_source(source_ckpt)
    if source.quantized:
        raise UserError(
            "torch.export and ONNX do not carry eager dynamic quantization: "
            "export the float (train or prune) model instead"
        )
    splits = _load_splits(source, CPU, paths)
    model = source.model
    measured = _measure(model, source, splits, spec.batch_size)
    example = splits.val.x[: spec.batch_size]
    card = model_card(
        source.train_spec.model_dump(mode="json"),
        source.info,
        source.stats,
        {k: v if mc.finite_number(v) is not None else None for k, v in measured.items()},
    )
    card["derived_from"] = _derived_from(source_ckpt, source)
    formats = export_model(
        model,
        example,
        Path(out_dir),
        card,
        spec.formats,
        spec.tolerance,
        rebuild=lambda: build_model(source.train_spec.model, source.info),
    )
    result: dict[str, Any] = dict(measured)
    for fmt, checked in formats.items():
        result[f"{fmt}_{mc.SIZE_BYTES}"] = checked["size_bytes"]
        result[f"{fmt}{mc.MAX_ABS_DIFF_SUFFIX}"] = checked["max_abs_diff"]
    result.update(_common(source, splits, started, CPU))
    log.info("exported %s as %s: %s", source_ckpt, list(formats), result)
    return result
