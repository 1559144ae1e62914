"""Tiny trained models for the prune/quantize/export tests (test_compression.py,
test_export.py, test_derive.py): real zoo models, trained for an epoch or two on the
built-in digits and generated sequence data, so a test file pays ~1 s per model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from shared.dataset_catalog import DATASETS, CatalogContext, DatasetInfo, resolve_dataset
from shared.spec import TrainSpec, parse_spec
from worker.training import DataPaths, ListSink, train_job
from worker.training.checkpoint import checkpoint_file

CPU = torch.device("cpu")
PATHS = DataPaths(data_dir=Path("/nonexistent/data"), uploads_dir=Path("/nonexistent/uploads"))
CTX = CatalogContext(data_dir=Path("/nonexistent/data"))

DIGITS = {"name": "digits"}
SEQUENCES = {
    "name": "synthetic_sequences",
    "params": {"num_samples": 400, "seq_len": 12, "vocab_size": 16, "num_classes": 4},
}
MLP = {"name": "mlp", "params": {"hidden": 64, "layers": 1}}
CNN = {"name": "cnn", "params": {"channels": 8, "hidden": 32, "dropout": 0.0}}
LSTM = {"name": "lstm", "params": {"embedding_dim": 8, "hidden": 16}}
GRU = {"name": "gru", "params": {"embedding_dim": 8, "hidden": 16, "bidirectional": True}}


def train_spec(model: dict[str, Any], dataset: dict[str, Any], epochs: int = 2) -> TrainSpec:
    spec = parse_spec(
        {
            "kind": "train",
            "dataset": dataset,
            "model": model,
            "epochs": epochs,
            "batch_size": 32,
            "seed": 0,
            "optimizer": {"name": "adam", "lr": 0.01},
        },
        CTX,
    )
    assert isinstance(spec, TrainSpec)
    return spec


def train_source(
    directory: Path, model: dict[str, Any], dataset: dict[str, Any], epochs: int = 2
) -> Path:
    """Train a tiny model into `directory`; its best.pt."""
    train_job(train_spec(model, dataset, epochs), CPU, ListSink(), directory, paths=PATHS)
    return checkpoint_file(directory, "best")


def dataset_info(dataset: dict[str, Any]) -> DatasetInfo:
    entry = DATASETS[dataset["name"]]
    return resolve_dataset(dataset["name"], entry.params(**dataset.get("params", {})), CTX)
