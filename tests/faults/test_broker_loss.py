"""The broker loses (or never gets) a queued job's message (issue 4, scenarios 5, 6, 7)."""

from __future__ import annotations

from collections import Counter

import pytest
import redis

from shared.celery_app import task_id_for
from tests.conftest import ON_POSTGRESQL, SQLITE_ONLY
from tests.faults.conftest import Cluster, long_spec, small_spec, task_outcomes, wait_for

pytestmark = pytest.mark.integration


@ON_POSTGRESQL
def test_redis_restart_with_aof_loses_nothing(cluster: Cluster) -> None:
    """5. Redis restarts (AOF on) while jobs wait and no worker runs: the messages
    survive, a worker started afterwards runs them all, and when Redis restarts again
    under that worker while it trains, the job completes and the worker goes on
    consuming. No reconciler runs here, so nothing but
    Redis's own persistence can bring a message back."""
    ids = [cluster.submit(small_spec(seed=i)) for i in range(3)]
    waiting = Counter(cluster.broker_task_ids())
    assert all(waiting[task_id_for(i)] == 1 for i in ids), waiting

    cluster.redis.stop()
    cluster.redis.start()
    assert Counter(cluster.broker_task_ids()) == waiting, "messages lost in the restart"

    worker = cluster.start_worker()
    for job_id in ids:
        job = cluster.wait_state(job_id, {"succeeded", "failed", "cancelled"}, timeout=60)
        assert job.state == "succeeded" and job.attempt == 1, cluster.describe(job_id)

    # Restart under a worker that is running a job: the job finishes, its worker
    # reconnects and takes the next one.
    running = cluster.submit(long_spec(epochs=12))
    cluster.wait_training(running, 1)
    cluster.redis.stop()
    cluster.redis.start()
    late = cluster.submit(small_spec(seed=9))
    for job_id in (running, late):
        job = cluster.wait_state(job_id, {"succeeded", "failed", "cancelled"}, timeout=90)
        assert job.state == "succeeded" and job.attempt == 1, cluster.describe(job_id)
    assert worker.proc.poll() is None


@SQLITE_ONLY
def test_flushed_redis_jobs_are_republished_and_run_once(cluster: Cluster) -> None:
    """6. Redis loses every message (FLUSHALL: a restart without persistence): the
    reconciler publishes the queued jobs again and each runs exactly once."""
    cluster.start_reconciler()
    ids = [cluster.submit(small_spec(seed=i)) for i in range(3)]
    assert {task_id_for(i) for i in ids} <= set(cluster.broker_task_ids())

    client = redis.Redis.from_url(cluster.redis.url)
    client.flushall()
    client.close()
    assert cluster.broker_task_ids() == []

    cluster.start_worker()
    for job_id in ids:
        job = cluster.wait_state(job_id, {"succeeded", "failed", "cancelled"}, timeout=60)
        assert job.state == "succeeded" and job.attempt == 1, cluster.describe(job_id)
        # Celery logs the task's return value just after the runner committed the state.
        logged = wait_for(
            lambda job_id=job_id: task_outcomes(cluster.tmp_path).get(job_id, {}).get("succeeded"),
            10,
            "the worker to log the task's outcome",
        )
        assert logged == 1


@SQLITE_ONLY
def test_job_committed_but_never_published_is_enqueued_by_the_reconciler(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """7. The server commits the job row and dies before publishing its message (here:
    the publish raises, as it would if the process were killed at that line). The job
    is `queued` with nothing in Redis; the reconciler publishes it and it runs once."""
    import server.enqueue

    calls: list[int] = []

    def die_before_publish(celery, job_id, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(job_id)
        raise ConnectionError("server process killed between commit and enqueue")

    monkeypatch.setattr(server.enqueue, "publish_job", die_before_publish)
    cluster.start_worker()
    job_id = cluster.submit(small_spec())
    assert calls == [job_id], "the injected fault was not reached"
    assert cluster.job(job_id).state == "queued"
    assert task_id_for(job_id) not in cluster.broker_task_ids()

    cluster.start_reconciler()
    job = cluster.wait_state(job_id, {"succeeded", "failed", "cancelled"}, timeout=60)
    assert job.state == "succeeded" and job.attempt == 1, cluster.describe(job_id)
