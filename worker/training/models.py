"""The model zoo: maps a spec's model name and params to an nn.Module.

Parameter ranges and model/dataset compatibility are checked at submission
(shared/registry.py); this only builds what was accepted there.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from shared.registry import CNNParams, DatasetInfo, MLPParams
from shared.spec import CNNSpec, MLPSpec


def build_mlp(params: MLPParams, dataset: DatasetInfo) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(dataset.input_shape)
    for _ in range(params.layers):
        layers += [nn.Linear(width, params.hidden), nn.ReLU()]
        # Dropout(0) still costs a kernel per step in training mode.
        if params.dropout > 0:
            layers.append(nn.Dropout(params.dropout))
        width = params.hidden
    layers.append(nn.Linear(width, dataset.num_classes))
    return nn.Sequential(*layers)


def build_cnn(params: CNNParams, dataset: DatasetInfo) -> nn.Module:
    channels, height, width = dataset.input_shape
    k, c = params.kernel_size, params.channels
    # Two 2x2 max-pools with floor rounding; odd kernels with k//2 padding keep the size.
    flat = 2 * c * (height // 4) * (width // 4)
    return nn.Sequential(
        nn.Conv2d(channels, c, k, padding=k // 2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c, 2 * c, k, padding=k // 2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, params.hidden),
        nn.ReLU(),
        nn.Dropout(params.dropout),
        nn.Linear(params.hidden, dataset.num_classes),
    )


_BUILDERS: dict[str, Callable[..., nn.Module]] = {"mlp": build_mlp, "cnn": build_cnn}


def build_model(model_spec: MLPSpec | CNNSpec, dataset_info: DatasetInfo) -> nn.Module:
    """Build the (untrained, CPU) module a spec's `model` section describes."""
    try:
        builder = _BUILDERS[model_spec.name]
    except KeyError:
        raise ValueError(
            f"unknown model {model_spec.name!r}; choose one of: {', '.join(sorted(_BUILDERS))}"
        ) from None
    return builder(model_spec.params, dataset_info)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
