"""Fully connected and classic conv-pool classifiers for images and tables."""

from __future__ import annotations

import math

from torch import nn

from shared.dataset_catalog import DatasetInfo
from shared.model_catalog import CNNParams, MLPParams
from worker.training.models.activations import make_activation


def build_mlp(params: MLPParams, info: DatasetInfo) -> nn.Module:
    """Flatten -> `layers` x [Linear, activation, Dropout] -> Linear."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(info.input_shape)
    for _ in range(params.layers):
        layers += [nn.Linear(width, params.hidden), make_activation(params.activation)]
        # Dropout(0) is the identity; leaving it out keeps one module call per layer off
        # the hot path (and the state-dict keys of earlier checkpoints unchanged).
        if params.dropout > 0:
            layers.append(nn.Dropout(params.dropout))
        width = params.hidden
    layers.append(nn.Linear(width, info.output_dim))
    return nn.Sequential(*layers)


def build_cnn(params: CNNParams, info: DatasetInfo) -> nn.Module:
    """The pytorch/examples mnist layout: conv-pool blocks, a dense layer, dropout.

    With the defaults (2 blocks, no batch norm, ReLU) the module list, and so the weights
    a seed draws, is the same as the original digits CNN.
    """
    in_channels, height, width = info.input_shape
    k = params.kernel_size
    layers: list[nn.Module] = []
    channels = in_channels
    for i in range(params.blocks):
        out = params.channels * 2**i
        # A conv bias right before BatchNorm is cancelled by its mean subtraction.
        layers.append(nn.Conv2d(channels, out, k, padding=k // 2, bias=not params.batch_norm))
        if params.batch_norm:
            layers.append(nn.BatchNorm2d(out))
        layers += [make_activation(params.activation), nn.MaxPool2d(2)]
        channels = out
    # Odd kernels with k//2 padding keep the size; each 2x2 pool floors it by half.
    flat = channels * (height >> params.blocks) * (width >> params.blocks)
    layers += [
        nn.Flatten(),
        nn.Linear(flat, params.hidden),
        make_activation(params.activation),
        nn.Dropout(params.dropout),
        nn.Linear(params.hidden, info.output_dim),
    ]
    return nn.Sequential(*layers)
