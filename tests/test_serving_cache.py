"""worker/serving/cache.py on its own: versions loaded once and kept within the byte
budget (least recently used out first, the one just loaded always in), and files whose
bytes are not the registered ones (changed, missing) refused. Exports are loaded in
tests/test_serving.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from shared.artifact_store import LocalStore
from shared.spec import spec_to_json
from tests.derive_helpers import dataset_info, train_spec
from worker.serving.cache import ModelCache, VersionRef
from worker.serving.errors import ServeError
from worker.serving.stats import ServeStats
from worker.training.data.preprocess import compute_stats
from worker.training.model_file import save_model_file
from worker.training.models import build_model

IRIS = {"name": "iris"}
MLP = {"name": "mlp", "params": {"hidden": 32, "layers": 1}}


def model_file(store: LocalStore, key: str, seed: int) -> VersionRef:
    """An (untrained) iris MLP saved as a model file under `key`, and its ref."""
    torch.manual_seed(seed)
    spec, info = train_spec(MLP, IRIS), dataset_info(IRIS)
    model = build_model(spec.model, info)
    stats = compute_stats(torch.randn(20, 4), "tabular", "standardize", None)
    path = store.path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model_file(path, model, spec_json=spec_to_json(spec), dataset_info=info, stats=stats,
                    quantized=None, extra={})  # fmt: skip
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    return VersionRef(
        seed, "iris", seed, "prune", "best.pt", (("best.pt", key, digest, len(data)),)
    )


def cache(store: LocalStore, budget: int) -> ModelCache:
    return ModelCache(store, ServeStats(), budget_bytes=budget, max_batch=8, max_wait_s=0.0,
                      queue_limit=8, batching=True)  # fmt: skip


def test_lru_within_the_byte_budget(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    refs = [model_file(store, f"jobs/{i}/attempt-1/best.pt", i) for i in (1, 2, 3)]
    one = cache(store, 10**9).get(refs[0]).nbytes
    models = cache(store, int(2.5 * one))
    first = models.get(refs[0])
    assert models.get(refs[0]) is first  # loaded once
    models.get(refs[1])
    models.get(refs[0])  # now the most recently used
    models.get(refs[2])  # over budget: refs[1] leaves, not refs[0]
    assert [s.ref.version for s in models.loaded()] == [1, 3]
    assert models.evictions == 1 and models.total_bytes() <= 2.5 * one
    out = first.batcher.submit(torch.zeros(2, 4))
    assert out.shape == (2, 3)
    # Alone over the budget, the version just loaded still stays.
    tiny = cache(store, 1)
    tiny.get(refs[0])
    tiny.get(refs[1])
    assert [s.ref.version for s in tiny.loaded()] == [2]


def test_files_that_are_not_the_registered_bytes_are_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    ref = model_file(store, "jobs/1/attempt-1/best.pt", 1)
    with open(store.path(ref.files[0][1]), "ab") as f:
        f.write(b"x")
    with pytest.raises(ServeError) as caught:
        cache(store, 10**9).get(ref)
    assert caught.value.status == 500 and caught.value.code == "model_files_changed"
    assert "registered" in caught.value.fields["best.pt"]
    store.path(ref.files[0][1]).unlink()
    with pytest.raises(ServeError) as caught:
        cache(store, 10**9).get(ref)
    assert caught.value.fields == {"best.pt": "missing"}
