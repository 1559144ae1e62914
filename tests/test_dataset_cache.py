"""Standard-format datasets from the bucket (shared/dataset_cache.py): copied once into
each host's data directory, checked by size and MD5, copied again only when changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from server.app import create_app
from shared.artifact_store import S3Store, store_for
from shared.dataset_cache import MANIFEST, DatasetCopyError, sync_dataset
from shared.settings import Settings
from tests.conftest import TestUsers, as_user
from tests.data_files import write_mnist
from tests.helpers import train_spec


def push_mnist(store: Any, tmp_path: Path, seed: int = 0) -> dict[str, Path]:
    files = write_mnist(tmp_path / f"source-{seed}" / "mnist", seed=seed)
    for path in files.values():
        store.put_file(path, f"datasets/mnist/{path.name}")
    return files


def test_a_dataset_is_copied_once_and_again_when_it_changes(
    s3_settings: Settings, tmp_path: Path
) -> None:
    store = store_for(s3_settings)
    data_dir = tmp_path / "host-data"
    assert sync_dataset(store, data_dir, "mnist") == 0  # the bucket has none: nothing
    files = push_mnist(store, tmp_path)
    assert sync_dataset(store, data_dir, "mnist") == 4
    for path in files.values():
        assert (data_dir / "mnist" / path.name).read_bytes() == path.read_bytes()
    assert (data_dir / "mnist" / MANIFEST).is_file()
    assert sync_dataset(store, data_dir, "mnist") == 0  # unchanged: nothing copied
    # A local file damaged or removed is copied again; so is a changed object.
    next(iter((data_dir / "mnist").glob("train-images*"))).write_bytes(b"short")
    assert sync_dataset(store, data_dir, "mnist") == 1
    push_mnist(store, tmp_path, seed=1)
    assert sync_dataset(store, data_dir, "mnist") == 4
    assert sync_dataset(store, data_dir, "digits") == 0  # no files to copy
    # A recent check is not repeated when the caller asks for that (the web).
    assert sync_dataset(store, data_dir, "mnist", recheck_s=60) == 0


class CorruptingStore(S3Store):
    """Fault injection: every download arrives damaged (same size, other bytes)."""

    def get_file(self, key: str, local: Path) -> bool:
        found = super().get_file(key, local)
        data = bytearray(local.read_bytes())
        data[-1] ^= 0xFF
        local.write_bytes(bytes(data))
        return found


def test_a_copy_that_does_not_match_the_objects_md5_is_refused(
    s3_settings: Settings, tmp_path: Path
) -> None:
    good = store_for(s3_settings)
    push_mnist(good, tmp_path)
    bad = CorruptingStore(str(s3_settings.artifacts_url), s3_settings.s3_endpoint_url)
    with pytest.raises(DatasetCopyError, match="MD5"):
        sync_dataset(bad, tmp_path / "data", "mnist")
    assert not any(p.name.endswith("-ubyte") for p in (tmp_path / "data" / "mnist").iterdir())


def test_the_web_validates_a_dataset_only_the_bucket_holds(
    s3_settings: Settings, users: TestUsers, tmp_path: Path
) -> None:
    alice = as_user(create_app(s3_settings, {"TESTING": True}), users.alice)
    spec = train_spec(dataset={"name": "mnist"}, model={"name": "mlp"})
    missing = alice.post("/api/v1/jobs", json=spec)
    assert missing.status_code == 422 and "dataset.name" in missing.get_json()["error"]["fields"]
    push_mnist(store_for(s3_settings), tmp_path)
    # A new web process (the first one checked the bucket a moment ago).
    alice = as_user(create_app(s3_settings, {"TESTING": True}), users.alice)
    from shared import dataset_cache

    dataset_cache._checked.clear()
    made = alice.post("/api/v1/jobs", json=spec)
    assert made.status_code == 201, made.get_json()
    listed = {d["name"]: d for d in alice.get("/api/v1/datasets").get_json()["datasets"]}
    assert listed["mnist"]["available"] and listed["mnist"]["usable"], listed["mnist"]


def test_a_worker_trains_on_a_dataset_and_leaves_its_files_in_the_bucket(
    s3_settings: Settings, users: TestUsers, tmp_path: Path
) -> None:
    """In process (worker/runner.py): the dataset comes from the bucket into the data
    directory, and the succeeded job's checkpoints and log are in the bucket."""
    from shared.db import transaction
    from shared.orm import Job
    from worker.runner import run_job

    store = store_for(s3_settings)
    push_mnist(store, tmp_path)
    alice = as_user(create_app(s3_settings, {"TESTING": True}), users.alice)
    spec = train_spec(dataset={"name": "mnist"}, model={"name": "mlp"}, epochs=1)
    job_id = alice.post("/api/v1/jobs", json=spec).get_json()["id"]
    # The worker is another host: its own data directory, empty until the job needs it.
    worker = Settings.model_validate(
        {**s3_settings.model_dump(), "data_dir": tmp_path / "worker-data"}
    )
    assert run_job(job_id, worker) == "succeeded"
    assert len(list((tmp_path / "worker-data" / "mnist").glob("*-ubyte"))) == 4
    with transaction(s3_settings.resolved_database_url) as s:
        checkpoint = s.get(Job, job_id).checkpoint_path
    assert checkpoint == f"{store.url}/jobs/{job_id}/attempt-1"
    stored = {i["path"] for i in store.list(f"jobs/{job_id}")}
    assert {"attempt-1/last.pt", "attempt-1/best.pt", "job.log"} <= stored
    # Once everything is in the bucket, the worker's disk keeps no copy of the attempt.
    assert not (worker.resolved_artifacts_dir / "jobs" / str(job_id) / "attempt-1").exists()
    log = alice.get(f"/api/v1/jobs/{job_id}/logs?tail=5").get_json()["lines"]
    assert any("succeeded" in line for line in log), log
