"""Scheduling that holds under load (shared/scheduling.py, issue 12): priorities, aging,
fair share between users and preemption, with real `celery worker` processes on each
database. Orders are read from the job timeline ("claimed" entries, in the order they
were written), never from clocks."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from shared.broker import redis_client, take_scheduler_lock
from shared.db import transaction, utcnow
from shared.job_files import log_path
from shared.orm import Job, JobEvent
from shared.reconciler import preempt_pass
from shared.scheduling import Waiting, candidates_for, effective_priority, rank, slot_takes
from shared.settings import Settings
from tests.conftest import (
    ON_POSTGRESQL,
    REPO,
    SQLITE_ONLY,
    TestUsers,
    as_user,
    settings_env,
    wait_for_state,
)
from tests.helpers import job_events, train_spec

TINY_MLP = {"name": "mlp", "params": {"hidden": 32, "layers": 1}}
SHORT = train_spec(model=TINY_MLP, epochs=1)
# About 0.3 s an epoch on one core: a slot stays busy until the test cancels it.
BLOCKER = train_spec(model=TINY_MLP, epochs=400, name="blocker")
T0 = datetime(2026, 12, 1, 12, 0, 0)

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """The common test settings plus a test's @pytest.mark.scheduling(**overrides); the
    overrides reach its workers too (tests/conftest.py settings_env)."""
    marker = request.node.get_closest_marker("scheduling")
    if marker is None:
        return settings
    given = {name: getattr(settings, name) for name in settings.model_fields_set}
    return Settings(**{**given, **marker.kwargs})


# ----------------------------------------------------------------------------- the ranking


def _w(job_id: int, owner: int, priority: int, minutes_ago: float = 0.0) -> Waiting:
    return Waiting(job_id, owner, priority, T0 - timedelta(minutes=minutes_ago))


def _ids(order: list) -> list[int]:  # type: ignore[type-arg]
    return [r.job_id for r in order]


def test_rank_puts_higher_priority_first_then_older() -> None:
    waiting = [_w(1, 1, 1, 3), _w(2, 1, 1, 2), _w(3, 1, 9, 1)]
    assert _ids(rank(waiting, {}, T0, points_per_hour=0)) == [3, 1, 2]


def test_aging_lifts_a_long_waiting_job_over_fresh_higher_ones() -> None:
    # Ten hours at one point an hour: priority 0 becomes 10, above a fresh 9.
    waiting = [_w(1, 1, 9), _w(2, 1, 0, minutes_ago=600)]
    order = rank(waiting, {}, T0, points_per_hour=1.0)
    assert _ids(order) == [2, 1]
    assert order[0].effective_priority == pytest.approx(10.0)
    assert effective_priority(3, 1800, 2.0) == pytest.approx(4.0)


def test_owners_take_turns_within_a_level() -> None:
    alice = [_w(i, 1, 5, minutes_ago=100 - i) for i in range(1, 51)]
    bob = [_w(99, 2, 5)]
    order = _ids(rank(alice + bob, {}, T0, points_per_hour=0))
    assert order.index(99) == 1  # after alice's first job, before her second
    # An owner already running a job gives the other owner the first turn...
    assert _ids(rank(alice + bob, {1: 1}, T0, points_per_hour=0))[0] == 99
    # ...and so does one whose job started last, when neither runs any (one slot).
    served = {1: T0 - timedelta(seconds=1)}
    assert _ids(rank(alice + bob, {}, T0, points_per_hour=0, last_started=served))[0] == 99


# ----------------------------------------------------------------------------- preemption rules


def _row(url: str, **values: Any) -> int:
    now = utcnow()
    fields: dict[str, Any] = {
        "kind": "train", "queue": "cpu", "state": "queued", "priority": 5, "attempt": 0,
        "max_attempts": 3, "spec": {"kind": "train"}, "created_at": now, "updated_at": now,
    }  # fmt: skip
    fields.update(values)
    with transaction(url) as s:
        job = Job(**fields)
        s.add(job)
        s.flush()
        return job.id


def _running(url: str, **values: Any) -> int:
    now = utcnow()
    defaults: dict[str, Any] = {
        "state": "running", "attempt": 1, "worker": "host:1", "priority": 1,
        "spec": {"kind": "train", "preemptible": True},
        "started_at": now - timedelta(hours=1), "lease_expires_at": now + timedelta(hours=1),
    }  # fmt: skip
    return _row(url, **{**defaults, **values})


def test_preemption_rules_and_the_loop_guard(settings: Settings) -> None:
    url = settings.resolved_database_url
    victim = _running(url, preempted_at=utcnow() - timedelta(minutes=1))
    waiting = _row(url, priority=9)
    # Preempted a minute ago: inside TRAINYARD_PREEMPT_GUARD_SECONDS, left alone.
    assert preempt_pass(settings, "t") == []
    with transaction(url) as s:
        s.get(Job, victim).preempted_at = utcnow() - timedelta(hours=1)
    assert [(p.victim, p.preemptor) for p in preempt_pass(settings, "t")] == [(victim, waiting)]
    # One victim per waiting job at a time.
    _running(url, worker="host:2")
    assert preempt_pass(settings, "t") == []
    # Another reconciler does not decide while this one holds the scheduler lock.
    _row(url, priority=9)
    assert preempt_pass(settings, "other") == []


def test_no_preemption_for_aging_alone_a_fresh_victim_or_a_non_preemptible_one(
    settings: Settings,
) -> None:
    url = settings.resolved_database_url
    _running(url, spec={"kind": "train"})  # not preemptible (no queue default either)
    _running(url, worker="host:2", started_at=utcnow())  # has not run the minimum time
    _running(url, worker="host:3", priority=5)  # same base priority as the waiting job
    # Waited a day: aging lifts it far above, but preemption compares base priorities.
    _row(url, priority=5, created_at=utcnow() - timedelta(days=1))
    assert preempt_pass(settings, "t") == []


def test_reconcile_once_preempts_and_leaves_the_lock_to_the_running_reconciler(
    settings: Settings,
) -> None:
    url = settings.resolved_database_url
    victim, waiting = _running(url), _row(url, priority=9)
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "reconcile", "--once"], cwd=REPO,
        env=settings_env(settings), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"preempting job {victim} for job {waiting}" in out.stdout
    with transaction(url) as s:
        assert s.get(Job, victim).preempt_requested_by == waiting
    # The one-off pass gave the scheduler lock back: the loop's next pass decides.
    client = redis_client(settings.require_redis_url())
    try:
        assert take_scheduler_lock(client, "loop", 10)
    finally:
        client.close()


@pytest.mark.scheduling(preemptible_queues="cpu")
def test_a_queue_default_makes_jobs_preemptible_unless_their_spec_says_no(
    settings: Settings,
) -> None:
    url = settings.resolved_database_url
    _running(url, spec={"kind": "train", "preemptible": False})
    default = _running(url, worker="host:2", spec={"kind": "train"})
    waiting = _row(url, priority=9)
    assert [(p.victim, p.preemptor) for p in preempt_pass(settings, "t")] == [(default, waiting)]


def test_a_message_runs_only_jobs_its_slot_and_time_limit_can_take(settings: Settings) -> None:
    url = settings.resolved_database_url

    def gpu_job(gpus: int, priority: int, max_runtime_s: int = 600) -> int:
        spec = {"kind": "train", "resources": {"gpus": gpus}, "max_runtime_s": max_runtime_s}
        return _row(url, queue="gpu", priority=priority, spec=spec)

    own = gpu_job(1, priority=1)
    wide = gpu_job(2, priority=9)  # needs two GPUs of one host
    longer = gpu_job(1, priority=8, max_runtime_s=6000)  # over the message's hard limit
    fits = gpu_job(1, priority=7)
    with transaction(url) as s:
        assert candidates_for(s, settings, own, slot_gpus=[H200]) == [fits, own]
        assert candidates_for(s, settings, own, slot_gpus=[H200, H200]) == [wide, fits, own]
        assert candidates_for(s, settings, longer, slot_gpus=[H200, H200]) == [
            wide, longer, fits, own,
        ]  # fmt: skip
        # The 2-GPU job's own message on a 1-GPU slot runs another job, never this one.
        assert candidates_for(s, settings, wide, slot_gpus=[H200]) == [fits, own]


H200 = 150_754_820_096  # bytes, as NVML reports an H200's memory
A100_40GB = 42_949_672_960


def test_gpu_memory_gb_routes_only_to_slots_whose_gpus_have_that_much(settings: Settings) -> None:
    url = settings.resolved_database_url

    def gpu_job(priority: int, **resources: float) -> int:
        spec = {"kind": "train", "resources": {"gpus": 1, **resources}, "max_runtime_s": 600}
        return _row(url, queue="gpu", priority=priority, spec=spec)

    big = gpu_job(9, gpu_memory_gb=80)
    small = gpu_job(5)
    with transaction(url) as s:
        assert candidates_for(s, settings, small, slot_gpus=[H200]) == [big, small]
        assert candidates_for(s, settings, small, slot_gpus=[A100_40GB]) == [small]
        # Its own message on a 40 GB slot does not run it either; a GPU of unknown size
        # (named on a host without NVML) never meets a memory need.
        assert candidates_for(s, settings, big, slot_gpus=[A100_40GB]) == [small]
        assert candidates_for(s, settings, big, slot_gpus=[None]) == [small]
    assert slot_takes(1, 80, [85_899_345_920])  # an "80 GB" card: 80 GiB > 80 * 10^9
    assert not slot_takes(2, 80, [H200, A100_40GB]) and slot_takes(2, 80, [H200, H200])


# ----------------------------------------------------------------------------- real workers


def _submit(client, spec: dict[str, Any]) -> int:  # type: ignore[no-untyped-def]
    resp = client.post("/api/v1/jobs", json=spec)
    assert resp.status_code == 201, resp.get_json()
    return int(resp.get_json()["id"])


def _get(client) -> Callable[[str], dict]:  # type: ignore[no-untyped-def,type-arg]
    return lambda path: client.get(path).get_json()


def test_a_queued_jobs_detail_says_its_place_in_the_queue(settings: Settings, client) -> None:  # type: ignore[no-untyped-def]
    low, high, middle = (_submit(client, {**SHORT, "priority": p}) for p in (1, 9, 5))
    positions = {j: client.get(f"/api/v1/jobs/{j}").get_json()["queue_position"] for j in (low, high, middle)}  # fmt: skip
    assert positions == {high: 1, middle: 2, low: 3}
    # The same order as the queues API shows.
    waiting = client.get("/api/v1/queues").get_json()["waiting"]
    assert {w["id"]: w["position"] for w in waiting} == positions
    client.post(f"/api/v1/jobs/{high}/cancel")
    cancelled = client.get(f"/api/v1/jobs/{high}").get_json()
    assert "queue_position" not in cancelled
    assert client.get(f"/api/v1/jobs/{low}").get_json()["queue_position"] == 2


def _claim_order(url: str, ids: list[int]) -> list[int]:
    """The jobs in the order of their first claim."""
    with transaction(url) as s:
        rows = s.execute(
            select(JobEvent.job_id)
            .where(JobEvent.kind == "claimed", JobEvent.job_id.in_(ids))
            .order_by(JobEvent.id)
        ).all()
    seen: list[int] = []
    for (job_id,) in rows:
        if job_id not in seen:
            seen.append(job_id)
    return seen


def _start_blocker(client) -> int:  # type: ignore[no-untyped-def]
    blocker = _submit(client, BLOCKER)
    wait_for_state(_get(client), blocker, {"running"})
    return blocker


@ON_POSTGRESQL
def test_a_later_high_priority_job_starts_before_earlier_low_ones(
    settings: Settings, client, start_worker
) -> None:  # type: ignore[no-untyped-def]
    start_worker(concurrency=1)
    blocker = _start_blocker(client)
    low = [_submit(client, {**SHORT, "priority": 1}) for _ in range(3)]
    high = _submit(client, {**SHORT, "priority": 9})
    assert client.post(f"/api/v1/jobs/{blocker}/cancel").status_code in (200, 202)
    for job_id in [*low, high]:
        assert wait_for_state(_get(client), job_id, {"succeeded", "failed"})["state"] == "succeeded"
    order = _claim_order(settings.resolved_database_url, [*low, high])
    assert order == [high, *low]
    # Each job's log is its own, whichever job's message ran it.
    for job_id in [*low, high]:
        text = log_path(settings, job_id).read_text()
        assert text.count("succeeded:") == 1, text


# 36,000 points an hour: ten a second, so the priority-0 job outranks priority-9 jobs
# submitted about a second after it.
@pytest.mark.scheduling(aging_points_per_hour=36000.0)
@ON_POSTGRESQL
def test_aging_lets_a_low_priority_job_through_a_stream_of_high_ones(
    settings: Settings, client, start_worker
) -> None:  # type: ignore[no-untyped-def]
    start_worker(concurrency=1)
    blocker = _start_blocker(client)
    low = _submit(client, {**SHORT, "priority": 0})
    high: list[int] = []
    stop = threading.Event()

    def stream() -> None:
        # A steady stream: a new priority-9 job every 0.3 s, always some waiting.
        while not stop.is_set() and len(high) < 60:
            high.append(_submit(client, {**SHORT, "priority": 9}))
            stop.wait(0.3)

    time.sleep(1.5)  # the low job ages past the priority gap before the stream begins
    feeder = threading.Thread(target=stream)
    feeder.start()
    try:
        # A few high-priority jobs wait before the slot frees (on a loaded machine the
        # feeder's first submits can come after the cancel, and then nothing competes).
        deadline = time.monotonic() + 30
        while len(high) < 3:
            assert time.monotonic() < deadline, "the stream of high-priority jobs did not start"
            time.sleep(0.05)
        competing = list(high)
        assert client.post(f"/api/v1/jobs/{blocker}/cancel").status_code in (200, 202)
        assert wait_for_state(_get(client), low, {"succeeded", "failed"})["state"] == "succeeded"
    finally:
        stop.set()
        feeder.join()
    order = _claim_order(settings.resolved_database_url, [low, *high])
    # The high-priority jobs waiting when the slot freed did not start before it.
    before = order[: order.index(low)]
    assert not set(before) & set(competing), f"high-priority jobs went first: {order}"
    for job_id in high:
        client.post(f"/api/v1/jobs/{job_id}/cancel")


@SQLITE_ONLY
def test_fair_share_one_users_single_job_starts_before_anothers_50th(
    settings: Settings, app, users: TestUsers, start_worker
) -> None:  # type: ignore[no-untyped-def]
    alice, bob = as_user(app, users.alice), as_user(app, users.bob)
    start_worker(concurrency=1)
    blocker = _start_blocker(alice)
    many = [_submit(alice, SHORT) for _ in range(50)]
    single = _submit(bob, SHORT)
    assert alice.post(f"/api/v1/jobs/{blocker}/cancel").status_code in (200, 202)
    assert wait_for_state(_get(bob), single, {"succeeded", "failed"})["state"] == "succeeded"
    # The queues API lists alice's waiting jobs in the order slots take them, each with
    # its position and effective priority.
    waiting = as_user(app, users.admin).get("/api/v1/queues").get_json()["waiting"]
    for job_id in many:
        alice.post(f"/api/v1/jobs/{job_id}/cancel")
    order = _claim_order(settings.resolved_database_url, [*many, single])
    # At most alice's first job, then bob's: owners take turns within a priority level.
    assert order.index(single) <= 1, order
    assert waiting, "nothing waiting: the slot ran alice's 50 jobs already"
    positions = [j["position"] for j in waiting if j["queue"] == "cpu"]
    assert positions == sorted(positions) and positions[0] >= 1
    assert all(j["effective_priority"] >= j["priority"] == 5 for j in waiting)


def _result_metrics(url: str, job_id: int) -> dict[str, Any]:
    with transaction(url) as s:
        result = s.execute(select(Job.result).where(Job.id == job_id)).scalar_one()
    skip = {"duration_s", "train_time_s", "samples_per_s", "resumed_from_epoch",
            "resumed_from_step"}  # fmt: skip
    return {k: v for k, v in result["metrics"].items() if k not in skip}


@pytest.mark.scheduling(preempt_min_runtime_seconds=0.0)
@ON_POSTGRESQL
def test_a_high_priority_job_preempts_a_preemptible_low_one_which_resumes(
    settings: Settings, client, start_worker
) -> None:  # type: ignore[no-untyped-def]
    url = settings.resolved_database_url
    start_worker(concurrency=1)
    victim_spec = {**train_spec(model=TINY_MLP, epochs=150), "priority": 1, "preemptible": True}
    victim = _submit(client, victim_spec)
    get = _get(client)
    wait_for_state(get, victim, {"running"})
    deadline = time.monotonic() + 60
    while (get(f"/api/v1/jobs/{victim}").get("progress") or {}).get("epoch", 0) < 2:
        assert time.monotonic() < deadline, "the victim made no progress"
        time.sleep(0.1)
    high = _submit(client, {**SHORT, "priority": 9})
    deadline = time.monotonic() + 30
    while not preempt_pass(settings, "test-reconciler"):
        assert time.monotonic() < deadline, "no preemption decided"
        time.sleep(0.2)
    assert wait_for_state(get, high, {"succeeded", "failed"})["state"] == "succeeded"
    assert wait_for_state(get, victim, {"succeeded", "failed"})["state"] == "succeeded"
    kinds = job_events(url, victim)
    assert ("preempted", f"preempted by job {high}") in kinds, kinds
    assert [k for k, _ in kinds].count("claimed") == 2
    assert "resumed" in [k for k, _ in kinds]
    assert _claim_order(url, [victim, high]) == [victim, high]
    # A second, uninterrupted run of the same spec ends with the same final metrics.
    again = _submit(client, {**victim_spec, "preemptible": False})
    assert wait_for_state(get, again, {"succeeded", "failed"})["state"] == "succeeded"
    assert _result_metrics(url, victim) == _result_metrics(url, again)


@pytest.mark.scheduling(preempt_min_runtime_seconds=0.0)
@SQLITE_ONLY
def test_a_job_not_marked_preemptible_is_never_preempted(
    settings: Settings, client, start_worker
) -> None:  # type: ignore[no-untyped-def]
    start_worker(concurrency=1)
    blocker = _submit(client, {**BLOCKER, "priority": 1})
    wait_for_state(_get(client), blocker, {"running"})
    high = _submit(client, {**SHORT, "priority": 9})
    assert preempt_pass(settings, "test-reconciler") == []
    client.post(f"/api/v1/jobs/{blocker}/cancel")
    assert wait_for_state(_get(client), high, {"succeeded", "failed"})["state"] == "succeeded"
