"""Classification and regression scores, computed on the device from whole splits.

Each function does its arithmetic where the tensors live and reads the few numbers it
returns back to the host in one transfer (a CPU-GPU sync point), so scoring a
validation split every epoch costs one sync, not one per sample or per class.
"""

from __future__ import annotations

from typing import Any

import torch

from shared.metric_catalog import ACCURACY, F1, MAE, MSE, PRECISION, R2, RECALL


def confusion_matrix(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts; rows = true class, columns = predicted."""
    flat = y_true.long() * num_classes + y_pred.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    # scikit-learn's zero_division=0: a class never predicted (or never present) scores 0.
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))


def scores_from_confusion(matrix: torch.Tensor) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1 and per-class scores, as Python types.

    Macro averages run over every class, also those absent from the split (as
    scikit-learn does with an explicit label list).
    """
    m = matrix.double()
    tp = m.diagonal()
    predicted, support = m.sum(dim=0), m.sum(dim=1)
    precision = _ratio(tp, predicted)
    recall = _ratio(tp, support)
    f1 = _ratio(2 * tp, predicted + support)  # = 2PR / (P + R), and 0 where both are 0
    accuracy = _ratio(tp.sum(), m.sum())
    means = torch.stack([accuracy, precision.mean(), recall.mean(), f1.mean()])
    # One transfer: rows 0-3 per class, then the four summary numbers.
    packed = torch.cat([torch.stack([precision, recall, f1, support]).flatten(), means]).tolist()
    k = m.shape[0]
    rows = [packed[i * k : (i + 1) * k] for i in range(4)]
    acc, p_mean, r_mean, f_mean = packed[4 * k :]
    per_class = [
        {"class": c, "precision": p, "recall": r, "f1": f, "support": int(s)}
        for c, (p, r, f, s) in enumerate(zip(*rows, strict=True))
    ]
    return {
        ACCURACY: acc,
        PRECISION: p_mean,
        RECALL: r_mean,
        F1: f_mean,
        "per_class": per_class,
    }


def classification_metrics(
    y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int
) -> dict[str, Any]:
    """Everything an evaluate job reports about class predictions, JSON-ready."""
    matrix = confusion_matrix(y_true, y_pred, num_classes)
    out = scores_from_confusion(matrix)
    out["confusion_matrix"] = matrix.cpu().tolist()
    return out


def accuracy_and_f1(
    y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int
) -> tuple[float, float]:
    """Per-epoch validation scores: accuracy and macro F1 with one host transfer."""
    m = confusion_matrix(y_true, y_pred, num_classes).double()
    tp = m.diagonal()
    f1 = _ratio(2 * tp, m.sum(dim=0) + m.sum(dim=1))
    acc, f1_macro = torch.stack([_ratio(tp.sum(), m.sum()), f1.mean()]).tolist()
    return acc, f1_macro


def regression_metrics(y_true: torch.Tensor, y_pred: torch.Tensor) -> dict[str, float]:
    """MSE, MAE and R² (1 - SSE/SST; 0 when the targets are constant), in float64."""
    y, p = y_true.double().reshape(-1), y_pred.double().reshape(-1)
    err = p - y
    sse = (err * err).sum()
    sst = ((y - y.mean()) ** 2).sum() if y.numel() else sse.new_zeros(())
    n = max(y.numel(), 1)
    r2 = torch.where(sst > 0, 1.0 - sse / sst.clamp(min=1e-300), torch.zeros_like(sse))
    mse, mae, r2_value = torch.stack([sse / n, err.abs().sum() / n, r2]).tolist()
    return {MSE: mse, MAE: mae, R2: r2_value}
