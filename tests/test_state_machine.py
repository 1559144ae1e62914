"""Compare-and-set transitions on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from shared.db import transaction, utcnow
from shared.job_states import FINISHED_STATES
from shared.orm import Job, JobEvent
from shared.state_machine import (
    TRANSITIONS,
    JobState,
    can_transition,
    claim_job,
    finish_job,
    hand_back_preempted,
    renew_lease,
    request_cancel,
    request_preemption,
    requeue_job,
)


def make_job(url: str, **values: object) -> int:
    with transaction(url) as s:
        job = Job(
            kind="train",
            state="queued",
            queue="cpu",
            spec={"kind": "train"},
            **{"max_attempts": 3, **values},
        )
        s.add(job)
        s.flush()
        return job.id


def state_of(url: str, job_id: int) -> Job:
    with transaction(url) as s:
        return s.get(Job, job_id)


def test_transition_table() -> None:
    allowed = {
        (src.value, dst.value) for src in JobState for dst in JobState if can_transition(src, dst)
    }
    assert allowed == {
        ("queued", "running"),
        ("running", "running"),  # a reclaim, once the lease expired
        ("running", "succeeded"),
        ("running", "failed"),
        ("running", "cancelled"),
        ("running", "queued"),
        ("queued", "cancelled"),
        ("queued", "failed"),
    }
    assert not any(can_transition(done, other) for done in FINISHED_STATES for other in JobState)


def test_the_table_writes_the_compare_and_set() -> None:
    """Each transition's UPDATE checks its source states and sets its target: the table
    cannot say one thing while the SQL does another."""
    for transition in TRANSITIONS:
        sql = str(
            transition.update(Job.id == 1, updated_at=utcnow()).compile(
                compile_kwargs={"literal_binds": True}
            )
        )
        where = sql.split(" WHERE ", 1)[1]
        for src in transition.sources:
            assert f"'{src.value}'" in where, (transition, sql)
        assert f"state='{transition.target.value}'" in sql.replace(" ", ""), (transition, sql)


def _expire(url: str, job_id: int) -> None:
    with transaction(url) as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=5))
        )


def test_expire_lease_requeues_fails_or_cancels(db_url: str) -> None:
    from shared.state_machine import expire_lease

    requeued, last, cancelled, renewed = (make_job(db_url, max_attempts=2) for _ in range(4))
    with transaction(db_url) as s:
        for job_id in (requeued, last, cancelled, renewed):
            assert claim_job(s, job_id, "host:1", 30)
        s.execute(update(Job).where(Job.id == last).values(attempt=2))
        assert request_cancel(s, cancelled) == "running"
    for job_id in (requeued, last, cancelled, renewed):
        _expire(db_url, job_id)
    with transaction(db_url) as s:
        # A heartbeat renews `renewed` between the reconciler's read and its UPDATE.
        assert renew_lease(s, renewed, 1, 30).owned
    now = utcnow()
    with transaction(db_url) as s:
        outcomes = {
            job_id: expire_lease(s, job_id, attempt, 2, "host:1", now)
            for job_id, attempt in ((requeued, 1), (last, 2), (cancelled, 1), (renewed, 1))
        }
    assert outcomes[requeued] is not None and outcomes[requeued].action == "requeued"
    assert outcomes[last] is not None and outcomes[last].action == "failed"
    assert outcomes[cancelled] is not None and outcomes[cancelled].action == "cancelled"
    assert outcomes[renewed] is None
    jobs = {job_id: state_of(db_url, job_id) for job_id in outcomes}
    assert (jobs[requeued].state, jobs[requeued].worker, jobs[requeued].attempt) == (
        "queued",
        None,
        1,
    )
    assert jobs[last].state == "failed" and jobs[last].error_type == "WorkerLost"
    assert "last seen on host:1" in jobs[last].error_message
    assert jobs[cancelled].state == "cancelled" and jobs[cancelled].finished_at is not None
    assert jobs[renewed].state == "running"
    with transaction(db_url) as s:  # a second reconciler acting on what it saw: no-op
        assert expire_lease(s, requeued, 1, 2, "host:1", now) is None


def test_settle_unclaimable_and_mark_for_republish(db_url: str) -> None:
    from shared.state_machine import mark_for_republish, settle_unclaimable

    spent = make_job(db_url, attempt=3)
    flagged = make_job(db_url, cancel_requested=True)
    fine = make_job(db_url)
    now = utcnow()
    with transaction(db_url) as s:
        assert settle_unclaimable(s, spent, 3, 3, "lease expired", now).action == "failed"
        assert settle_unclaimable(s, flagged, 0, 3, None, now).action == "cancelled"
        assert settle_unclaimable(s, fine, 0, 3, None, now) is None
    assert state_of(db_url, spent).error_type == "AttemptsExhausted"
    later = now + timedelta(seconds=60)
    with transaction(db_url) as s:
        assert not mark_for_republish(s, fine, stale_before=now - timedelta(seconds=60), now=now)
        assert mark_for_republish(s, fine, stale_before=later, now=later)
        # Touched: a second reconciler with the same cutoff no longer sees it as stale.
        assert not mark_for_republish(s, fine, stale_before=later, now=later)
        assert not mark_for_republish(s, spent, stale_before=later, now=later)


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


def test_preemption_is_flagged_once_seen_by_heartbeat_and_hands_back(db_url: str) -> None:
    victim, preemptor = make_job(db_url, max_attempts=1), make_job(db_url)
    with transaction(db_url) as s:
        claim = claim_job(s, victim, "w1", 30)
    with transaction(db_url) as s:
        assert request_preemption(s, victim, claim.attempt, preemptor)
        # Once per attempt: a second request (another reconciler) misses.
        assert not request_preemption(s, victim, claim.attempt, preemptor + 1)
    with transaction(db_url) as s:
        hb = renew_lease(s, victim, claim.attempt, 30)
    assert hb.owned and hb.preempted_by == preemptor and not hb.cancel_requested
    with transaction(db_url) as s:
        assert hand_back_preempted(s, victim, claim.attempt, preemptor)
    job = state_of(db_url, victim)
    assert job.state == "queued" and job.preempt_requested_by is None
    assert job.preempted_at is not None and job.error_message == f"preempted by job {preemptor}"
    # No attempt used up, even on the last one: it can be claimed again.
    with transaction(db_url) as s:
        again = claim_job(s, victim, "w2", 30)
    assert again is not None and again.attempt == 2
    with transaction(db_url) as s:
        events = s.execute(
            select(JobEvent.kind, JobEvent.message)
            .where(JobEvent.job_id == victim)
            .order_by(JobEvent.id)
        ).all()
    assert [tuple(e) for e in events] == [
        ("claimed", None),
        ("preempt_requested", f"to make room for job {preemptor}"),
        ("preempted", f"preempted by job {preemptor}"),
        ("claimed", None),
    ]


def test_a_preemption_whose_preemptor_no_longer_waits_is_withdrawn(db_url: str) -> None:
    victim, preemptor = make_job(db_url), make_job(db_url)
    with transaction(db_url) as s:
        claim = claim_job(s, victim, "w1", 30)
        assert request_preemption(s, victim, claim.attempt, preemptor)
    with transaction(db_url) as s:
        claim_job(s, preemptor, "w2", 30)  # it started elsewhere meanwhile
    with transaction(db_url) as s:
        hb = renew_lease(s, victim, claim.attempt, 30)
    assert hb.owned and hb.preempted_by is None
    assert state_of(db_url, victim).preempt_requested_by is None


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
