"""The models a job can name, as metadata: parameters with ranges, and which datasets
each can take. The PyTorch modules live in worker/training/models/."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field

from shared.dataset_catalog import DatasetInfo
from shared.schema_base import StrictModel

RESNET_DEPTHS = (8, 14, 20, 32, 44, 56, 18, 34)


class MLPParams(StrictModel):
    """Fully connected network over the flattened input."""

    hidden: int = Field(128, ge=1, le=8192, description="units in each hidden layer")
    layers: int = Field(2, ge=1, le=16, description="number of hidden layers")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout after each hidden layer")
    activation: Literal["relu", "gelu", "tanh"] = "relu"


class CNNParams(StrictModel):
    """Classic conv-pool blocks, a dense layer and dropout (pytorch/examples mnist)."""

    channels: int = Field(
        32, ge=1, le=512, description="filters in the first block; doubled in each next block"
    )
    blocks: int = Field(
        2, ge=1, le=5, description="conv-relu-maxpool blocks; each halves height and width"
    )
    hidden: int = Field(128, ge=1, le=8192, description="units in the dense layer")
    dropout: float = Field(0.5, ge=0.0, lt=1.0, description="dropout before the output layer")
    kernel_size: int = Field(
        3, ge=1, le=7, description="odd conv kernel size (padding keeps the size)"
    )
    batch_norm: bool = Field(False, description="BatchNorm after each conv")


class ResNetParams(StrictModel):
    """ResNet with basic blocks: CIFAR-style (depth 6n+2: 8..56) or the 18/34 layouts."""

    depth: Literal[8, 14, 20, 32, 44, 56, 18, 34] = Field(
        20, description="8-56: CIFAR-style 3 stages; 18/34: 4 stages"
    )
    width: int = Field(
        16, ge=4, le=256, description="channels of the first stage; doubled at each stage"
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout before the classifier")


class RNNParams(StrictModel):
    """Embedding, a recurrent stack and a linear classifier on the last hidden state."""

    embedding_dim: int = Field(64, ge=2, le=2048)
    hidden: int = Field(128, ge=2, le=4096)
    layers: int = Field(1, ge=1, le=8)
    bidirectional: bool = False
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="between recurrent layers and before the classifier"
    )


class TransformerParams(StrictModel):
    """A small pre-norm Transformer encoder with learned positions, pooled to a classifier."""

    d_model: int = Field(64, ge=8, le=2048)
    heads: int = Field(4, ge=1, le=64, description="must divide d_model")
    layers: int = Field(2, ge=1, le=24)
    ff_dim: int = Field(128, ge=8, le=16384)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    pooling: Literal["mean", "cls"] = "mean"


Check = Callable[[Any, DatasetInfo], dict[str, str]]


def _no_check(_params: Any, _info: DatasetInfo) -> dict[str, str]:
    return {}


def _check_cnn(p: CNNParams, info: DatasetInfo) -> dict[str, str]:
    _, h, w = info.input_shape
    errors: dict[str, str] = {}
    if min(h, w) < 2**p.blocks:
        errors["model.params.blocks"] = (
            f"{p.blocks} blocks halve the image {p.blocks} times; {h}x{w} is too small"
        )
    if p.kernel_size % 2 == 0:
        errors["model.params.kernel_size"] = "must be odd so that padding keeps the image size"
    elif p.kernel_size > min(h, w):
        errors["model.params.kernel_size"] = f"must not exceed the image size ({h}x{w})"
    return errors


def _check_resnet(p: ResNetParams, info: DatasetInfo) -> dict[str, str]:
    _, h, w = info.input_shape
    need = 8 if p.depth in (18, 34) else 4
    if min(h, w) < need:
        return {
            "model.params.depth": f"depth {p.depth} downsamples to 1/{need}; {h}x{w} images are too small"
        }
    return {}


def _check_transformer(p: TransformerParams, _info: DatasetInfo) -> dict[str, str]:
    if p.d_model % p.heads:
        return {"model.params.heads": f"must divide d_model ({p.d_model})"}
    return {}


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    params: type[StrictModel]
    inputs: tuple[str, ...]  # dataset kinds it takes
    tasks: tuple[str, ...]
    check: Check = _no_check

    def problems(self, params: BaseModel, info: DatasetInfo) -> dict[str, str]:
        """{field: message} for a model/dataset combination that cannot work."""
        if info.kind not in self.inputs:
            return {
                "model.name": f"{self.name} takes {' or '.join(self.inputs)} data; {info.name!r} is {info.kind} data"
            }
        if info.task not in self.tasks:
            return {"model.name": f"{self.name} does not do {info.task}"}
        return self.check(params, info)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "inputs": list(self.inputs),
            "tasks": list(self.tasks),
            "params_schema": self.params.model_json_schema(),
        }


MODELS: dict[str, ModelEntry] = {
    e.name: e
    for e in (
        ModelEntry("mlp", "Multi-layer perceptron on the flattened input", MLPParams, ("image", "tabular"),
                   ("classification", "regression")),
        ModelEntry("cnn", "Conv-pool blocks, a dense layer and dropout", CNNParams, ("image",),
                   ("classification", "regression"), _check_cnn),
        ModelEntry("resnet", "Residual network with basic blocks (CIFAR-style or 18/34)", ResNetParams,
                   ("image",), ("classification", "regression"), _check_resnet),
        ModelEntry("lstm", "LSTM sequence classifier over token embeddings", RNNParams, ("sequence",),
                   ("classification",)),
        ModelEntry("gru", "GRU sequence classifier over token embeddings", RNNParams, ("sequence",),
                   ("classification",)),
        ModelEntry("transformer", "Small Transformer encoder classifier over tokens", TransformerParams,
                   ("sequence",), ("classification",), _check_transformer),
    )
}  # fmt: skip
