"""The model zoo: maps a spec's `model` section to an nn.Module.

Parameter ranges and model/dataset compatibility are checked at submission
(shared/model_catalog.py); this builds what was accepted there. Every model returns
logits of shape (N, info.output_dim): class scores, or one value for regression.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from shared.dataset_catalog import DatasetInfo
from shared.model_catalog import MODELS
from shared.spec import ModelSpec
from worker.training.models.mlp_cnn import build_cnn, build_mlp
from worker.training.models.recurrent import build_gru, build_lstm
from worker.training.models.resnet import build_resnet
from worker.training.models.transformer import build_transformer

__all__ = ["BUILDERS", "build_model", "count_parameters"]

BUILDERS: dict[str, Callable[[Any, DatasetInfo], nn.Module]] = {
    "mlp": build_mlp,
    "cnn": build_cnn,
    "resnet": build_resnet,
    "lstm": build_lstm,
    "gru": build_gru,
    "transformer": build_transformer,
}


def build_model(model_spec: ModelSpec, info: DatasetInfo) -> nn.Module:
    """Build the (untrained, CPU) module a spec's `model` section describes.

    Only `.name` and `.params` are read. Weights come from torch's global RNG: seed it
    first for reproducible runs.
    """
    builder = BUILDERS.get(model_spec.name)
    if builder is None:
        raise ValueError(f"unknown model {model_spec.name!r}; choose one of: {', '.join(BUILDERS)}")
    entry = MODELS[model_spec.name]
    # The server refuses these at submission; a clear error beats a shape mismatch deep
    # inside forward() if a spec ever bypasses it.
    if info.kind not in entry.inputs:
        raise ValueError(
            f"{model_spec.name} takes {' or '.join(entry.inputs)} data; {info.name!r} is {info.kind} data"
        )
    return builder(model_spec.params, info)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
