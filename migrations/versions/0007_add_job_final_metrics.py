"""add job_final_metrics: a row per final metric of a succeeded job (the leaderboard's index)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 10:00:00
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

MAX_KEY_LENGTH = 64
BATCH = 2000


def upgrade() -> None:
    job_final_metrics = op.create_table(
        "job_final_metrics",
        sa.Column("job_id", BigId, nullable=False),
        sa.Column("key", sa.String(length=MAX_KEY_LENGTH), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("dataset_name", sa.String(length=64), nullable=True),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "key"),
    )
    _backfill(job_final_metrics)
    # After the backfill: one index build instead of an update per inserted row.
    op.create_index(
        "ix_job_final_metrics_rank",
        "job_final_metrics",
        ["dataset_name", "key", "value", "job_id"],
    )


def _metrics(result: Any) -> dict[str, float]:
    """What shared.state_machine.final_metrics keeps: finite numbers, not bools."""
    metrics = result.get("metrics") if isinstance(result, dict) else None
    if not isinstance(metrics, dict):
        return {}
    return {
        key: number
        for key, value in metrics.items()
        if isinstance(key, str)
        and 0 < len(key) <= MAX_KEY_LENGTH
        and (number := _finite(value)) is not None
    }


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)  # an int too big for a float raises
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _metric_rows(conn: sa.Connection) -> Iterator[list[dict[str, Any]]]:
    # The result column read as JSON by SQLAlchemy, so both backends decode it the same
    # way (a NaN that Python's json wrote included); keyset batches keep memory flat.
    jobs = sa.table(
        "jobs",
        sa.column("id", BigId),
        sa.column("state", sa.String),
        sa.column("kind", sa.String),
        sa.column("dataset_name", sa.String),
        sa.column("result", sa.JSON),
    )
    last = 0
    while True:
        batch = conn.execute(
            sa.select(jobs.c.id, jobs.c.kind, jobs.c.dataset_name, jobs.c.result)
            .where(jobs.c.id > last, jobs.c.state == "succeeded")
            .order_by(jobs.c.id)
            .limit(BATCH)
        ).all()
        if not batch:
            return
        last = batch[-1].id
        rows = [
            {"job_id": job_id, "key": key, "value": value, "dataset_name": dataset, "kind": kind}
            for job_id, kind, dataset, result in batch
            for key, value in _metrics(result).items()
        ]
        if rows:
            yield rows


def _backfill(job_final_metrics: sa.Table) -> None:
    conn = op.get_bind()
    for rows in _metric_rows(conn):
        conn.execute(job_final_metrics.insert(), rows)


def downgrade() -> None:
    op.drop_index("ix_job_final_metrics_rank", table_name="job_final_metrics")
    op.drop_table("job_final_metrics")
