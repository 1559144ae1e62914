"""Per-user limits at the claim (shared/claim_limits.py): running jobs and GPU-hours a
day. A job over a limit stays queued, its timeline says why, and the reconciler offers
it again later; two workers claiming at once cannot both pass the limit."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
import redis
from sqlalchemy import select

from shared.celery_app import make_celery, task_id_for
from shared.claim_limits import Deferred, claim_within_limits, gpu_seconds, limits_for
from shared.db import transaction, utcnow
from shared.orm import Job, JobEvent, User
from shared.reconciler import reconcile_once
from shared.settings import Settings
from shared.spec import CPU_QUEUE
from shared.state_machine import Claim, JobState, finish_job
from tests.conftest import ON_POSTGRESQL, as_user, wait_for_state
from tests.helpers import job_events, train_spec

GPU = "cuda:0 (NVIDIA H200)"
SMALL_MLP = {"name": "mlp", "params": {"hidden": 16, "layers": 1}}


def add_job(url: str, owner_id: int, gpus: int = 0, **values: Any) -> int:
    spec = train_spec(model=SMALL_MLP, epochs=1)
    if gpus:
        spec["resources"] = {"gpus": gpus}
    with transaction(url) as s:
        job = Job(
            owner_id=owner_id, kind="train", queue=CPU_QUEUE, spec=spec, model_name="mlp",
            dataset_name="digits", max_attempts=3, **values,
        )  # fmt: skip
        s.add(job)
        s.flush()
        return job.id


def claim(settings: Settings, job_id: int, device: str = "cpu") -> Claim | Deferred | None:
    with transaction(settings.resolved_database_url) as s:
        return claim_within_limits(s, settings, job_id, f"host:{job_id}", device)


def set_limits(url: str, user_id: int, limits: dict[str, Any] | None) -> None:
    with transaction(url) as s:
        s.get(User, user_id).limits = limits


@pytest.fixture
def limited(settings: Settings) -> Settings:
    return settings.model_copy(update={"max_running_jobs_per_user": 1})


def test_limits_come_from_the_role_and_the_users_overrides(settings: Settings) -> None:
    member = limits_for(settings, "member", None)
    assert (member.max_running_jobs, member.gpu_hours_per_day) == (4, 24.0)
    admin = limits_for(settings, "admin", None)
    assert (admin.max_running_jobs, admin.gpu_hours_per_day) == (None, None)  # 0: none
    raised = limits_for(
        settings, "member", {"max_running_jobs_per_user": 10, "gpu_hours_per_day_per_user": 0}
    )
    assert (raised.max_running_jobs, raised.gpu_hours_per_day) == (10, None)
    # An override that is no number, or negative, or not even a mapping: the role's.
    for junk in ({"max_running_jobs_per_user": "lots"}, {"max_running_jobs_per_user": -3}, [1]):
        assert limits_for(settings, "member", junk).max_running_jobs == 4


def test_a_claim_at_the_running_limit_waits_and_the_timeline_says_why(
    limited: Settings, users: Any
) -> None:
    url = limited.resolved_database_url
    first, second = add_job(url, users.alice.id), add_job(url, users.alice.id)
    bobs = add_job(url, users.bob.id)
    assert isinstance(claim(limited, first), Claim)

    deferred = claim(limited, second)
    assert isinstance(deferred, Deferred)
    assert "alice is at the limit of 1 running jobs" in deferred.reason
    assert isinstance(claim(limited, second), Deferred)  # offered again: still waiting
    with transaction(url) as s:
        job = s.get(Job, second)
        assert (job.state, job.attempt, job.worker) == ("queued", 0, None)
    # Said once, not once per offer.
    assert job_events(url, second) == [("deferred", deferred.reason)]

    # Another user's job is not held up by alice's limit.
    assert isinstance(claim(limited, bobs), Claim)

    with transaction(url) as s:
        assert finish_job(s, first, 1, JobState.SUCCEEDED, result={})
    taken = claim(limited, second)
    assert isinstance(taken, Claim) and taken.attempt == 1
    assert [kind for kind, _ in job_events(url, second)] == ["deferred", "claimed"]


def test_an_admins_override_raises_one_users_limit(limited: Settings, users: Any) -> None:
    url = limited.resolved_database_url
    set_limits(url, users.alice.id, {"max_running_jobs_per_user": 2})
    jobs = [add_job(url, users.alice.id) for _ in range(3)]
    assert [type(claim(limited, j)).__name__ for j in jobs] == ["Claim", "Claim", "Deferred"]
    # Admins have no running limit by default.
    admin_jobs = [add_job(url, users.admin.id) for _ in range(3)]
    assert all(isinstance(claim(limited, j), Claim) for j in admin_jobs)


def test_a_deferred_job_is_offered_again_by_the_reconciler(limited: Settings, users: Any) -> None:
    # The first job's lease outlasts the reconcile passes "later" (a minute on).
    limited = limited.model_copy(update={"lease_seconds": 3600})
    url = limited.resolved_database_url
    first, second = add_job(url, users.alice.id), add_job(url, users.alice.id)
    assert isinstance(claim(limited, first), Claim)
    assert isinstance(claim(limited, second), Deferred)
    celery = make_celery(limited)
    try:
        # Not at once (that would spin), but after requeue_after_seconds.
        assert reconcile_once(limited, celery).republished == 0
        later = utcnow() + timedelta(seconds=limited.requeue_after_seconds + 1)
        report = reconcile_once(limited, celery, now=later)
        assert report.job_ids.get("republished") == [second]
    finally:
        celery.close()
    # Offered again while alice is still at her limit: waiting, and the timeline stays
    # one entry long however many rounds that takes.
    assert isinstance(claim(limited, second), Deferred)
    assert [kind for kind, _ in job_events(url, second)] == ["deferred"]
    client = redis.Redis.from_url(limited.require_redis_url())
    try:
        assert any(task_id_for(second).encode() in m for m in client.lrange(CPU_QUEUE, 0, -1))
    finally:
        client.close()


def test_two_claims_of_one_users_jobs_at_once_cannot_both_pass(
    limited: Settings, users: Any
) -> None:
    """The first claim's transaction is still open when the second starts: without the
    lock on the owner (PostgreSQL), the second counted no running job and claimed too."""
    url = limited.resolved_database_url
    first, second = add_job(url, users.alice.id), add_job(url, users.alice.id)
    outcome: list[Any] = []
    submitted: list[int] = []
    with transaction(url) as s:
        assert isinstance(claim_within_limits(s, limited, first, "host:1", "cpu"), Claim)
        other = threading.Thread(target=lambda: outcome.append(claim(limited, second)))
        other.start()
        other.join(2)  # blocked on the first's lock (or, unlocked, done and wrong)
        if url.startswith("postgresql"):
            # The lock holds up claims only, not alice's submissions (SQLite has one
            # writer at a time anyway).
            insert = threading.Thread(target=lambda: submitted.append(add_job(url, users.alice.id)))
            insert.start()
            insert.join(30)
            assert submitted, "a submission waited for a claim's lock on its owner"
    other.join(60)
    assert len(outcome) == 1 and isinstance(outcome[0], Deferred), outcome
    with transaction(url) as s:
        running = s.scalars(select(Job.id).where(Job.state == "running")).all()
    assert running == [first]


def add_event(url: str, job_id: int, kind: str, attempt: int, at: Any, message: str | None = None):  # type: ignore[no-untyped-def]
    with transaction(url) as s:
        s.add(JobEvent(job_id=job_id, kind=kind, attempt=attempt, at=at, message=message))


def test_gpu_hours_count_the_gpu_attempts_of_the_last_day(settings: Settings, users: Any) -> None:
    url = settings.resolved_database_url
    now = utcnow()
    h = timedelta(hours=1)
    alice = users.alice.id
    # 2 h on a GPU, finished an hour ago.
    done = add_job(
        url, alice, state="succeeded", attempt=1, started_at=now - 3 * h, finished_at=now - h
    )
    add_event(url, done, "claimed", 1, now - 3 * h, f"on {GPU}")
    add_event(url, done, "succeeded", 1, now - h)
    # Two attempts: 1 h on a GPU until the lease ran out, then 1 h more (still running).
    running = add_job(url, alice, state="running", attempt=2, started_at=now - h)
    add_event(url, running, "claimed", 1, now - 3 * h, f"on {GPU}")
    add_event(url, running, "requeued", 1, now - 2 * h)
    add_event(url, running, "claimed", 2, now - h, f"on {GPU}")
    # Started 30 h ago, finished 20 h ago: 4 h of it fall in the last 24 h.
    old = add_job(
        url, alice, state="failed", attempt=1, started_at=now - 30 * h, finished_at=now - 20 * h
    )
    add_event(url, old, "claimed", 1, now - 30 * h, f"on {GPU}")
    add_event(url, old, "failed", 1, now - 20 * h)
    # On 2 GPUs for 1 h: 2 GPU-hours, as two 1-GPU jobs would be.
    wide = add_job(
        url, alice, gpus=2, state="succeeded", attempt=1, started_at=now - 2 * h,
        finished_at=now - h,
    )  # fmt: skip
    add_event(url, wide, "claimed", 1, now - 2 * h, f"on {GPU}")
    add_event(url, wide, "succeeded", 1, now - h)
    # On a CPU: no GPU time. Bob's: not alice's.
    cpu = add_job(url, alice, state="succeeded", attempt=1, started_at=now - 5 * h, finished_at=now)
    add_event(url, cpu, "claimed", 1, now - 5 * h, "on cpu")
    bobs = add_job(url, users.bob.id, state="running", attempt=1, started_at=now - 5 * h)
    add_event(url, bobs, "claimed", 1, now - 5 * h, f"on {GPU}")
    with transaction(url) as s:
        used = gpu_seconds(s, alice, now)
    assert abs(used - 10 * 3600) < 1, used / 3600

    budget = settings.model_copy(update={"gpu_hours_per_day_per_user": 10})
    waiting = add_job(url, alice)
    deferred = claim(budget, waiting, device=GPU)
    assert isinstance(deferred, Deferred)
    assert "alice used the 10 GPU-hours allowed per 24 h" in deferred.reason
    # The budget is for GPUs: the same job on a CPU worker runs.
    assert isinstance(claim(budget, waiting, device="cpu"), Claim)
    # The claim records the device, which is what the next count reads.
    assert job_events(url, waiting)[-1] == ("claimed", "on cpu")


@pytest.mark.integration
@ON_POSTGRESQL
def test_real_workers_run_other_users_jobs_while_one_waits_at_its_limit(
    app, users: Any, limited: Settings, tmp_path: Any
) -> None:  # type: ignore[no-untyped-def]
    """Two slots, alice limited to one running job: her second job waits (its timeline
    says why) while bob's runs on the free slot; once her first is done, the reconciler
    offers the waiting one again and it runs."""
    from tests.conftest import WorkerProcess

    alice, bob = as_user(app, users.alice), as_user(app, users.bob)

    def get(path: str) -> dict[str, Any]:
        return alice.get(path).get_json()

    def get_bob(path: str) -> dict[str, Any]:
        return bob.get(path).get_json()

    def submit(client, **spec: Any) -> int:  # type: ignore[no-untyped-def]
        resp = client.post("/api/v1/jobs", json=train_spec(model=SMALL_MLP, **spec))
        assert resp.status_code == 201, resp.get_json()
        return resp.get_json()["id"]

    worker = WorkerProcess(limited, tmp_path / "worker.log", concurrency=2)
    url = limited.resolved_database_url
    try:
        worker.wait_ready()
        long_job = submit(alice, epochs=400)
        wait_for_state(get, long_job, {"running"})
        waiting = submit(alice, epochs=1)
        bobs = submit(bob, epochs=1)
        assert wait_for_state(get_bob, bobs, {"succeeded", "failed"})["state"] == "succeeded"
        deadline = utcnow() + timedelta(seconds=60)
        while not job_events(url, waiting) and utcnow() < deadline:
            threading.Event().wait(0.2)
        [(kind, message)] = job_events(url, waiting)
        assert kind == "deferred" and "alice is at the limit of 1 running jobs" in message
        assert get(f"/api/v1/jobs/{waiting}")["state"] == "queued"

        assert alice.post(f"/api/v1/jobs/{long_job}/cancel").status_code < 300
        wait_for_state(get, long_job, {"cancelled"})
        celery = make_celery(limited)
        try:
            later = utcnow() + timedelta(seconds=limited.requeue_after_seconds + 1)
            assert reconcile_once(limited, celery, now=later).job_ids["republished"] == [waiting]
        finally:
            celery.close()
        assert wait_for_state(get, waiting, {"succeeded", "failed"})["state"] == "succeeded"
        assert worker.proc.poll() is None
    finally:
        worker.stop()
