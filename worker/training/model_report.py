"""What a model costs and how well it does: size, parameters, zeros, CPU latency and
the task's scores on one split. Prune, quantize and export jobs report these before
and after their work, measured the same way, on the CPU (where int8 dynamic
quantization runs and where the exported model will most often be served)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from shared import metric_catalog as mc
from worker.training.checkpoint import serialize
from worker.training.compression import quantized_weights
from worker.training.datasets import Split
from worker.training.metrics import classification_metrics, regression_metrics

WARMUP_PASSES = 3
# The measure() keys, in order: derive.py prefixes them with before_/after_.
SIZE_BYTES = mc.SIZE_BYTES
NONZERO_FRACTION = mc.NONZERO_FRACTION
LATENCY_MS = mc.LATENCY_MS
COST_KEYS = (SIZE_BYTES, mc.NUM_PARAMETERS, NONZERO_FRACTION, LATENCY_MS)
CLASSIFICATION_KEYS = (mc.ACCURACY, mc.F1)
REGRESSION_KEYS = (mc.R2, mc.MSE, mc.MAE)


def score_keys(task: str) -> tuple[str, ...]:
    return CLASSIFICATION_KEYS if task == "classification" else REGRESSION_KEYS


def all_weights(model: nn.Module) -> Iterator[torch.Tensor]:
    """Every parameter's values: the float parameters, and the int8 layers' weights
    (dequantized: a zero stays exactly zero) and biases."""
    yield from (p.detach() for p in model.parameters())
    for _, tensor in quantized_weights(model):
        yield tensor.dequantize() if tensor.is_quantized else tensor.detach()


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of torch.save(model.state_dict()): the size of the weights on disk."""
    return len(serialize(model.state_dict()))


def predict(model: nn.Module, x: torch.Tensor, task: str, batch_size: int) -> torch.Tensor:
    """Class indices (classification) or values (regression) for `x`, batch by batch."""
    outputs = []
    with torch.inference_mode():
        for start in range(0, x.shape[0], batch_size):
            out = model(x[start : start + batch_size])
            outputs.append(out.argmax(dim=1) if task == "classification" else out.squeeze(-1))
    if not outputs:
        return torch.empty(0, dtype=torch.long if task == "classification" else torch.float32)
    return torch.cat(outputs)


def latency_ms(model: nn.Module, batch: torch.Tensor, repeats: int) -> float:
    """Median milliseconds of one forward pass over `batch`, after a warm-up (the first
    passes pay for allocations and kernel selection)."""
    times = []
    with torch.inference_mode():
        for _ in range(WARMUP_PASSES):
            model(batch)
        for _ in range(max(repeats, 1)):
            start = time.perf_counter()
            model(batch)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(
    model: nn.Module,
    split: Split,
    *,
    task: str,
    num_classes: int,
    batch_size: int,
    repeats: int = 20,
) -> dict[str, Any]:
    """The model's costs and its scores on `split`, on the CPU (the model is moved
    there and put in eval mode).

    size_bytes: torch.save of the state_dict; num_parameters and nonzero_fraction:
    over all parameters, the int8 weights included; latency_ms: median of `repeats`
    forward passes over one batch of `batch_size` samples; then accuracy and f1
    (classification) or r2, mse and mae (regression).
    """
    model = model.cpu().eval()
    x, y = split.x.cpu(), split.y.cpu()
    weights = list(all_weights(model))
    total = sum(w.numel() for w in weights)
    nonzero = sum(int(torch.count_nonzero(w)) for w in weights)
    result: dict[str, Any] = {
        SIZE_BYTES: state_dict_bytes(model),
        mc.NUM_PARAMETERS: total,
        NONZERO_FRACTION: nonzero / total if total else 0.0,
        LATENCY_MS: latency_ms(model, x[:batch_size], repeats) if len(y) else 0.0,
    }
    predictions = predict(model, x, task, batch_size)
    if task == "classification":
        scores = classification_metrics(y, predictions, num_classes)
    else:
        scores = regression_metrics(y, predictions.float())
    result.update({k: scores[k] for k in score_keys(task)})
    return result
