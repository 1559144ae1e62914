"""Data-parallel jobs without a worker: the spec's resources, the runner's refusal of a
slot with too few GPUs, a rank that dies, and rank processes that must not outlive rank
0 (docs/architecture.md, "Data-parallel jobs"). tests/faults/test_data_parallel.py runs
them through real workers."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from shared.dataset_catalog import CatalogContext
from shared.settings import Settings
from shared.spec import CPU_QUEUE, MAX_PROCESSES, SpecError, TrainSpec, parse_spec
from tests.helpers import evaluate_spec, train_spec
from worker.runner import run_job
from worker.training import DataPaths, ListSink, distributed
from worker.training.device import job_devices
from worker.training.distributed import train_data_parallel
from worker.training.errors import NotEnoughDevices, RankFailed

REPO = Path(__file__).resolve().parents[1]
CTX = CatalogContext(data_dir=Path("/nonexistent"))
TINY_MODEL = {"name": "mlp", "params": {"hidden": 16, "layers": 1}}


def fields(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(SpecError) as exc:
        parse_spec(data, CTX)
    return exc.value.fields


def rank_processes(label: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        ours = "worker.rank_process" in cmdline and label in cmdline
        if ours and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def wait_until(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


# ---------------------------------------------------------------- the spec


def test_processes_is_a_cpu_data_parallel_resource() -> None:
    spec = parse_spec(train_spec(resources={"processes": 2}), CTX)
    assert isinstance(spec, TrainSpec)
    assert (spec.resources.world_size, spec.queue) == (2, CPU_QUEUE)
    assert parse_spec(train_spec(), CTX).resources.world_size == 1
    assert parse_spec(train_spec(resources={"gpus": 4}), CTX).resources.world_size == 4


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        (train_spec(resources={"processes": 0}), "resources.processes", "greater than or equal to 1"),
        (train_spec(resources={"processes": MAX_PROCESSES + 1}), "resources.processes",
         f"less than or equal to {MAX_PROCESSES}"),
        (train_spec(resources={"processes": "two"}), "resources.processes", "integer"),
        (train_spec(resources={"gpus": 2, "processes": 2}), "resources.processes",
         "one process per GPU"),
        (train_spec(resources={"processes": 4}, batch_size=3), "batch_size",
         "at least the 4 processes"),
        (train_spec(resources={"gpus": 8}, batch_size=4), "batch_size", "resources.gpus"),
        (evaluate_spec(1, resources={"processes": 2}), "resources.processes", "one process"),
        (evaluate_spec(1, resources={"gpus": 2}), "resources.gpus", "one GPU"),
        (train_spec(resources={"gpu_memory_gb": 40}), "resources.gpu_memory_gb",
         "set resources.gpus"),
        (train_spec(resources={"gpus": 1, "gpu_memory_gb": 0}), "resources.gpu_memory_gb",
         "greater than 0"),
    ],
)  # fmt: skip
def test_bad_resources_name_the_field(data: dict[str, Any], field: str, words: str) -> None:
    problems = fields(data)
    assert field in problems, problems
    assert words in problems[field]


def test_the_api_refuses_bad_processes_with_a_422_naming_the_field(client) -> None:  # type: ignore[no-untyped-def]
    resp = client.post("/api/v1/jobs", json=train_spec(resources={"processes": 99}))
    assert resp.status_code == 422, resp.get_json()
    assert "resources.processes" in resp.get_data(as_text=True)
    resp = client.post("/api/v1/jobs", json=train_spec(resources={"processes": 2}))
    assert resp.status_code == 201, resp.get_json()
    assert resp.get_json()["queue"] == "cpu"


# ---------------------------------------------------------------- devices


def test_job_devices() -> None:
    assert job_devices(0, 3) == [torch.device("cpu")] * 3
    assert len(job_devices(0, 1)) == 1
    if torch.cuda.device_count() < 2:
        with pytest.raises(NotEnoughDevices, match=r"needs 2 GPUs of one host \(resources.gpus\)"):
            job_devices(2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without GPUs")
def test_the_runner_refuses_a_slot_with_too_few_gpus(client, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    """A GPU job on a slot without enough GPUs fails with a clear error instead of
    training on fewer (here: on the CPU, which is what happened before)."""
    resp = client.post(
        "/api/v1/jobs", json=train_spec(model=TINY_MODEL, epochs=1, resources={"gpus": 2})
    )
    job_id = resp.get_json()["id"]
    assert run_job(job_id, settings) == "failed"
    error = client.get(f"/api/v1/jobs/{job_id}").get_json()["error"]
    assert error["type"] == "NotEnoughDevices", error
    assert "needs 2 GPUs of one host (resources.gpus)" in error["message"]
    assert "this worker slot has 0" in error["message"]


# ---------------------------------------------------------------- rank processes


def data_paths(settings: Settings) -> DataPaths:
    return DataPaths(
        data_dir=settings.resolved_data_dir,
        uploads_dir=settings.uploads_dir,
        max_file_bytes=settings.max_dataset_file_bytes,
    )


def test_a_rank_that_dies_fails_the_job_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 1 killed mid-training: rank 0's next collective fails at once, and the error
    says which rank ended and how, instead of a bare connection error. The failed run's
    objects are released only after gloo's timeout (distributed._release_in_background):
    a short one here, so this test process never holds them long."""
    monkeypatch.setattr(distributed, "COLLECTIVE_TIMEOUT_S", 20.0)
    settings = Settings(home=tmp_path / "home")
    spec = parse_spec(
        train_spec(model=TINY_MODEL, epochs=50, batch_size=16, resources={"processes": 2}),
        data_paths(settings).catalog_context(),
    )
    assert isinstance(spec, TrainSpec)
    label = f"test-{secrets.token_hex(4)}"
    calls = {"n": 0}

    def should_stop() -> bool:
        calls["n"] += 1
        if calls["n"] == 5:
            for proc in rank_processes(label):
                proc.kill()
        return False

    with pytest.raises(RankFailed, match=r"rank 1 of the job was killed by signal 9 \(SIGKILL\)"):
        train_data_parallel(
            spec, [torch.device("cpu")] * 2, ListSink(), tmp_path / "ckpt", should_stop,
            paths=data_paths(settings), label=label,
        )  # fmt: skip
    assert not rank_processes(label)


ORPHAN_PARENT = """
import sys, torch
from pathlib import Path
from shared.settings import Settings
from shared.spec import parse_spec
from worker.training import DataPaths, ListSink, distributed
from worker.training.distributed import train_data_parallel
settings = Settings(home=Path(sys.argv[2]))
paths = DataPaths(settings.resolved_data_dir, settings.uploads_dir, settings.max_dataset_file_bytes)
spec = parse_spec({"kind": "train", "dataset": {"name": "digits"}, "epochs": 1000,
                   "model": {"name": "mlp", "params": {"hidden": 16, "layers": 1}},
                   "resources": {"processes": 3}}, paths.catalog_context())
train_data_parallel(spec, [torch.device("cpu")] * 3, ListSink(), Path(sys.argv[2]) / "ckpt",
                    paths=paths, label=sys.argv[1])
"""


def test_rank_processes_die_with_rank_zero(tmp_path: Path) -> None:
    """SIGKILL rank 0's process while its ranks are still starting (importing torch,
    about to connect to a store that is gone): without the parent-death signal and the
    stdin watch they would wait there for the whole rendezvous timeout."""
    label = f"test-{secrets.token_hex(4)}"
    parent = subprocess.Popen(
        [sys.executable, "-c", ORPHAN_PARENT, label, str(tmp_path)], cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        ranks = wait_until(lambda: len(rank_processes(label)) == 2 and rank_processes(label), 60,
                           "rank 0 to start ranks 1 and 2")  # fmt: skip
        assert {p.ppid() for p in ranks} == {parent.pid}
    finally:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
    wait_until(lambda: not rank_processes(label), 15, "the orphaned ranks to exit")


def test_the_job_page_summary_says_how_many_processes() -> None:
    from server.web.job_view import spec_summary
    from shared.orm import Job

    job = Job(kind="train", spec=train_spec(resources={"processes": 2}))
    assert ("processes", "2 (CPU data-parallel)") in spec_summary(job)
    assert not any(k == "processes" for k, _ in spec_summary(Job(kind="train", spec=train_spec())))
