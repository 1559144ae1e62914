"""Workers and queues: the worker registry, GET /api/v1/workers and /queues, /workers.

Jobs are rows written straight into the database and worker slots are registry entries
written straight into Redis, except for one test with a real `celery worker`.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from server.cluster_status import WaitReason, wait_reason
from server.web.filters import duration
from shared.broker import redis_client
from shared.db import transaction, utcnow
from shared.orm import Job
from shared.worker_registry import (
    INDEX_KEY,
    SlotHeartbeat,
    SlotInfo,
    online_slots,
    register,
    remove_node,
    slot_key,
    unregister,
)
from tests.conftest import TestUsers as Users
from tests.conftest import as_user
from tests.test_authorization import session_client

SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


# ---------------------------------------------------------------- why a job waits


@pytest.mark.parametrize(
    ("queue", "ahead", "slots", "busy", "expected"),
    [
        ("gpu", 0, 0, 0, WaitReason("no_worker", "no worker consumes the gpu queue")),
        ("gpu", 7, 0, 0, WaitReason("no_worker", "no worker consumes the gpu queue")),
        ("cpu", 0, 2, 2, WaitReason("slots_busy", "all 2 cpu slots are busy")),
        ("cpu", 0, 1, 1, WaitReason("slots_busy", "the only cpu slot is busy")),
        ("cpu", 1, 2, 2, WaitReason("jobs_ahead", "1 job ahead of it; all 2 cpu slots are busy")),
        ("gpu", 3, 1, 1, WaitReason("jobs_ahead", "3 jobs ahead of it; the only gpu slot is busy")),
        # Free slots, but more jobs ahead than free slots: those go first.
        ("cpu", 3, 4, 2, WaitReason("jobs_ahead", "3 jobs ahead of it")),
        ("cpu", 2, 4, 2, WaitReason("jobs_ahead", "2 jobs ahead of it")),
        # Enough free slots for the jobs ahead and this one.
        ("cpu", 1, 4, 2, WaitReason("next_in_line", "next in line")),
        ("cpu", 0, 1, 0, WaitReason("next_in_line", "next in line")),
        # More busy than online (a finished job not yet recorded): no slot is free.
        ("cpu", 0, 1, 2, WaitReason("slots_busy", "the only cpu slot is busy")),
        ("cpu", 0, None, 0, WaitReason("unknown", "unknown: the broker cannot be reached")),
    ],
)
def test_wait_reason(
    queue: str, ahead: int, slots: int | None, busy: int, expected: WaitReason
) -> None:
    assert wait_reason(queue, ahead, slots, busy) == expected


# ---------------------------------------------------------------- the registry


def slot(
    name: str, node: str = "n1@host", queues: tuple[str, ...] = ("cpu",), **kw: Any
) -> SlotInfo:
    host, _, pid = name.partition(":")
    return SlotInfo(
        name=name, node=node, host=host, pid=int(pid), queues=queues, node_slots=2, **kw
    )


@pytest.fixture
def rc(redis_url: str) -> redis.Redis:
    client = redis_client(redis_url)
    yield client
    client.close()


def test_registry_round_trip(rc: redis.Redis) -> None:
    gpu = slot("gpu-01:11", node="a@gpu-01", queues=("gpu",), gpu_names=("H200", "H200"),
               device="cuda:0")  # fmt: skip
    register(rc, gpu)
    register(rc, slot("cpu-01:12", node="b@cpu-01", queues=("cpu", "gpu")))
    found = online_slots(rc)
    assert [s.name for s in found] == ["gpu-01:11", "cpu-01:12"]  # by node name
    back = found[0].info
    assert back == SlotInfo(
        name="gpu-01:11", node="a@gpu-01", host="gpu-01", pid=11, queues=("gpu",),
        node_slots=2, gpu_names=("H200", "H200"), device="cuda:0", started_at=gpu.started_at,
    )  # fmt: skip
    assert back.gpu_count == 2
    assert 0 <= found[0].heartbeat_age_s < 1 and found[0].last_heartbeat > time.time() - 5
    assert 0 < rc.pttl(slot_key("gpu-01:11")) <= 20_000

    unregister(rc, "gpu-01:11")
    assert [s.name for s in online_slots(rc)] == ["cpu-01:12"]
    assert rc.smembers(INDEX_KEY) == {b"cpu-01:12"}
    assert remove_node(rc, "b@cpu-01") == 1 and online_slots(rc) == []


def test_a_slot_that_stops_beating_expires_and_is_pruned(rc: redis.Redis) -> None:
    register(rc, slot("h:1"), ttl_s=0.3)
    register(rc, slot("h:2"))
    time.sleep(0.4)
    assert [s.name for s in online_slots(rc)] == ["h:2"]
    assert rc.smembers(INDEX_KEY) == {b"h:2"}  # the dead name is gone from the index too


def test_heartbeat_age_comes_from_redis_not_the_workers_clock(rc: redis.Redis) -> None:
    register(rc, slot("h:1"), ttl_s=20)
    rc.pexpire(slot_key("h:1"), 14_000)  # as if the last beat was 6 s ago
    rc.hset(slot_key("h:1"), "last_heartbeat", "1.0")  # a wildly wrong worker clock
    (found,) = online_slots(rc)
    assert 5.5 <= found.heartbeat_age_s <= 6.5


def test_heartbeat_thread_registers_refreshes_and_removes(rc: redis.Redis, redis_url: str) -> None:
    beat = SlotHeartbeat(redis_url, slot("h:7"), interval_s=0.05, ttl_s=0.5)
    beat.start()
    try:
        assert [s.name for s in online_slots(rc, ttl_s=0.5)] == ["h:7"]
        time.sleep(0.7)  # longer than the TTL: only the refreshes keep it alive
        assert [s.name for s in online_slots(rc, ttl_s=0.5)] == ["h:7"]
    finally:
        beat.stop()
    assert online_slots(rc) == [] and not rc.exists(slot_key("h:7"))


def test_heartbeat_never_raises_and_logs_a_failing_redis_once(
    caplog: pytest.LogCaptureFixture, tmp_path: Any
) -> None:
    beat = SlotHeartbeat(f"redis+socket://{tmp_path}/no-redis.sock", slot("h:8"), interval_s=0.02)
    with caplog.at_level(logging.WARNING, logger="shared.worker_registry"):
        beat.start()
        time.sleep(0.15)
        beat.stop()
    assert beat.beat() is False
    warnings = [r for r in caplog.records if "cannot write h:8" in r.getMessage()]
    assert len(warnings) == 1


# ---------------------------------------------------------------- API with fake slots and jobs


def add_job(db_url: str, owner_id: int, name: str, state: str = "queued", queue: str = "cpu",
            worker: str | None = None, age_s: float = 0.0, spec: dict[str, Any] | None = None,
            **kw: Any) -> int:  # fmt: skip
    stamp = utcnow() - timedelta(seconds=age_s)
    with transaction(db_url) as s:
        job = Job(
            owner_id=owner_id, kind="train", name=name, state=state, queue=queue,
            spec=spec or {"kind": "train", "tags": []}, model_name="mlp", dataset_name="digits",
            worker=worker, created_at=stamp, updated_at=stamp,
            started_at=stamp if state == "running" else None, **kw,
        )  # fmt: skip
        s.add(job)
        s.flush()
        return job.id


def get(client: FlaskClient, url: str) -> dict[str, Any]:
    resp = client.get(url)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp.get_json()


def by_name(queues: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {q["name"]: q for q in queues["queues"]}


def test_queues_counts_and_reasons(
    app: Flask, users: Users, db_url: str, redis_url: str, rc: redis.Redis
) -> None:
    alice, bob = users.alice.id, users.bob.id
    register(rc, slot("w1:1", queues=("cpu",)))
    register(rc, slot("w1:2", queues=("cpu",)))
    add_job(db_url, bob, "bob-running", "running", worker="w1:1", age_s=50,
            progress={"fraction": 0.25})  # fmt: skip
    # A higher priority: ahead of alice's job although bob already runs one (within one
    # priority level, owners would take turns: shared/scheduling.py).
    add_job(db_url, bob, "bob-first", age_s=40, priority=6)
    mine_cpu = add_job(db_url, alice, "alice-cpu", age_s=30)
    add_job(db_url, bob, "bob-later", age_s=20)
    mine_gpu = add_job(db_url, alice, "alice-gpu", queue="gpu", age_s=10)
    add_job(db_url, alice, "alice-done", "succeeded")
    rc.rpush("cpu", "m1", "m2")
    rc.rpush("cpu\x06\x163", "m3")  # kombu's list for priority step 3 counts too

    body = get(as_user(app, users.alice), "/api/v1/queues")
    assert body["broker_error"] is None
    queues = by_name(body)
    assert queues["cpu"] == {"name": "cpu", "messages": 3, "queued_jobs": 3, "running_jobs": 1,
                             "slots": 2, "busy_slots": 1, "nodes": 1}  # fmt: skip
    assert queues["gpu"] == {"name": "gpu", "messages": 0, "queued_jobs": 1, "running_jobs": 0,
                             "slots": 0, "busy_slots": 0, "nodes": 0}  # fmt: skip
    # Only alice's own jobs, in the order workers take them; counts include bob's.
    waiting = {j["id"]: j for j in body["waiting"]}
    assert list(waiting) == [mine_gpu, mine_cpu] and body["waiting_total"] == 2
    assert waiting[mine_cpu]["ahead"] == 1
    assert waiting[mine_cpu]["reason"] == "1 job ahead of it"  # one free slot, for bob-first
    assert waiting[mine_cpu]["owner"] == "alice" and 29 < waiting[mine_cpu]["waiting_s"] < 40
    assert waiting[mine_gpu]["reason_code"] == "no_worker"
    assert waiting[mine_gpu]["reason"] == "no worker consumes the gpu queue"

    # Fill the second slot: alice's job now waits behind bob-first with both slots busy.
    with transaction(db_url) as s:
        first = s.query(Job).filter_by(name="bob-first").one()
        first.state, first.worker = "running", "w1:2"
    body = get(as_user(app, users.alice), "/api/v1/queues")
    mine = {j["id"]: j for j in body["waiting"]}[mine_cpu]
    assert (mine["ahead"], mine["reason"]) == (0, "all 2 cpu slots are busy")

    admin = get(as_user(app, users.admin), "/api/v1/queues")
    assert [j["name"] for j in admin["waiting"]] == ["alice-cpu", "alice-gpu", "bob-later"]
    assert [j["ahead"] for j in admin["waiting"]] == [0, 0, 1]
    assert admin["waiting_total"] == 3
    assert get(as_user(app, users.bob), "/api/v1/queues")["waiting_total"] == 1


def test_a_job_wider_than_every_slot_says_no_worker_offers_its_gpus(
    app: Flask, users: Users, db_url: str, rc: redis.Redis
) -> None:
    one_gpu = ({"index": 0, "uuid": None, "name": None, "memory_total_bytes": None},)
    register(rc, slot("g1:1", queues=("gpu",), device="cuda:0", slot=0, gpus=one_gpu))
    register(rc, slot("g1:2", queues=("gpu",), device="cuda:0", slot=1, gpus=one_gpu))
    wide = add_job(db_url, users.alice.id, "wide", queue="gpu",
                   spec={"kind": "train", "tags": [], "resources": {"gpus": 4}})  # fmt: skip
    narrow = add_job(db_url, users.alice.id, "narrow", queue="gpu",
                     spec={"kind": "train", "tags": [], "resources": {"gpus": 1}})  # fmt: skip
    waiting = {j["id"]: j for j in get(as_user(app, users.alice), "/api/v1/queues")["waiting"]}
    assert waiting[wide]["reason_code"] == "no_worker"
    assert waiting[wide]["reason"] == "no worker offers 4 GPUs on one host"
    assert waiting[narrow]["reason_code"] != "no_worker"

    # Memory: these GPUs were named on a host without NVML, so their size is unknown.
    big = add_job(db_url, users.alice.id, "big", queue="gpu",
                  spec={"kind": "train", "tags": [], "resources": {"gpus": 1, "gpu_memory_gb": 80}})  # fmt: skip
    waiting = {j["id"]: j for j in get(as_user(app, users.alice), "/api/v1/queues")["waiting"]}
    assert waiting[big]["reason"] == "no worker offers a GPU with 80 GB"
    h200 = ({"index": 3, "uuid": "GPU-x", "name": "NVIDIA H200",
             "memory_total_bytes": 150_754_820_096},)  # fmt: skip
    register(rc, slot("g2:1", queues=("gpu",), device="cuda:0", slot=0, gpus=h200))
    waiting = {j["id"]: j for j in get(as_user(app, users.alice), "/api/v1/queues")["waiting"]}
    assert waiting[big]["reason_code"] != "no_worker"


def test_a_handed_back_job_keeps_its_place_by_submission(
    app: Flask, users: Users, db_url: str, rc: redis.Redis
) -> None:
    # Created first, handed back (re-published) last: workers rank waiting jobs from the
    # database (shared/scheduling.py), not by the broker's order, so it stays first.
    old = add_job(db_url, users.alice.id, "handed-back", age_s=5, attempt=1)
    with transaction(db_url) as s:
        s.get(Job, old).created_at = utcnow() - timedelta(hours=1)
    add_job(db_url, users.alice.id, "newer", age_s=30)
    register(rc, slot("w:1"))
    waiting = get(as_user(app, users.alice), "/api/v1/queues")["waiting"]
    assert [(j["name"], j["ahead"]) for j in waiting] == [("handed-back", 0), ("newer", 1)]
    assert waiting[0]["attempt"] == 1


def test_a_busy_slot_shows_its_job_only_to_the_owner_and_admins(
    app: Flask, users: Users, db_url: str, rc: redis.Redis
) -> None:
    register(rc, slot("gpu-01:5", node="t@gpu-01", queues=("gpu",), gpu_names=("H200",),
                      device="cuda:0"))  # fmt: skip
    register(rc, slot("gpu-01:6", node="t@gpu-01", queues=("gpu",), gpu_names=("H200",)))
    job = add_job(db_url, users.alice.id, "alice-secret-run", "running", queue="gpu",
                  worker="gpu-01:5", progress={"fraction": 0.5})  # fmt: skip

    def slots_for(user: Any) -> dict[str, Any]:
        body = get(as_user(app, user), "/api/v1/workers")
        (node,) = body["nodes"]
        assert (node["node"], node["host"], node["queues"]) == ("t@gpu-01", "gpu-01", ["gpu"])
        assert (node["gpus"], node["gpu_names"], node["slots"]) == (1, ["H200"], 2)
        assert (node["online_slots"], node["busy_slots"]) == (2, 1)
        assert (body["online_slots"], body["busy_slots"]) == (2, 1)
        return {w["name"]: w for w in node["workers"]}

    bob = slots_for(users.bob)
    assert bob["gpu-01:5"]["busy"] is True and bob["gpu-01:5"]["job"] is None
    assert bob["gpu-01:6"]["busy"] is False and bob["gpu-01:6"]["job"] is None
    resp = as_user(app, users.bob).get("/api/v1/workers")
    assert "alice" not in resp.get_data(as_text=True)
    assert str(job) not in {str(v) for v in bob["gpu-01:5"].values()}

    for user in (users.alice, users.admin):
        seen = slots_for(user)["gpu-01:5"]["job"]
        assert seen["id"] == job and seen["name"] == "alice-secret-run"
        assert seen["owner"] == "alice" and seen["progress"] == 0.5
    assert slots_for(users.alice)["gpu-01:5"]["device"] == "cuda:0"


def test_redis_down_is_reported_not_raised(app: Flask, users: Users, db_url: str) -> None:
    from server.app import create_app

    broken = create_app(
        app.config["TRAINYARD_SETTINGS"].model_copy(update={"redis_url": "redis://127.0.0.1:1/0"}),
        {"TESTING": True},
    )
    add_job(db_url, users.alice.id, "waits")
    client = as_user(broken, users.alice)
    workers = get(client, "/api/v1/workers")
    assert workers["nodes"] == [] and "ConnectionError" in workers["broker_error"]
    queues = get(client, "/api/v1/queues")
    assert by_name(queues)["cpu"]["slots"] is None and by_name(queues)["cpu"]["messages"] is None
    assert queues["waiting"][0]["reason_code"] == "unknown"
    page = session_client(broken, db_url, users.alice).get("/workers")
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and "cannot reach Redis (ConnectionError)" in html
    assert "Worker status unknown" in html and "Unknown until Redis answers." in html


# ---------------------------------------------------------------- the page


def test_the_page_renders_for_a_member(
    app: Flask, users: Users, db_url: str, rc: redis.Redis
) -> None:
    register(rc, slot("w:1", node="n@w", queues=("cpu",)))
    add_job(db_url, users.bob.id, "bob-running", "running", worker="w:1")
    mine = add_job(db_url, users.alice.id, "alice <waits>", age_s=65)
    added = time.monotonic()

    resp = session_client(app, db_url, users.alice).get("/workers")
    # It has waited 65 s plus however long the page took on a loaded machine.
    waited = {duration(65 + s) for s in range(int(time.monotonic() - added) + 2)}
    html = resp.get_data(as_text=True)
    assert resp.status_code == 200 and resp.mimetype == "text/html"
    for marker in ('id="workers-page"', 'id="cluster-summary" aria-live="polite"',
                   'id="queue-list"', 'id="waiting-table"', 'id="node-list"',
                   'data-queue="gpu"', 'data-slot="w:1"', "/static/js/workers.js",
                   "/static/css/workers.css"):  # fmt: skip
        assert marker in html, marker
    assert f'<a class="job-link" href="/jobs/{mine}">alice &lt;waits&gt;</a>' in html
    assert "the only cpu slot is busy" in html
    assert any(w in html for w in waited), waited
    # Its position in the queue and its effective priority: 5 plus 65 s of aging.
    assert '<td data-label="Position" class="num">1</td>' in html
    assert 'title="priority 5 plus aging">5.02</td>' in html
    assert "No worker consumes this queue" in html  # gpu
    assert "another user's job" in html and "bob-running" not in html
    assert (
        'id="workers-empty"' in html
        and 'id="broker-error" class="broker-error" role="alert" hidden' in html
    )
    assert "<style" not in html and " style=" not in html  # the CSP allows neither


def test_the_page_with_nothing_online(
    app: Flask, users: Users, db_url: str, redis_url: str
) -> None:
    html = session_client(app, db_url, users.admin).get("/workers").get_data(as_text=True)
    assert "No workers online." in html and "trainyard worker" in html
    assert "No jobs are waiting." in html
    assert app.test_client().get("/workers").status_code == 302  # anonymous: to the login


# ---------------------------------------------------------------- a real worker


@SQLITE_ONLY
@pytest.mark.integration
def test_a_real_worker_appears_with_its_queues_and_leaves_when_stopped(
    app: Flask, users: Users, start_worker: Any
) -> None:
    worker = start_worker(queues="cpu,gpu", concurrency=1)
    client = as_user(app, users.alice)
    deadline = time.monotonic() + 10
    nodes: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not nodes:
        nodes = get(client, "/api/v1/workers")["nodes"]
        time.sleep(0.1)
    assert nodes, worker.log_tail()
    (node,) = nodes
    assert node["node"].startswith("test-") and node["queues"] == ["cpu", "gpu"]
    (slot_,) = node["workers"]
    assert slot_["name"] == f"{node['host']}:{slot_['pid']}" and slot_["busy"] is False
    assert by_name(get(client, "/api/v1/queues"))["gpu"]["slots"] == 1

    worker.stop()
    assert get(client, "/api/v1/workers")["nodes"] == []  # a clean stop unregisters at once
