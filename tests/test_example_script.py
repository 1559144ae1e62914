"""examples/cifar_cnn: the example users copy runs on its own and through the product.

On its own: a real `python train.py` subprocess, as a user runs it before submitting
(the SDK prints, checkpoints go to ./checkpoints), resumes exactly from a checkpoint
and stops cleanly on SIGTERM. Through the product: the folder packed as the CLI packs
it, uploaded through the bundles API, run by a real celery worker, and read back
through the API as the job page reads it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from shared.code_bundle import pack_directory
from shared.db import transaction
from shared.orm import User
from shared.settings import Settings
from tests.conftest import REPO, SQLITE_ONLY, wait_for_state

EXAMPLE = REPO / "examples" / "cifar_cnn"
QUICK = ["--limit", "256", "--batch-size", "64"]


def local_env(**extra: str) -> dict[str, str]:
    """A shell outside Trainyard: no TRAINYARD_* variables, one thread (tests run side
    by side), the repository importable as an installed Trainyard would be."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINYARD_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


def train(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLE / "train.py"), *args],
        cwd=cwd, env=local_env(**env), capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def epoch_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("epoch ")]


def finish_metrics(stdout: str) -> dict:
    line = next(line for line in stdout.splitlines() if line.startswith("[trainyard] finish "))
    return json.loads(line.removeprefix("[trainyard] finish "))


def test_the_example_runs_outside_trainyard_and_prints_its_metrics(tmp_path: Path) -> None:
    done = train(tmp_path, "--epochs", "1", *QUICK)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(
        r"epoch 1/1: train_loss=\d+\.\d{4} val_loss=\d+\.\d{4} val_accuracy=[01]\.\d{4} "
        r"\(\d+ samples/s\)",
        epoch_lines(done.stdout)[0],
    ), done.stdout
    for key in ("train_loss", "val_loss", "val_accuracy", "step_loss"):
        assert f"[trainyard] {key}=" in done.stdout, key
    assert "[trainyard] progress epoch=1 epochs=1 step=" in done.stdout
    metrics = finish_metrics(done.stdout)
    matrix = metrics["confusion_matrix"]
    assert metrics["dataset"] == "synthetic" and metrics["split"] == "test"
    assert len(matrix) == 10 and sum(map(sum, matrix)) == metrics["num_samples"] == 64
    assert [row["class"] for row in metrics["per_class"]] == list(range(10))
    assert metrics["class_names"][0] == "airplane"
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert (tmp_path / "checkpoints" / "last.pt").is_file()

    # A job's params are defaults for the arguments; a misspelt one is refused.
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"epoch": 3}))
    refused = train(tmp_path, *QUICK, TRAINYARD_PARAMS_FILE=str(params))
    assert refused.returncode == 2 and "unknown params: epoch" in refused.stderr


def test_a_resumed_run_continues_at_the_next_epoch_exactly(tmp_path: Path) -> None:
    straight = train(tmp_path, "--epochs", "2", *QUICK)
    first = train(tmp_path, "--epochs", "1", *QUICK, TRAINYARD_CHECKPOINT_DIR="attempt-1")
    # As a later attempt after a lost worker: the earlier attempt's checkpoints to resume from.
    resumed = train(
        tmp_path, "--epochs", "2", *QUICK,
        TRAINYARD_CHECKPOINT_DIR="attempt-2", TRAINYARD_RESUME_DIR="attempt-1",
    )  # fmt: skip
    for done in (straight, first, resumed):
        assert done.returncode == 0, done.stderr
    assert "resuming after epoch 1" in resumed.stdout
    # Only epoch 2 runs again, and it is the uninterrupted run's epoch 2 to the digit
    # (the same weights, optimizer moments, shuffle, flips and dropout).
    strip_rate = lambda line: line.rsplit(" (", 1)[0]  # noqa: E731
    assert [strip_rate(line) for line in epoch_lines(resumed.stdout)] == [
        strip_rate(epoch_lines(straight.stdout)[1])
    ]
    assert (
        finish_metrics(resumed.stdout)["confusion_matrix"]
        == (finish_metrics(straight.stdout)["confusion_matrix"])
    )


def test_sigterm_stops_it_cleanly_with_a_checkpoint(tmp_path: Path) -> None:
    # What the worker sends on cancel, time limit or shutdown: exit 0, checkpoint kept.
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE / "train.py"), "--epochs", "1000", *QUICK],
        cwd=tmp_path, env=local_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("epoch 1/1000:"):
                break
        # The checkpoint follows the epoch line; then ask it to stop mid-run.
        deadline = time.monotonic() + 30
        while not (tmp_path / "checkpoints" / "last.pt").is_file():
            assert time.monotonic() < deadline, "no checkpoint after epoch 1"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "stop requested" in out and "[trainyard] finish" not in out


# -- through the product ----------------------------------------------------------------


@pytest.mark.integration
@SQLITE_ONLY
def test_the_example_through_the_api_and_a_real_worker(
    live_server: str, start_worker, users, settings: Settings, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    with transaction(settings.resolved_database_url) as session:
        session.get(User, users.alice.id).can_run_code = True
    worker = start_worker("cpu")
    http = requests.Session()
    http.headers.update(users.alice.headers)

    def get_json(path: str) -> dict:
        resp = http.get(live_server + path, timeout=10)
        resp.raise_for_status()
        return resp.json()

    # As `trainyard submit --code examples/cifar_cnn` does: pack, upload, submit.
    packed = pack_directory(EXAMPLE, tmp_path / "cifar_cnn.tar.gz", settings.max_bundle_bytes)
    with open(packed.path, "rb") as f:
        resp = http.post(
            f"{live_server}/api/v1/bundles", params={"filename": "cifar_cnn.tar.gz"}, data=f,
            headers={"Content-Type": "application/gzip"}, timeout=30,
        )  # fmt: skip
    assert resp.status_code == 201, resp.text
    bundle = resp.json()
    assert bundle["sha256"] == packed.sha256 and "train.py" in bundle["python_files"]
    spec = {"kind": "script", "bundle_id": bundle["id"], "entry": "train.py",
            "args": ["--epochs", "2", "--limit", "512"]}  # fmt: skip
    resp = http.post(f"{live_server}/api/v1/jobs", json=spec, timeout=10)
    assert resp.status_code == 201, resp.text
    job_id = resp.json()["id"]

    job = wait_for_state(get_json, job_id, {"succeeded", "failed", "cancelled"}, timeout=180)
    # The error first: the whole job object is long enough to hide it.
    assert job["state"] == "succeeded", (job.get("error"), worker.log_tail()[-4000:])
    assert (
        job["progress"]["epoch"] == 2 and job["progress"]["step"] == job["progress"]["steps_total"]
    )

    series = get_json(f"/api/v1/jobs/{job_id}/metrics")["series"]
    for key in ("train_loss", "val_loss", "val_accuracy"):
        assert series[key]["step"] == [1, 2] and series[key]["epoch"] == [1, 2], key
    assert series["step_loss"]["step"][0] == 1

    metrics = job["result"]["metrics"]
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1 and "f1" in metrics
    matrix = metrics["confusion_matrix"]
    assert len(matrix) == 10 and sum(map(sum, matrix)) == metrics["num_samples"] == 128
    assert len(metrics["per_class"]) == 10 and len(metrics["class_names"]) == 10

    lines = get_json(f"/api/v1/jobs/{job_id}/logs?tail=500")["lines"]
    # The script's own prints (the runner adds its epoch summary beside them).
    printed = [
        line for line in lines if re.search(r"\] epoch [12]/2: train_loss=.* samples/s\)$", line)
    ]
    assert len(printed) == 2, "\n".join(lines)
    assert any("test: accuracy=" in line for line in lines), lines

    artifacts = get_json(f"/api/v1/jobs/{job_id}/artifacts")["artifacts"]
    assert any(a["path"].endswith("last.pt") and a["size_bytes"] > 0 for a in artifacts), artifacts
