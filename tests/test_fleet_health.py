"""A worker that stopped consuming, and one that stopped cleanly (shared/fleet_health.py,
shared/worker_registry.py; README "Draining and cordoning workers"). A lost worker
(SIGKILL) and what became of its job: tests/faults/test_lost_worker.py.

The stuck consumer is made the way the failure looks: a real `celery worker` whose main
process no longer takes messages from its queue (Celery's cancel_consumer control
command) while its pool child is alive and beating.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from shared.celery_app import make_celery
from shared.db import transaction, utcnow
from shared.fleet_health import IdleSlot, QueuedJob, last_jobs, not_consuming
from shared.orm import Job, JobEvent
from shared.settings import Settings
from shared.worker_registry import (
    Activity,
    SlotInfo,
    departed_nodes,
    mark_stopped,
    online_slots,
    register,
    slot_key,
)
from tests.conftest import WorkerProcess
from tests.job_rows import add_jobs
from tests.test_authorization import session_client
from tests.test_node_control import (
    ON_POSTGRESQL,
    ON_SQLITE,
    Harness,
    long_spec,
    node_name,
    small_spec,
    until,
)

AFTER_S = 4.0


# ---------------------------------------------------------------- the rule, without workers


def _slot(**kw: Any) -> IdleSlot:
    values: dict[str, Any] = dict(
        queues=("gpu",), gpu_memory=(80e9,), busy=False, stopped=False, idle_s=300.0,
        quiet_s=300.0,
    )  # fmt: skip
    values.update(kw)
    return IdleSlot(**values)


def test_the_stuck_consumer_rule() -> None:
    job = QueuedJob(id=1, queue="gpu", waited_s=250.0, gpus=1, gpu_memory_gb=None)
    msgs = {"gpu": 1}
    reason = not_consuming([_slot()], False, msgs, [job], 120)
    assert reason == (
        "not consuming: 1 job it could take has waited 4 min, its idle slots got no "
        "message for 5 min"
    )
    # Not while cordoned, a slot got a message lately, no slot is idle long enough, the
    # idle slot is stopped by the crash guard, the queue holds no message, the job is
    # young, or it needs more than the idle slot has.
    assert not_consuming([_slot()], True, msgs, [job], 120) is None
    assert not_consuming([_slot(), _slot(busy=True, quiet_s=30)], False, msgs, [job], 120) is None
    assert not_consuming([_slot(idle_s=60)], False, msgs, [job], 120) is None
    assert not_consuming([_slot(stopped=True)], False, msgs, [job], 120) is None
    assert not_consuming([_slot()], False, {"gpu": 0}, [job], 120) is None
    young = QueuedJob(id=1, queue="gpu", waited_s=30.0, gpus=1, gpu_memory_gb=None)
    assert not_consuming([_slot()], False, msgs, [young], 120) is None
    big = QueuedJob(id=2, queue="gpu", waited_s=250.0, gpus=2, gpu_memory_gb=None)
    large = QueuedJob(id=3, queue="gpu", waited_s=250.0, gpus=1, gpu_memory_gb=141)
    assert not_consuming([_slot()], False, msgs, [big, large], 120) is None
    # A worker that does not report its activity (an older version) is never flagged.
    assert not_consuming([_slot(quiet_s=None)], False, msgs, [job], 120) is None
    # One busy slot running a long job does not hide an idle one that gets nothing.
    busy = _slot(busy=True, idle_s=0.0, quiet_s=4000.0)
    assert not_consuming([busy, _slot()], False, msgs, [job, job], 120).startswith(
        "not consuming: 2 jobs it could take have waited 4 min"
    )


def test_the_registry_remembers_nodes_lost_or_stopped(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    info = SlotInfo(name="h-a:11", node="n1@h-a", host="h-a", pid=11, queues=("cpu",),
                    node_slots=1)  # fmt: skip
    register(client, info, activity=Activity(idle_s=7.0, quiet_s=9.0, last_task_at=1.0))
    [slot] = online_slots(client)
    assert slot.idle_s is not None and 7.0 <= slot.idle_s < 9.0
    assert slot.quiet_s is not None and 9.0 <= slot.quiet_s < 11.0
    assert departed_nodes(client, {"n1@h-a"}, 3600) == []
    client.delete(slot_key(info.name))  # what its TTL does when the host is lost
    [lost] = departed_nodes(client, set(), 3600)
    assert (lost.node, lost.lost, lost.slot_names) == ("n1@h-a", True, ("h-a:11",))
    mark_stopped(client, "n1@h-a")
    [stopped] = departed_nodes(client, set(), 3600)
    assert not stopped.lost and stopped.stopped_at
    # A restart under the same name clears "stopped"; a record older than the
    # retention is pruned by the reader.
    register(client, info)
    assert departed_nodes(client, set(), 3600)[0].lost
    assert departed_nodes(client, set(), 3600, now=time.time() + 7200) == []
    assert client.exists("trainyard:worker-node:n1@h-a") == 0
    mark_stopped(client, "never-seen@h")  # no record made for a node never registered
    assert client.exists("trainyard:worker-node:never-seen@h") == 0


def test_a_lost_nodes_last_jobs_and_their_fate(db_url: str, users) -> None:  # type: ignore[no-untyped-def]
    owner = users.alice.id
    resumed, failed, waiting, running = add_jobs(db_url, [
        {"owner": owner, "state": "succeeded", "worker": "h-b:2"},
        {"owner": owner, "state": "failed", "error_message": "InfrastructureError: disk"},
        {"owner": owner, "state": "queued"},
        {"owner": owner, "state": "running", "worker": "h-a:1"},
    ])  # fmt: skip
    events = [
        (resumed, "claimed", 1, "h-a:1"), (resumed, "requeued", 1, None),
        (resumed, "claimed", 2, "h-b:2"), (resumed, "resumed", 2, None),
        (failed, "claimed", 1, "h-a:1"), (waiting, "claimed", 1, "h-a:1"),
        (waiting, "requeued", 1, None), (running, "claimed", 1, "h-a:1"),
    ]  # fmt: skip
    with transaction(db_url) as s:
        s.get(Job, resumed).attempt = 2  # type: ignore[union-attr]
        s.get(Job, waiting).attempt = 1  # type: ignore[union-attr]
        for job_id, kind, attempt, worker in events:
            s.add(JobEvent(job_id=job_id, at=utcnow(), kind=kind, attempt=attempt, worker=worker))
    with transaction(db_url) as s:
        fates = {j.id: (j.attempt, j.fate) for j in last_jobs(s, ["h-a:1", "h-a:9"])}
        assert list(fates) == [running, waiting, failed, resumed]  # newest claim first
        assert last_jobs(s, ["h-c:3"]) == []
    assert fates == {
        resumed: (1, "requeued, resumed on h-b:2 (attempt 2), succeeded"),
        failed: (1, "failed: InfrastructureError: disk"),
        waiting: (1, "requeued, waiting for attempt 2"),
        running: (1, "still running here by the database: requeued once its lease runs out"),
    }


# ---------------------------------------------------------------- real workers


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # A short threshold for the web; workers are unaffected by it.
    return settings.model_copy(update={"stuck_consumer_seconds": AFTER_S})


@pytest.fixture
def harness(app, users, settings: Settings) -> Harness:  # type: ignore[no-untyped-def]
    return Harness(app, users, settings)


@ON_POSTGRESQL  # each real-worker scenario once, like tests/test_node_control.py
def test_a_worker_that_stops_consuming_is_flagged_until_it_consumes_again(
    harness: Harness, settings: Settings, start_worker, app, users, db_url: str
) -> None:  # type: ignore[no-untyped-def]
    node = node_name("stuck")
    start_worker(name=node)

    def shown() -> dict[str, Any]:
        found = harness.node(node)
        assert found is not None, "the node is not listed"
        return found

    # Consuming normally: a job runs, and a job waiting behind a busy slot past the
    # threshold does not flag it.
    harness.wait(harness.submit(small_spec()), {"succeeded"})
    long_job = harness.submit(long_spec(epochs=60))
    harness.wait(long_job, {"running"})
    behind = harness.submit(small_spec())
    time.sleep(AFTER_S + 2)
    assert shown()["not_consuming"] is None
    harness.member.post(f"/api/v1/jobs/{long_job}/cancel")
    harness.wait(behind, {"succeeded"})
    time.sleep(AFTER_S + 1)
    assert shown()["not_consuming"] is None  # idle, nothing waits

    # The symptom: the main process stops taking messages; its pool child still beats.
    celery = make_celery(settings)
    replies = celery.control.cancel_consumer("cpu", destination=[node], reply=True, timeout=10)
    assert replies and node in replies[0], replies
    waiting = harness.submit(small_spec())
    assert shown()["not_consuming"] is None  # the job has not waited long yet
    flagged = until(lambda: shown()["not_consuming"], "the node to be flagged", timeout=60)
    assert flagged.startswith("not consuming: 1 job it could take has waited "), flagged
    assert harness.job(waiting).state == "queued"
    page = session_client(app, db_url, users.admin).get("/workers").get_data(as_text=True)
    assert "not consuming: 1 job it could take has waited" in page

    # Cordoned, it is not flagged (it is not meant to consume).
    harness.admin.post(f"/api/v1/workers/{node}/cordon")
    assert shown()["not_consuming"] is None
    # Uncordoning starts its consumer again (worker/node_control.py): one remedy short
    # of a restart. The job runs and the flag goes.
    time.sleep(3)
    harness.admin.post(f"/api/v1/workers/{node}/uncordon")
    assert harness.wait(waiting, {"succeeded", "failed"}).state == "succeeded"
    assert shown()["not_consuming"] is None
    celery.close()


@ON_SQLITE
def test_a_worker_stopped_with_sigterm_is_stopped_not_lost(
    harness: Harness, start_worker, app, users, db_url: str
) -> None:  # type: ignore[no-untyped-def]
    node = node_name("stopped")
    worker = start_worker(name=node)
    harness.wait(harness.submit(small_spec()), {"succeeded"})
    worker.stop()  # SIGTERM to the main process: a warm shutdown
    body = harness.admin.get("/api/v1/workers").get_json()
    assert all(n["node"] != node for n in body["nodes"])
    [gone] = [n for n in body["lost_nodes"] if n["node"] == node]
    assert gone["state"] == "stopped" and gone["stopped_at"] and gone["jobs"] == [], gone
    page = session_client(app, db_url, users.admin).get("/workers").get_data(as_text=True)
    assert f'data-node="{node}"' in page and "lost-node node-stopped" in page


@ON_SQLITE
def test_with_automatic_restart_a_stuck_worker_restarts_its_consumer_and_runs_the_job(
    harness: Harness, settings: Settings, start_worker, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """TRAINYARD_STUCK_CONSUMER_RESTART: the worker finds itself not consuming by the
    same rule (twice in a row, 10 s apart), cancels and re-adds its queue consumer, and
    the job runs; the workers API shows the restart."""
    node = node_name("restarts")
    restarting = settings.model_copy(update={"stuck_consumer_restart": True})
    worker = WorkerProcess(restarting, tmp_path / "restarting-worker.log", "cpu", 1, node)
    celery = make_celery(settings)
    try:
        worker.wait_ready()
        harness.wait(harness.submit(small_spec()), {"succeeded"})
        replies = celery.control.cancel_consumer("cpu", destination=[node], reply=True, timeout=10)
        assert replies and node in replies[0], replies
        waiting = harness.submit(small_spec())
        job = harness.wait(waiting, {"succeeded", "failed"}, timeout=90)
        assert job.state == "succeeded"
        assert "restarted its consumer of cpu" in worker.log_tail(200_000)
        shown = harness.node(node)
        assert shown is not None and shown["consumer_restarts"]["count"] == 1, shown
        assert shown["consumer_restarts"]["reason"].startswith("not consuming: 1 job it could")
        assert shown["not_consuming"] is None
    finally:
        worker.stop()
        celery.close()
