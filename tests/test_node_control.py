"""Cordon, drain and the crash guard with real `celery worker` processes (README "Draining
and cordoning workers"; shared/worker_nodes.py, worker/node_control.py).

Each test drives a named worker node through the interfaces an operator uses: the CLI
(`trainyard worker cordon|drain|clear NODE`, in a subprocess, on the database) and the
admin API; jobs are submitted through the API like any user's.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil
import pytest
from sqlalchemy import select

from shared.db import transaction
from shared.orm import Job, WorkerNode, WorkerSlotGuard
from shared.settings import Settings
from shared.worker_nodes import record_quick_death, refusal, set_control, stops_consuming
from tests.conftest import REPO, WorkerProcess, as_user, settings_env
from tests.helpers import job_events, train_spec

TINY_MLP = {"name": "mlp", "params": {"hidden": 32, "layers": 1}}
# About 0.15 s an epoch on one thread (tests/faults/conftest.py LONG_MODEL), a checkpoint
# every epoch: long enough to be drained mid-training.
LONG_MODEL = {"name": "cnn", "params": {"dropout": 0.25}}
ENDED = {"succeeded", "failed", "cancelled"}


def small_spec() -> dict[str, Any]:
    return train_spec(model=TINY_MLP, epochs=2)


def long_spec(epochs: int) -> dict[str, Any]:
    return train_spec(model=LONG_MODEL, epochs=epochs, batch_size=16)


def node_name(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}@{socket.gethostname()}"


def until(condition: Callable[[], Any], what: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def pool_pids(worker: WorkerProcess) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(worker.proc.pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def job_pid(job: Job) -> int:
    assert job.worker, job
    return int(job.worker.rsplit(":", 1)[1])


class Harness:
    def __init__(self, app, users, settings: Settings) -> None:  # type: ignore[no-untyped-def]
        self.settings = settings
        self.url = settings.resolved_database_url
        self.member = as_user(app, users.alice)
        self.admin = as_user(app, users.admin)

    def submit(self, spec: dict[str, Any]) -> int:
        resp = self.member.post("/api/v1/jobs", json=spec)
        assert resp.status_code == 201, resp.get_json()
        return int(resp.get_json()["id"])

    def job(self, job_id: int) -> Job:
        with transaction(self.url) as s:
            job = s.get(Job, job_id)
            assert job is not None
            s.expunge(job)
            return job

    def wait(self, job_id: int, states: set[str], timeout: float = 120) -> Job:
        return until(
            lambda: (job := self.job(job_id)).state in states and job,
            f"job {job_id} in {states} (now {self.job(job_id).state})",
            timeout,
        )

    def events(self, job_id: int) -> list[tuple[str, str | None]]:
        return job_events(self.url, job_id)

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "server.cli", *args],
            cwd=REPO, env=settings_env(self.settings), capture_output=True, text=True,
            timeout=120, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stdout

    def node(self, node: str) -> dict[str, Any] | None:
        nodes = self.admin.get("/api/v1/workers").get_json()["nodes"]
        return next((n for n in nodes if n["node"] == node), None)


# The real-process scenarios run once each, on one database or the other (the rules
# under them, shared/worker_nodes.py, are tested on both above): each scenario costs
# 10-20 s of real workers, and the suite has a 15-minute budget on 2 cores.
ON_SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
ON_POSTGRESQL = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


@pytest.fixture
def harness(app, users, settings: Settings) -> Harness:  # type: ignore[no-untyped-def]
    return Harness(app, users, settings)


# ---------------------------------------------------------------- the rules, without workers


def test_cordon_drain_uncordon_and_the_crash_guard_rules(db_url: str) -> None:
    node = "gpu-01@host-a"
    with transaction(db_url) as s:
        assert refusal(s, node, 0) is None and stops_consuming(s, node, 2) is None
        set_control(s, node, "cordon", "root")
    with transaction(db_url) as s:
        assert refusal(s, node, 0) == f"node {node} is cordoned by root"
        assert stops_consuming(s, node, 2) == "cordoned"
        # A drain is not undone by a later cordon; drain --now stays until uncordon.
        set_control(s, node, "drain_now", "root")
        control = set_control(s, node, "cordon", "root")
        assert (control.cordoned, control.draining, control.drain_now) == (True, True, True)
        assert control.state(running_jobs=1) == "draining"
        assert control.state(running_jobs=0) == "drained"
        control = set_control(s, node, "uncordon", "root")
        assert (control.cordoned, control.draining, control.drain_now) == (False, False, False)
        assert control.state(0) == "active"
    with transaction(db_url) as s:
        assert record_quick_death(s, node, 1, "CUDA error: no device", 3, 10) is None
        assert record_quick_death(s, node, 1, "CUDA error: no device", 3, 10) is None
        stopped = record_quick_death(s, node, 1, "CUDA error:\n  no device", 3, 10)
        assert stopped == "3 jobs died within 10 s in a row: CUDA error: no device"
    with transaction(db_url) as s:
        assert refusal(s, node, 1) == f"slot 1 stopped: {stopped}"
        assert refusal(s, node, 0) is None  # the guard is per slot
        assert stops_consuming(s, node, 2) is None  # one slot of two still works
        for _ in range(3):
            record_quick_death(s, node, 0, "OSError: disk full", 3, 10)
        assert stops_consuming(s, node, 2) == "every slot stopped by the crash guard"
    with pytest.raises(ValueError, match="node name"), transaction(db_url) as s:
        set_control(s, "two words", "cordon", "root")


def test_the_node_commands_name_the_field_of_a_bad_node_and_keep_trainyard_worker(
    db_url: str,
) -> None:
    from click.testing import CliRunner

    from server.cli import main

    env = {"TRAINYARD_DATABASE_URL": db_url}
    result = CliRunner().invoke(main, ["worker", "cordon", "two words"], env=env)
    assert result.exit_code == 1 and "error: node: a worker node name like" in result.output
    result = CliRunner().invoke(main, ["worker", "drain", "gpu-01@h", "--now"], env=env)
    assert result.exit_code == 0, result.output
    assert "Node gpu-01@h drained now" in result.output
    with transaction(db_url) as s:
        row = s.get(WorkerNode, "gpu-01@h")
        assert row is not None and (row.cordoned, row.draining, row.drain_now) == (True,) * 3
    # `trainyard worker` is still the command that starts one (tests/test_cli.py runs it).
    help_text = CliRunner().invoke(main, ["worker", "--help"]).output
    assert "--gpus" in help_text and "drain" in help_text and "uncordon" in help_text


def test_what_counts_as_a_death_for_the_crash_guard() -> None:
    from worker.node_control import verdict

    trace = "Traceback (most recent call last): ..."
    # An infrastructure failure (retried or, on the last attempt, failed) counts.
    assert verdict("requeued", True, "InfrastructureError", "") is True
    assert verdict("failed", True, "InfrastructureError", "") is True
    # An exception that is not the job's own (a driver's error) counts.
    assert verdict("failed", False, "RuntimeError", trace) is True
    # The job's own: a UserError (no traceback), out of memory, its time limit.
    assert verdict("failed", False, "DatasetError", "") is None
    assert verdict("failed", False, "CudaOutOfMemory", trace) is None
    assert verdict("failed", False, "OutOfMemory", trace) is None
    assert verdict("failed", False, "TimeLimitExceeded", "") is None
    # Neither: a cancel, a hand-back; a success ends the streak.
    assert verdict("cancelled", False, None, "") is None
    assert verdict("requeued", False, None, "") is None
    assert verdict("succeeded", False, None, "") is False


# ---------------------------------------------------------------- real workers


@ON_POSTGRESQL
def test_a_cordoned_node_takes_no_job_even_after_a_restart_until_uncordoned(
    harness: Harness, start_worker
) -> None:  # type: ignore[no-untyped-def]
    """Cordoned before it starts (the state lives in the database): the worker never
    runs the job, not after a restart either; uncordoned, it runs it."""
    node = node_name("cordoned")
    assert "cordoned" in harness.cli("worker", "cordon", node)
    worker = start_worker(name=node)
    job_id = harness.submit(small_spec())
    until(lambda: "stopped consuming" in worker.log_tail(100_000), "the node to stop consuming")
    time.sleep(3)  # a message it fetched before it stopped went back, and stays there
    assert harness.job(job_id).state == "queued"
    shown = harness.node(node)
    assert shown is not None and shown["control"]["state"] == "cordoned", shown
    assert shown["control"]["changed_by"].endswith("(cli)")

    worker.stop()
    # While it is down the API still lists it, cordoned.
    offline = harness.admin.get("/api/v1/workers").get_json()["offline_nodes"]
    assert [(n["node"], n["control"]["state"]) for n in offline] == [(node, "cordoned")]
    worker = start_worker(name=node)  # the same node, restarted
    until(lambda: "stopped consuming" in worker.log_tail(100_000), "the restarted node to stop")
    time.sleep(3)
    assert harness.job(job_id).state == "queued"
    assert harness.job(job_id).attempt == 0  # never claimed

    resp = harness.admin.post(f"/api/v1/workers/{node}/uncordon")
    assert resp.status_code == 200 and resp.get_json()["control"]["state"] == "active"
    job = harness.wait(job_id, ENDED)
    assert job.state == "succeeded" and job_pid(job) in pool_pids(worker)


@ON_SQLITE
def test_a_drained_node_finishes_its_job_and_another_node_takes_the_next(
    harness: Harness, start_worker
) -> None:  # type: ignore[no-untyped-def]
    node = node_name("drained")
    first = start_worker(name=node)
    running = harness.submit(long_spec(epochs=40))
    harness.wait(running, {"running"})
    resp = harness.admin.post(f"/api/v1/workers/{node}/drain")
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["control"]["state"] == "draining"
    waiting = harness.submit(small_spec())

    job = harness.wait(running, ENDED, timeout=180)
    assert (job.state, job.attempt) == ("succeeded", 1)  # ran to its end, where it was
    assert harness.job(waiting).state == "queued"
    until(
        lambda: (harness.node(node) or {}).get("control", {}).get("state") == "drained", "drained"
    )

    second = start_worker()
    job = harness.wait(waiting, ENDED)
    assert job.state == "succeeded" and job_pid(job) in pool_pids(second)
    assert job_pid(job) not in pool_pids(first)


@ON_POSTGRESQL
def test_drain_now_hands_the_running_job_back_and_it_resumes_on_another_node(
    harness: Harness, start_worker
) -> None:  # type: ignore[no-untyped-def]
    node = node_name("drain-now")
    start_worker(name=node)
    job_id = harness.submit(long_spec(epochs=60))
    until(
        lambda: (harness.job(job_id).progress or {}).get("epoch", 0) >= 2,
        "two epochs (and their checkpoint) on the first node",
    )
    other = start_worker()
    assert "drained now" in harness.cli("worker", "drain", node, "--now")

    job = harness.wait(job_id, ENDED, timeout=240)
    assert (job.state, job.attempt) == ("succeeded", 2), (job.state, job.error_message)
    assert job_pid(job) in pool_pids(other)
    events = harness.events(job_id)
    handed_back = [m for e, m in events if e == "handed_back"]
    assert handed_back and "worker node drained" in (handed_back[0] or ""), events
    # The second attempt resumed from the first one's checkpoint.
    assert ("resumed", "attempt-1/last.pt") in events, events


@ON_SQLITE
def test_the_crash_guard_stops_a_slot_whose_jobs_die_at_once_until_cleared(
    harness: Harness, start_worker
) -> None:  # type: ignore[no-untyped-def]
    """Three jobs in a row whose process is killed within seconds of the claim (what
    the OOM killer or a crashing driver does): the slot stops taking jobs and the
    workers page says why; `trainyard worker clear` lets it take them again."""
    node = node_name("guarded")
    worker = start_worker(name=node)
    for n in range(3):
        job_id = harness.submit(long_spec(epochs=60))
        job = harness.wait(job_id, {"running"})
        os.kill(job_pid(job), signal.SIGKILL)
        job = harness.wait(job_id, ENDED)
        assert job.state == "failed", (n, job.state, job.error_message)

    def stopped_slot() -> dict[str, Any] | None:
        shown = harness.node(node)
        slots = [s for s in (shown or {}).get("workers", []) if s["stopped"]]
        return slots[0] if slots else None

    slot = until(stopped_slot, "the slot to be stopped", timeout=60)
    assert slot["stopped"].startswith("stopped: 3 jobs died within 10 s in a row: "), slot
    assert "SIGKILL" in slot["stopped"] or "signal 9" in slot["stopped"], slot
    assert harness.node(node)["stopped_slots"] == 1  # type: ignore[index]

    waiting = harness.submit(small_spec())
    until(lambda: "stopped consuming" in worker.log_tail(100_000), "the node to stop consuming")
    time.sleep(3)
    assert harness.job(waiting).state == "queued"  # not burnt through

    assert "1 stopped slot(s)" in harness.cli("worker", "clear", node)
    job = harness.wait(waiting, ENDED)
    assert job.state == "succeeded" and job_pid(job) in pool_pids(worker)
    with transaction(harness.url) as s:
        assert (
            s.execute(select(WorkerSlotGuard).where(WorkerSlotGuard.node == node)).first() is None
        )
        assert s.get(WorkerNode, node) is None  # the guard never cordons the node


@ON_POSTGRESQL
def test_a_slot_with_a_broken_artifacts_mount_stops_after_three_jobs_and_a_restart_keeps_it(
    harness: Harness, settings: Settings, start_worker, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """A real broken setup: the worker's artifacts directory is a file (a mount that did
    not happen), so every job fails within a second on its checkpoint directory. Three
    fail, the rest of the queue waits; restarting the fixed worker under the same name
    keeps the slot stopped until an admin clears it, then the waiting jobs run."""
    node = node_name("broken")
    mount = tmp_path / "artifacts-mount"
    mount.write_text("not a directory\n")
    broken = settings.model_copy(update={"artifacts_dir": mount})
    worker = WorkerProcess(broken, tmp_path / "broken-worker.log", "cpu", 1, node)
    try:
        worker.wait_ready()
        ids = [harness.submit(small_spec()) for _ in range(5)]
        until(lambda: sum(harness.job(i).state == "failed" for i in ids) >= 3, "3 failures")
        node_shown = until(lambda: (n := harness.node(node)) and n["stopped_slots"] and n, "stop")
        [reason] = {s["stopped"] for s in node_shown["workers"] if s["stopped"]}
        assert reason.startswith("stopped: 3 jobs died within 10 s in a row: "), reason
        assert "NotADirectoryError" in reason or "FileExistsError" in reason, reason
        assert str(mount) not in reason  # as members see errors: no server paths
        time.sleep(3)
        states = sorted(harness.job(i).state for i in ids)
        assert states == ["failed", "failed", "failed", "queued", "queued"], states
    finally:
        worker.stop()

    fixed = start_worker(name=node)  # the mount fixed, the same node restarted
    time.sleep(4)
    assert sorted(harness.job(i).state for i in ids).count("queued") == 2
    resp = harness.admin.post(f"/api/v1/workers/{node}/clear")
    assert resp.status_code == 200 and resp.get_json()["stopped_slots"] == 0
    for job_id in ids:
        job = harness.wait(job_id, ENDED)
        assert job.state in ("failed", "succeeded")
    ran = [harness.job(i) for i in ids if harness.job(i).state == "succeeded"]
    assert len(ran) == 2 and all(job_pid(j) in pool_pids(fixed) for j in ran)
