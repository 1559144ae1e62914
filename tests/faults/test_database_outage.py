"""The database goes away for a few seconds mid-job (issue 4, scenario 9; docs/architecture.md "Reliability" R8)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa
import torch
from sqlalchemy.engine import make_url

from tests.conftest import PG_ADMIN_URL
from tests.faults.conftest import Cluster, long_spec, worker_logs

pytestmark = pytest.mark.integration

OUTAGE_SECONDS = 3.0


@contextmanager
def database_outage(db_url: str) -> Iterator[None]:
    """No writes to the job's database while inside.

    PostgreSQL: the database refuses new connections and every open one is terminated.
    SQLite: this process holds the write lock (BEGIN EXCLUSIVE), so every other writer
    waits; nothing fails outright, because the engine's busy timeout (30 s) outlasts
    the outage, which is exactly how a long writer looks to the others.
    """
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite":
        lock = sqlite3.connect(url.database, timeout=10, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        try:
            probe = sqlite3.connect(url.database, timeout=0, isolation_level=None)
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                probe.execute("BEGIN IMMEDIATE")
            probe.close()
            yield
        finally:
            lock.execute("COMMIT")
            lock.close()
        return

    name = url.database
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false'))
            try:
                conn.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": name},
                )
                probe = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
                with pytest.raises(sa.exc.OperationalError), probe.connect():
                    pass
                probe.dispose()
                yield
            finally:
                conn.execute(sa.text(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true'))
    finally:
        admin.dispose()


def checkpoint_epoch(cluster: Cluster, job_id: int) -> int:
    return int(
        torch.load(cluster.checkpoint(job_id, 1), map_location="cpu", weights_only=True)["epoch"]
    )


@pytest.mark.timings(lease_seconds=10.0)
def test_database_outage_mid_job_buffers_metrics_and_completes(
    cluster: Cluster, db_url: str
) -> None:
    """Training goes on while the database is away (no connection is held through the
    loop); metric points and progress wait in the sink and are written afterwards; the
    heartbeat misses a few beats, fewer than a lease's worth, so the attempt goes on; the
    reconciler survives its failed passes. One attempt, every epoch's metrics once."""
    epochs = 45  # still training when the outage ends
    cluster.start_worker()
    cluster.start_reconciler()
    job_id = cluster.submit(long_spec(epochs=epochs))
    cluster.wait_training(job_id, 1)
    assert cluster.checkpoint(job_id, 1).parent.is_dir()

    with database_outage(db_url):
        started = time.monotonic()
        epoch_before = (
            checkpoint_epoch(cluster, job_id) if cluster.checkpoint(job_id, 1).exists() else 0
        )
        time.sleep(OUTAGE_SECONDS)
        epoch_after = checkpoint_epoch(cluster, job_id)
        assert time.monotonic() - started < OUTAGE_SECONDS + 2
    assert epoch_after > epoch_before, "training stalled while the database was away"
    assert epoch_after < epochs, "the job ended during the outage; make it longer"

    job = cluster.wait_state(job_id, {"succeeded", "failed", "cancelled"}, timeout=90)
    assert job.state == "succeeded", cluster.describe(job_id)
    assert job.attempt == 1, cluster.describe(job_id)
    # Points logged during the outage were written afterwards, each once.
    assert cluster.epochs_logged(job_id, 1) == list(range(1, epochs + 1))
    assert cluster.epochs_logged(job_id, 1, key="train_loss") == list(range(1, epochs + 1))
    if db_url.startswith("postgresql"):
        logs = worker_logs(cluster.tmp_path)
        assert "heartbeat failed" in logs or "flush failed" in logs, "the outage went unnoticed"
