"""evaluate_job: score a train job's checkpoint on one split of a dataset."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from shared.registry import DATASETS
from shared.spec import EvaluateSpec, TrainSpec
from worker.training.checkpoint import load_checkpoint
from worker.training.datasets import load_dataset
from worker.training.device import device_name
from worker.training.errors import UserError
from worker.training.loop import evaluate
from worker.training.models import build_model
from worker.training.train import LOSSES

log = logging.getLogger(__name__)


def evaluate_job(
    spec: EvaluateSpec, train_spec: TrainSpec, checkpoint_path: Path, device: torch.device
) -> dict[str, Any]:
    """Classification metrics of the checkpoint that `train_spec`'s job wrote.

    The split is rebuilt with the train job's val_fraction, so "val" means the samples
    that job validated on and "test" the fixed held-out set it never saw.
    """
    started = time.perf_counter()
    dataset = spec.dataset.name or train_spec.dataset.name
    split = spec.dataset.split
    splits = load_dataset(dataset, train_spec.dataset.val_fraction, device)
    trained_on = DATASETS[train_spec.dataset.name]
    info = splits.info
    if (info.input_shape, info.num_classes) != (trained_on.input_shape, trained_on.num_classes):
        raise UserError(
            f"the model was trained on {trained_on.name!r} (input {list(trained_on.input_shape)}, "
            f"{trained_on.num_classes} classes) and cannot score {dataset!r} "
            f"(input {list(info.input_shape)}, {info.num_classes} classes)"
        )

    model = build_model(train_spec.model, trained_on).to(device)
    try:
        ckpt = load_checkpoint(checkpoint_path, map_location=device)
    except FileNotFoundError:
        raise UserError(f"checkpoint not found: {checkpoint_path}") from None
    except Exception as exc:  # truncated, or not a plain-data checkpoint
        raise UserError(f"checkpoint {checkpoint_path} cannot be read: {exc}") from exc
    try:
        model.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError) as exc:
        raise UserError(f"checkpoint does not fit the source job's model: {exc}") from exc

    data = splits.get(split)
    result = evaluate(
        model, LOSSES[train_spec.loss], data, device=device, batch_size=spec.batch_size
    )
    metrics = classification_metrics(
        data.y.cpu().numpy(), result.predictions.cpu().numpy(), info.num_classes
    )
    metrics.update(
        loss=result.loss,
        num_samples=len(data),
        split=split,
        dataset=dataset,
        checkpoint_epoch=int(ckpt.get("epoch", 0)),
        device=device_name(device),
        duration_s=round(time.perf_counter() - started, 3),
    )
    log.info(
        "evaluated %s on %s/%s: accuracy %.4f", checkpoint_path, dataset, split, metrics["accuracy"]
    )
    return metrics


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, num_classes: int
) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1, per-class scores and the confusion matrix
    (rows = true class, columns = predicted), as JSON-ready Python types."""
    labels = list(range(num_classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    matrix = confusion_matrix(y_true, y_pred, labels=labels)
    return {
        "accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else 0.0,
        "precision": float(np.mean(precision)),
        "recall": float(np.mean(recall)),
        "f1": float(np.mean(f1)),
        "confusion_matrix": matrix.astype(int).tolist(),
        "per_class": [
            {
                "class": c,
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "f1": float(f1[c]),
                "support": int(support[c]),
            }
            for c in labels
        ],
    }
