"""The models a job can name, as metadata: parameters with ranges, which datasets each
can take, and what each costs (its parameter count and the activations one sample
keeps for the backward pass), computed from the params alone. The PyTorch modules live
in worker/training/models/; tests/test_job_estimate.py builds them to hold the size
formulas here to the real thing. shared/job_estimate.py turns sizes into bytes."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

from pydantic import BaseModel, Field

from shared.dataset_catalog import DatasetInfo
from shared.schema_base import StrictModel

RESNET_DEPTHS = (8, 14, 20, 32, 44, 56, 18, 34)

# Every family's nonlinearity is a param, so a sweep can search it (issue 15). The torch
# modules for these names live in worker/training/models/activations.py.
Activation = Literal["relu", "gelu", "tanh", "sigmoid", "silu", "leaky_relu"]
ACTIVATIONS: tuple[str, ...] = get_args(Activation)
# Those the ResNet applies in place, as it always has ReLU: their backward reads their
# output, so overwriting the input costs autograd nothing. The others keep one more
# tensor per use, which the ResNet's activation count adds.
IN_PLACE_ACTIVATIONS = frozenset({"relu", "leaky_relu"})


def _activation_field(default: str, where: str) -> Any:
    return Field(default, description=f"nonlinearity {where}")


class MLPParams(StrictModel):
    """Fully connected network over the flattened input."""

    hidden: int = Field(128, ge=1, le=8192, description="units in each hidden layer")
    layers: int = Field(2, ge=1, le=16, description="number of hidden layers")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout after each hidden layer")
    activation: Activation = _activation_field("relu", "after each hidden layer")


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
    activation: Activation = _activation_field(
        "relu", "after each conv (and BatchNorm) and after the dense layer"
    )


class ResNetParams(StrictModel):
    """ResNet with basic blocks: CIFAR-style (depth 6n+2: 8..56) or the 18/34 layouts."""

    depth: Literal[8, 14, 20, 32, 44, 56, 18, 34] = Field(
        20, description="8-56: CIFAR-style 3 stages; 18/34: 4 stages"
    )
    width: int = Field(
        16, ge=4, le=256, description="channels of the first stage; doubled at each stage"
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout before the classifier")
    activation: Activation = _activation_field(
        "relu", "after the stem, inside each block and after each residual sum"
    )


class RNNParams(StrictModel):
    """Embedding, a recurrent stack and a linear classifier on the last hidden state."""

    embedding_dim: int = Field(64, ge=2, le=2048)
    hidden: int = Field(128, ge=2, le=4096)
    layers: int = Field(1, ge=1, le=8)
    bidirectional: bool = False
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="between recurrent layers and before the classifier"
    )
    # None is the model as it was before activations were a param: the final hidden
    # state goes to the classifier as it is, so earlier jobs and checkpoints behave the same.
    activation: Activation | None = Field(
        None,
        description="nonlinearity on the final hidden state before the classifier (the "
        "head); none by default. The LSTM/GRU cells keep their own tanh and sigmoid gates",
    )


class TransformerParams(StrictModel):
    """A small pre-norm Transformer encoder with learned positions, pooled to a classifier."""

    d_model: int = Field(64, ge=8, le=2048)
    heads: int = Field(4, ge=1, le=64, description="must divide d_model")
    layers: int = Field(2, ge=1, le=24)
    ff_dim: int = Field(128, ge=8, le=16384)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    pooling: Literal["mean", "cls"] = "mean"
    activation: Activation = _activation_field("relu", "in each layer's feed-forward block")


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


# ---------------------------------------------------------------- sizes
# Each formula follows its builder in worker/training/models/ layer by layer.
# `params` is exact. `activations` counts, per sample, the float32 values of every
# layer's output (the input batch included), the usual upper-side estimate of what
# autograd keeps for the backward pass; int64 indices (max-pool) count as two values.


@dataclass(frozen=True)
class ModelSize:
    params: int
    activations: int  # float32 values per sample
    # The param that drives the size most: what a refusal over a size limit names.
    size_field: str


def _mlp_size(p: MLPParams, info: DatasetInfo) -> ModelSize:
    d, h, out = math.prod(info.input_shape), p.hidden, info.output_dim
    params = (d * h + h) + (p.layers - 1) * (h * h + h) + (h * out + out)
    # Per hidden layer: Linear, activation and (when on) Dropout outputs.
    per_layer = h * (3 if p.dropout > 0 else 2)
    return ModelSize(params, d + p.layers * per_layer + out, "model.params.hidden")


def _cnn_size(p: CNNParams, info: DatasetInfo) -> ModelSize:
    channels, h, w = info.input_shape
    k, params, acts = p.kernel_size, 0, math.prod(info.input_shape)
    for i in range(p.blocks):
        out = p.channels * 2**i
        params += channels * out * k * k + (2 * out if p.batch_norm else out)
        # conv, (BatchNorm), activation at full size; the pool's output and its int64 indices.
        acts += out * h * w * (3 if p.batch_norm else 2) + 3 * out * (h // 2) * (w // 2)
        channels, h, w = out, h // 2, w // 2
    flat = channels * h * w
    params += flat * p.hidden + p.hidden + p.hidden * info.output_dim + info.output_dim
    acts += 3 * p.hidden + info.output_dim  # Linear, activation, Dropout; the logits
    field = "model.params.hidden" if flat * p.hidden * 2 > params else "model.params.channels"
    return ModelSize(params, acts, field)


def resnet_layout(depth: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(blocks per stage, stride of each stage's first block) for a ResNet depth."""
    if depth == 18:
        return (2, 2, 2, 2), (1, 2, 2, 2)
    if depth == 34:
        return (3, 4, 6, 3), (1, 2, 2, 2)
    n = (depth - 2) // 6
    return (n, n, n), (1, 2, 2)


def _resnet_size(p: ResNetParams, info: DatasetInfo) -> ModelSize:
    channels, h, w = info.input_shape
    width = p.width
    # Each use of an activation not applied in place keeps one more output.
    act = 0 if p.activation in IN_PLACE_ACTIVATIONS else 1
    params = channels * width * 9 + 2 * width  # stem conv3x3 + BatchNorm
    # input; stem conv, BN (and activation)
    acts = math.prod(info.input_shape) + (2 + act) * width * h * w
    channels = width
    for i, (blocks, stride) in enumerate(zip(*resnet_layout(p.depth), strict=True)):
        out = width * 2**i
        for b in range(blocks):
            s = stride if b == 0 else 1
            h, w = (h - 1) // s + 1, (w - 1) // s + 1  # 3x3 pad 1 (and 1x1 pad 0) at stride s
            params += channels * out * 9 + out * out * 9 + 4 * out  # two convs, two BNs
            # conv1, bn1, conv2, bn2, the sum (and the two activations)
            acts += (5 + 2 * act) * out * h * w
            if s != 1 or channels != out:
                params += channels * out + 2 * out  # 1x1 projection + BN
                acts += 2 * out * h * w
            channels = out
    params += channels * info.output_dim + info.output_dim
    acts += 2 * channels + info.output_dim  # pooled, dropout, logits
    return ModelSize(params, acts, "model.params.width")


def _rnn_size(p: RNNParams, info: DatasetInfo, gates: int, step_vectors: int) -> ModelSize:
    (seq_len,) = info.input_shape
    vocab, h, dirs = info.vocab_size or 0, p.hidden, 2 if p.bidirectional else 1
    params = vocab * p.embedding_dim
    acts = seq_len * p.embedding_dim
    in_size = p.embedding_dim
    for _ in range(p.layers):
        # W_ih, W_hh, b_ih, b_hh per direction
        params += dirs * (gates * h * in_size + gates * h * h + 2 * gates * h)
        # Per step and direction: the step's input and `step_vectors` vectors of the
        # hidden size (gate pre-activations and activations, cell and hidden state),
        # counted from what torch's autograd keeps for each cell's math.
        acts += dirs * seq_len * (step_vectors * h + in_size)
        in_size = dirs * h
    if p.dropout > 0:
        # torch's dropout between layers: its output and mask of every layer but the top
        acts += (p.layers - 1) * 2 * seq_len * dirs * h
    params += dirs * h * info.output_dim + info.output_dim
    head = 3 if p.activation else 2  # final states, (activation,) dropout
    acts += head * dirs * h + info.output_dim
    return ModelSize(params, acts, "model.params.hidden")


def _lstm_size(p: RNNParams, info: DatasetInfo) -> ModelSize:
    return _rnn_size(p, info, 4, 18)


def _gru_size(p: RNNParams, info: DatasetInfo) -> ModelSize:
    return _rnn_size(p, info, 3, 7)


def _transformer_size(p: TransformerParams, info: DatasetInfo) -> ModelSize:
    (seq_len,) = info.input_shape
    d, ff, vocab = p.d_model, p.ff_dim, info.vocab_size or 0
    cls = 1 if p.pooling == "cls" else 0
    t = seq_len + cls
    per_layer = (
        4 * d  # two LayerNorms
        + 3 * d * d + 3 * d  # attention's packed q/k/v projection
        + d * d + d  # attention's output projection
        + d * ff + ff + ff * d + d  # feed-forward
    )  # fmt: skip
    params = vocab * d + t * d + cls * d + p.layers * per_layer + 2 * d
    params += d * info.output_dim + info.output_dim
    layer_acts = (
        11 * t * d  # norms, q/k/v, attention output and projection, dropouts, residuals
        + 3 * t * ff  # feed-forward hidden, activation, dropout
        + 3 * p.heads * t * t  # scores, softmax, dropout (math attention)
    )
    acts = 2 * t * d + p.layers * layer_acts + t * d + d + info.output_dim
    return ModelSize(params, acts, "model.params.d_model")


SizeFn = Callable[[Any, DatasetInfo], ModelSize]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    params: type[StrictModel]
    inputs: tuple[str, ...]  # dataset kinds it takes
    tasks: tuple[str, ...]
    check: Check = _no_check
    size: SizeFn | None = None

    def model_size(self, params: BaseModel, info: DatasetInfo) -> ModelSize:
        """Parameters and per-sample activations of this model on a resolved dataset."""
        assert self.size is not None, f"{self.name} has no size formula"
        return self.size(params, info)

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
                   ("classification", "regression"), size=_mlp_size),
        ModelEntry("cnn", "Conv-pool blocks, a dense layer and dropout", CNNParams, ("image",),
                   ("classification", "regression"), _check_cnn, _cnn_size),
        ModelEntry("resnet", "Residual network with basic blocks (CIFAR-style or 18/34)", ResNetParams,
                   ("image",), ("classification", "regression"), _check_resnet, _resnet_size),
        ModelEntry("lstm", "LSTM sequence classifier over token embeddings", RNNParams, ("sequence",),
                   ("classification",), size=_lstm_size),
        ModelEntry("gru", "GRU sequence classifier over token embeddings", RNNParams, ("sequence",),
                   ("classification",), size=_gru_size),
        ModelEntry("transformer", "Small Transformer encoder classifier over tokens", TransformerParams,
                   ("sequence",), ("classification",), _check_transformer, _transformer_size),
    )
}  # fmt: skip
