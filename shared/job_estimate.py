"""What a job will hold in memory, estimated from its spec alone (no torch).

The web process calls this at submission (and for the submit form's live estimate) to
hold jobs to the admission limits of shared/limits.py; it only needs the resolved
dataset and the size formulas next to each model in shared/model_catalog.py.

Every part is in bytes, at float32 (4 bytes a value): autocast's bf16/fp16 keeps fp32
weights, gradients and optimizer state, and only makes some activations smaller, so
the estimate stays on the high side for those jobs.

- weights: every parameter (BatchNorm's running statistics, a few values per channel,
  are left out);
- gradients: one per parameter (train jobs);
- optimizer_state: what torch.optim keeps per parameter: two values for adam/adamw
  (exp_avg, exp_avg_sq), one for sgd with momentum (the momentum buffer) and none
  without, one for adagrad (state_sum), one for rmsprop (square_avg) plus one with
  momentum; OPTIMIZER_STATE_VALUES below;
- activations: one batch's layer outputs (the model's per-sample count times the
  batch, which is capped at the training pool when the dataset's size is known);
- data: the dataset as the worker holds it on the device (inputs as float32, or int64
  tokens, and one int64/float32 target per sample); 0 when only the worker can tell
  the size (CIFAR-10's pickles).

tests/test_job_estimate.py checks the parameter counts exactly against the real
modules, weights/gradients/optimizer state against torch's own tensors after a step,
and the activations against what autograd actually saves for one batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from shared.dataset_catalog import DatasetInfo
from shared.limits import GIB
from shared.model_catalog import MODELS
from shared.spec import (
    AdagradSpec,
    AdamSpec,
    AdamWSpec,
    DerivedSpec,
    EvaluateSpec,
    PruneSpec,
    RMSpropSpec,
    SGDSpec,
    TrainSpec,
)

FLOAT_BYTES = 4

# Values of optimizer state per parameter; sgd and rmsprop depend on momentum.
OPTIMIZER_STATE_VALUES = {"adam": 2, "adamw": 2, "sgd": 0, "adagrad": 1, "rmsprop": 1}

PARTS = ("weights", "gradients", "optimizer_state", "activations", "data")


def optimizer_state_values(
    optimizer: AdamSpec | AdamWSpec | SGDSpec | AdagradSpec | RMSpropSpec,
) -> int:
    """Values torch.optim keeps per parameter for this optimizer."""
    values = OPTIMIZER_STATE_VALUES[optimizer.name]
    if isinstance(optimizer, SGDSpec | RMSpropSpec) and optimizer.momentum > 0:
        values += 1  # the momentum buffer
    return values


@dataclass(frozen=True)
class JobEstimate:
    params: int
    weights: int
    gradients: int
    optimizer_state: int
    activations: int
    data: int
    batch: int  # the samples one training (or scoring) batch holds
    # The model param that drives the parameter count most (a refusal names it).
    size_field: str

    @property
    def total_bytes(self) -> int:
        return sum(getattr(self, part) for part in PARTS)

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    def to_json(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "batch": self.batch,
            "memory_bytes": {part: getattr(self, part) for part in PARTS}
            | {"total": self.total_bytes},
            "memory_gib": round(self.total_gib, 3),
        }


def _batch(batch_size: int, info: DatasetInfo) -> int:
    # A batch never holds more samples than the split it is drawn from.
    if info.train_size is not None:
        return max(1, min(batch_size, info.train_size))
    return batch_size


def data_bytes(info: DatasetInfo) -> int:
    """The dataset on the worker's device: inputs, then one target per sample."""
    if info.train_size is None or info.test_size is None:
        return 0
    samples = info.train_size + info.test_size
    per_input = 8 if info.kind == "sequence" else FLOAT_BYTES  # int64 tokens
    per_target = 8 if info.task == "classification" else FLOAT_BYTES  # int64 class ids
    return samples * (math.prod(info.input_shape) * per_input + per_target)


def estimate_train(spec: TrainSpec, info: DatasetInfo) -> JobEstimate:
    """The memory a train job needs, on its resolved dataset."""
    size = MODELS[spec.model.name].model_size(spec.model.params, info)
    batch = _batch(spec.batch_size, info)
    weights = size.params * FLOAT_BYTES
    return JobEstimate(
        params=size.params,
        weights=weights,
        gradients=weights,
        optimizer_state=weights * optimizer_state_values(spec.optimizer),
        activations=size.activations * batch * FLOAT_BYTES,
        data=data_bytes(info),
        batch=batch,
        size_field=size.size_field,
    )


def estimate_derived(spec: DerivedSpec, root: TrainSpec, info: DatasetInfo) -> JobEstimate:
    """A prune, quantize or export job: the model of its chain's train job, a batch of
    `spec.batch_size`; fine-tuning a pruned model adds gradients and the optimizer's
    state as training would."""
    size = MODELS[root.model.name].model_size(root.model.params, info)
    batch = _batch(spec.batch_size, info)
    weights = size.params * FLOAT_BYTES
    tunes = isinstance(spec, PruneSpec) and spec.fine_tune_epochs > 0
    return JobEstimate(
        params=size.params,
        weights=weights,
        gradients=weights if tunes else 0,
        optimizer_state=weights * optimizer_state_values(root.optimizer) if tunes else 0,
        activations=size.activations * batch * FLOAT_BYTES,
        data=data_bytes(info),
        batch=batch,
        size_field=size.size_field,
    )


def estimate_evaluate(
    spec: EvaluateSpec, source: TrainSpec, trained_on: DatasetInfo, scored_on: DatasetInfo
) -> JobEstimate:
    """The memory an evaluate job needs: the source's model, no gradients or optimizer,
    one scoring batch (counted as in training: an upper bound without autograd)."""
    size = MODELS[source.model.name].model_size(source.model.params, trained_on)
    batch = _batch(spec.batch_size, scored_on)
    return JobEstimate(
        params=size.params,
        weights=size.params * FLOAT_BYTES,
        gradients=0,
        optimizer_state=0,
        activations=size.activations * batch * FLOAT_BYTES,
        data=data_bytes(scored_on),
        batch=batch,
        size_field=size.size_field,
    )
