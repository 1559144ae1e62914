"""evaluate_job: score a train job's best or last checkpoint on one split of a dataset."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import torch

from shared import metric_catalog as mc
from shared.dataset_catalog import DATASETS, DatasetInfo, resolve_dataset
from shared.schema_base import CatalogError
from shared.spec import EvaluateSpec, SpecError, TrainSpec, eval_dataset_params
from worker.training.checkpoint import checkpoint_file
from worker.training.datasets import DataPaths, load_dataset
from worker.training.device import device_name
from worker.training.errors import UserError
from worker.training.loop import evaluate
from worker.training.losses import build_loss
from worker.training.metrics import classification_metrics, regression_metrics
from worker.training.models import build_model
from worker.training.train import info_from_checkpoint, read_checkpoint

log = logging.getLogger(__name__)


def evaluate_job(
    spec: EvaluateSpec,
    source: TrainSpec,
    checkpoint_dir: Path,
    device: torch.device,
    *,
    paths: DataPaths,
) -> dict[str, Any]:
    """Metrics of `checkpoint_dir/{spec.checkpoint}.pt` (written by `source`'s job) on
    `spec.dataset.split` of the evaluate job's dataset (default: the source's).

    The data goes through the training job's transform (its normalization statistics
    come from the checkpoint), and splits are rebuilt with the source's val_fraction, so
    "val" on the same dataset means the samples that job validated on and "test" the
    fixed held-out set it never saw.
    """
    started = time.perf_counter()
    path = checkpoint_file(checkpoint_dir, spec.checkpoint)
    ckpt = read_checkpoint(path, f"{spec.checkpoint!r} of the source job")
    try:
        name, params = eval_dataset_params(spec, source)
    except SpecError as exc:  # checked at submission; a catalog change since then lands here
        raise UserError(str(exc)) from None
    trained_on = info_from_checkpoint(ckpt)
    if trained_on is None:
        raise UserError(f"checkpoint {path} does not record the dataset it was trained on")
    if name != "csv":
        # Check before loading: the checkpoint's statistics only fit compatible data.
        # (A CSV's shape is known once the file is read; load_dataset checks the stats.)
        try:
            info = resolve_dataset(name, params, paths.catalog_context())
        except CatalogError as exc:
            raise UserError(f"{exc.field}: {exc.message}") from None
        _check_compatible(info, trained_on)
    splits = load_dataset(
        name,
        params,
        source.dataset.val_fraction,
        source.dataset.resolved_normalize(trained_on.kind),
        device,
        stats=ckpt.get("stats"),
        paths=paths,
    )
    _check_compatible(splits.info, trained_on)

    model = build_model(source.model, trained_on).to(device)
    try:
        model.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError) as exc:
        raise UserError(f"checkpoint {path} does not fit the source job's model: {exc}") from exc

    task = trained_on.task
    data = splits.get(spec.dataset.split)
    autocast: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if device.type == "cuda" and source.precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if source.precision == "bf16" else torch.float16
        autocast = torch.autocast(device_type="cuda", dtype=dtype)
    result = evaluate(
        model,
        model,
        build_loss(source.loss, task),
        data,
        task=task,
        device=device,
        batch_size=spec.batch_size,
        autocast=autocast,
    )
    if task == "classification":
        metrics = classification_metrics(data.y, result.outputs, trained_on.num_classes)
    else:
        metrics = regression_metrics(data.y, result.outputs)
    metrics.update(
        {
            mc.LOSS: result.loss,
            mc.NUM_SAMPLES: len(data),
            mc.SPLIT: spec.dataset.split,
            mc.DATASET: name,
            mc.CHECKPOINT: spec.checkpoint,
            mc.CHECKPOINT_EPOCH: int(ckpt.get("epoch", 0)),
            mc.DEVICE: device_name(device),
            mc.DURATION_S: round(time.perf_counter() - started, 3),
        }
    )
    log.info("evaluated %s on %s/%s (%s)", path, name, spec.dataset.split, DATASETS[name].kind)
    return metrics


def _check_compatible(info: DatasetInfo, trained_on: DatasetInfo) -> None:
    # The server checks this at submission; files changed since then are caught here.
    problem = info.compatible_with(trained_on)
    if problem:
        raise UserError(problem)
