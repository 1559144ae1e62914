"""Loss functions and the L1 weight penalty a spec's recipe names.

Every loss takes the model's raw output and the target batch and returns the mean
over the batch: (N, C) logits with int64 classes for classification, (N, 1) outputs
with float32 targets (N,) for regression.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from shared.spec import LossSpec

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

LOSS_NAMES = ("cross_entropy", "mse", "l1")


def _regression(loss: Callable[..., torch.Tensor]) -> LossFn:
    def fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # (N, 1) against (N,) would broadcast to (N, N): drop the output's last axis.
        # float(): under autocast the output may be bf16/fp16; the loss is taken in fp32.
        return loss(output.squeeze(-1).float(), target)

    fn.__name__ = loss.__name__
    return fn


def default_loss(task: str) -> LossSpec:
    """The server fills the default in at submission; this covers specs built without it."""
    return LossSpec(name="cross_entropy" if task == "classification" else "mse")


def build_loss(spec: LossSpec | None, task: str) -> LossFn:
    """The loss function of a spec's `loss` section (None: the task's default)."""
    spec = spec or default_loss(task)
    if spec.name == "cross_entropy":
        if spec.label_smoothing:
            return functools.partial(F.cross_entropy, label_smoothing=spec.label_smoothing)
        return F.cross_entropy
    if spec.name == "mse":
        return _regression(F.mse_loss)
    if spec.name == "l1":
        return _regression(F.l1_loss)
    raise ValueError(f"unknown loss {spec.name!r}; choose one of: {', '.join(LOSS_NAMES)}")


def penalized_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weights an L1 penalty applies to: matrices, conv kernels and embeddings.

    Biases and normalization scales/shifts are 1-D; penalizing them only fights the
    normalization and is not what "L1 on the weights" means in the usual recipes.
    """
    return [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]


def l1_penalty(weights: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum of |w| over `weights` (the caller multiplies by the coefficient)."""
    # One fused reduction per tensor, then one sum: no Python-side float round trips.
    return torch.stack([w.abs().sum() for w in weights]).sum()
