"""What can be trained: datasets, models and optimizers, as metadata only.

The server validates specs against this registry and serves it from GET /models and
GET /datasets; the worker maps each name to its PyTorch implementation in
worker/training/. Keeping the metadata here (no torch) lets the web process check a
model against a dataset's input shape without importing torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class StrictModel(BaseModel):
    """Unknown fields are errors: a typo in a spec must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- datasets


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    description: str
    task: str  # "classification" (regression arrives with issue 3)
    input_shape: tuple[int, ...]  # per sample, channels first for images
    num_classes: int
    num_samples: int
    # Fraction held out as the fixed test split (seeded independently of any job).
    test_fraction: float
    source: str

    @property
    def test_size(self) -> int:
        # Mirrors sklearn's train_test_split rounding: ceil for the test side.
        return math.ceil(self.num_samples * self.test_fraction)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "task": self.task,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "num_samples": self.num_samples,
            "splits": {"test": self.test_size, "train+val": self.num_samples - self.test_size},
            "source": self.source,
            "available": True,
        }


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(
        name="digits",
        description="scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes)",
        task="classification",
        input_shape=(1, 8, 8),
        num_classes=10,
        num_samples=1797,
        test_fraction=0.2,
        source="bundled with scikit-learn",
    ),
}


# ---------------------------------------------------------------- models


class MLPParams(StrictModel):
    """Fully connected classifier over the flattened input."""

    hidden: int = Field(128, ge=1, le=8192, description="units in each hidden layer")
    layers: int = Field(2, ge=1, le=16, description="number of hidden layers")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout after each hidden layer")


class CNNParams(StrictModel):
    """Classic conv-pool-conv-pool-dense-dropout classifier (pytorch/examples mnist)."""

    channels: int = Field(
        32, ge=1, le=512, description="filters in the first conv; the second has twice as many"
    )
    hidden: int = Field(128, ge=1, le=8192, description="units in the dense layer")
    dropout: float = Field(0.5, ge=0.0, lt=1.0, description="dropout before the output layer")
    kernel_size: int = Field(
        3, ge=1, le=7, description="conv kernel size (odd: padding keeps the size)"
    )


def _check_cnn(params: BaseModel, ds: DatasetInfo) -> dict[str, str]:
    errors: dict[str, str] = {}
    if len(ds.input_shape) != 3:
        errors["model.name"] = (
            f"cnn needs image data (C, H, W); dataset {ds.name!r} has shape {list(ds.input_shape)}"
        )
        return errors
    _, h, w = ds.input_shape
    if min(h, w) < 4:
        errors["model.name"] = (
            f"cnn pools twice and needs images at least 4x4; {ds.name!r} is {h}x{w}"
        )
    if params.kernel_size % 2 == 0:  # type: ignore[attr-defined]
        errors["model.params.kernel_size"] = "must be odd so that padding keeps the image size"
    elif params.kernel_size > min(h, w):  # type: ignore[attr-defined]
        errors["model.params.kernel_size"] = f"must not exceed the image size ({h}x{w})"
    return errors


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str
    params: type[StrictModel]
    # Returns {field: message} for a params/dataset combination that cannot work.
    check: Callable[[BaseModel, DatasetInfo], dict[str, str]] = field(default=lambda p, d: {})

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "params_schema": self.params.model_json_schema(),
            "tasks": ["classification"],
        }


MODELS: dict[str, ModelInfo] = {
    "mlp": ModelInfo("mlp", "Multi-layer perceptron on the flattened input", MLPParams),
    "cnn": ModelInfo(
        "cnn", "Two conv-pool blocks, a dense layer and dropout", CNNParams, _check_cnn
    ),
}

OPTIMIZERS = ("adam", "sgd")
LOSSES = ("cross_entropy",)


def registry_json() -> dict[str, Any]:
    return {
        "models": [m.to_json() for m in MODELS.values()],
        "datasets": [d.to_json() for d in DATASETS.values()],
        "optimizers": list(OPTIMIZERS),
        "losses": list(LOSSES),
    }
