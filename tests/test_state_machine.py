"""Compare-and-set transitions on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import update

from shared.db import transaction, utcnow
from shared.orm import Job
from shared.state_machine import (
    JobState,
    can_transition,
    claim_job,
    finish_job,
    renew_lease,
    request_cancel,
    requeue_job,
)


def make_job(url: str, **values: object) -> int:
    with transaction(url) as s:
        job = Job(
            kind="train",
            state="queued",
            queue="cpu",
            spec={"kind": "train"},
            max_attempts=3,
            **values,
        )
        s.add(job)
        s.flush()
        return job.id


def state_of(url: str, job_id: int) -> Job:
    with transaction(url) as s:
        return s.get(Job, job_id)


def test_transition_table() -> None:
    assert can_transition("queued", "running")
    assert not can_transition("succeeded", "running")
    assert not can_transition("cancelled", "queued")


def test_claim_once(db_url: str) -> None:
    job_id = make_job(db_url)
    with transaction(db_url) as s:
        first = claim_job(s, job_id, "w1", 30)
    with transaction(db_url) as s:
        second = claim_job(s, job_id, "w2", 30)
    assert first is not None and first.attempt == 1
    assert second is None  # live lease: a duplicate delivery does nothing
    job = state_of(db_url, job_id)
    assert job.state == "running" and job.worker == "w1" and job.attempt == 1


def test_concurrent_claims_one_winner(db_url: str) -> None:
    job_id = make_job(db_url)
    results: list[object] = []
    barrier = threading.Barrier(4)

    def claim(name: str) -> None:
        barrier.wait()
        with transaction(db_url) as s:
            results.append(claim_job(s, job_id, name, 30))

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is not None for r in results) == 1
    assert state_of(db_url, job_id).attempt == 1


def test_expired_lease_is_reclaimed_and_fences_the_old_attempt(db_url: str) -> None:
    job_id = make_job(db_url)
    with transaction(db_url) as s:
        old = claim_job(s, job_id, "w1", 30)
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    with transaction(db_url) as s:
        new = claim_job(s, job_id, "w2", 30)
    assert old and new and new.attempt == old.attempt + 1
    with transaction(db_url) as s:
        assert not renew_lease(s, job_id, old.attempt, 30).owned
        assert not finish_job(s, job_id, old.attempt, JobState.SUCCEEDED, result={"zombie": True})
        assert renew_lease(s, job_id, new.attempt, 30).owned
        assert finish_job(s, job_id, new.attempt, JobState.SUCCEEDED, result={"ok": True})
    job = state_of(db_url, job_id)
    assert job.state == "succeeded" and job.result == {"ok": True}


def test_attempts_are_capped(db_url: str) -> None:
    job_id = make_job(db_url, attempt=3)
    with transaction(db_url) as s:
        assert claim_job(s, job_id, "w1", 30) is None


def test_finish_only_once(db_url: str) -> None:
    job_id = make_job(db_url)
    with transaction(db_url) as s:
        claim = claim_job(s, job_id, "w1", 30)
        assert claim
        assert finish_job(
            s, job_id, claim.attempt, JobState.FAILED, error_type="ValueError", error_message="x"
        )
        assert not finish_job(s, job_id, claim.attempt, JobState.SUCCEEDED)
    with pytest.raises(ValueError), transaction(db_url) as s:
        finish_job(s, job_id, 1, JobState.RUNNING)


def test_cancel_queued_is_immediate_and_blocks_claims(db_url: str) -> None:
    job_id = make_job(db_url)
    with transaction(db_url) as s:
        assert request_cancel(s, job_id) == "cancelled"
    with transaction(db_url) as s:
        assert claim_job(s, job_id, "w1", 30) is None
        assert request_cancel(s, 999_999) is None
    assert state_of(db_url, job_id).finished_at is not None


def test_cancel_running_sets_flag_seen_by_heartbeat(db_url: str) -> None:
    job_id = make_job(db_url)
    with transaction(db_url) as s:
        claim = claim_job(s, job_id, "w1", 30)
    with transaction(db_url) as s:
        assert request_cancel(s, job_id) == "running"
    with transaction(db_url) as s:
        hb = renew_lease(s, job_id, claim.attempt, 30)
    assert hb.owned and hb.cancel_requested


def test_requeue_hands_job_back(db_url: str) -> None:
    job_id = make_job(db_url)
    with transaction(db_url) as s:
        claim = claim_job(s, job_id, "w1", 30)
        assert requeue_job(s, job_id, claim.attempt, "worker shutting down")
    with transaction(db_url) as s:
        again = claim_job(s, job_id, "w2", 30)
    assert again and again.attempt == 2


def test_transitions_write_the_job_timeline(db_url: str) -> None:
    from shared.job_events import job_events

    job_id = make_job(db_url)
    with transaction(db_url) as s:
        assert claim_job(s, job_id, "host-a:1", lease_seconds=30)
    with transaction(db_url) as s:
        assert requeue_job(s, job_id, 1, "lease expired")
        assert not requeue_job(s, job_id, 1, "again")  # lost CAS: no event either
    with transaction(db_url) as s:
        assert claim_job(s, job_id, "host-b:2", lease_seconds=30)
    with transaction(db_url) as s:
        assert request_cancel(s, job_id) == "running"
        assert request_cancel(s, job_id) == "running"  # already flagged: one event
    with transaction(db_url) as s:
        assert finish_job(s, job_id, 2, JobState.CANCELLED, error_message="cancelled")
        assert not finish_job(s, job_id, 1, JobState.FAILED, error_message="zombie")
    with transaction(db_url) as s:
        events = [(e.kind, e.attempt, e.worker, e.message) for e in job_events(s, job_id)]
    assert events == [
        ("claimed", 1, "host-a:1", None),
        ("requeued", 1, None, "lease expired"),
        ("claimed", 2, "host-b:2", None),
        ("cancel_requested", None, None, None),
        ("cancelled", 2, None, "cancelled"),
    ]
