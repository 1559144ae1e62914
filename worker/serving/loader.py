"""A registered version's files, downloaded and hash-checked, -> a model on the CPU.

Every kind but export pins one model file that `load_model_file` reads (a train or
prune job's best.pt, a quantize job's model.pt). An export pins `state_dict.pt` (plain
weights, no spec) with `model_card.json` beside it, which names the training spec, the
dataset, the input's shape and the normalization; `load_export` rebuilds the module
from the card and loads the weights into it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from shared.dataset_catalog import DATASETS, DatasetInfo
from shared.spec import SpecError, TrainSpec, load_stored_spec
from worker.training.errors import UserError
from worker.training.export import CARD_FILE
from worker.training.model_file import LoadedModel, load_model_file
from worker.training.models import build_model

CHUNK = 1 << 20


def sha256_of(path: Path) -> tuple[str, int]:
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


def check_files(directory: Path, pinned: list[dict[str, Any]]) -> dict[str, str]:
    """Each pinned file whose downloaded bytes are not what was registered: name ->
    problem. The bytes checked are the ones then loaded: nothing can change between."""
    problems = {}
    for item in pinned:
        path = directory / item["name"]
        if not path.is_file():
            problems[item["name"]] = "missing"
            continue
        sha, size = sha256_of(path)
        if (sha, size) != (item["sha256"], item["size_bytes"]):
            problems[item["name"]] = f"sha256 {sha}, registered {item['sha256']}"
    return problems


def load_export(directory: Path, state_file: str = "state_dict.pt") -> LoadedModel:
    """An export job's state_dict.pt, rebuilt from the model_card.json beside it."""
    card_path = directory / CARD_FILE
    try:
        card = json.loads(card_path.read_text())
        spec = load_stored_spec(card["spec"])
        dataset = card["dataset"]
        shape = tuple(int(n) for n in card["input"]["shape"][1:])
    except (OSError, ValueError, KeyError, TypeError, SpecError) as exc:
        raise UserError(f"{card_path} is not a readable model card: {exc}") from None
    if not isinstance(spec, TrainSpec):
        raise UserError(f"{card_path} records a {spec.kind} spec, not the training of a model")
    entry = DATASETS.get(dataset)
    if entry is None:
        raise UserError(f"{card_path}: unknown dataset {dataset!r}")
    info = DatasetInfo(
        name=dataset,
        kind=entry.kind,
        task=card["task"],
        input_shape=shape,
        num_classes=int(card.get("num_classes") or 0),
        train_size=None,
        test_size=None,
        vocab_size=card.get("vocab_size"),
    )
    stats: dict[str, torch.Tensor] = {}
    norm = card.get("normalization")
    if norm:
        stats = {
            "method": torch.tensor(norm["method"], dtype=torch.int64),
            "shift": torch.tensor(norm["shift"], dtype=torch.float32),
            "scale": torch.tensor(norm["scale"], dtype=torch.float32),
        }
    model = build_model(spec.model, info)
    try:
        state = torch.load(directory / state_file, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        raise UserError(f"{state_file} does not fit the model its card describes: {exc}") from exc
    model.eval()
    return LoadedModel(model=model, train_spec=spec, info=info, stats=stats, derived=True)


def load_version_files(directory: Path, job_kind: str, model_file: str) -> LoadedModel:
    """The model of a version whose pinned files are in `directory`."""
    if job_kind == "export":
        return load_export(directory, model_file)
    return load_model_file(directory / model_file, "the registered model file")
