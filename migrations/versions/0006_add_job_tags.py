"""add job tags (a row per tag) and the job list's indexes

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29 10:00:00
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# What the spec allows (shared/spec.py); older rows are trusted no further than that.
MAX_TAG_LENGTH = 64
BATCH = 2000

JOB_INDEXES = {
    "ix_jobs_model_id": ["model_name", "id"],
    "ix_jobs_dataset_id": ["dataset_name", "id"],
    "ix_jobs_name_id": ["name", "id"],
    "ix_jobs_state_dataset_id": ["state", "dataset_name", "id"],
}


def upgrade() -> None:
    job_tags = op.create_table(
        "job_tags",
        sa.Column("job_id", BigId, nullable=False),
        sa.Column("tag", sa.String(length=MAX_TAG_LENGTH), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "tag"),
    )
    _backfill(job_tags)
    # After the backfill: one index build instead of an update per inserted row.
    op.create_index("ix_job_tags_tag_job_id", "job_tags", ["tag", "job_id"])
    for name, columns in JOB_INDEXES.items():
        op.create_index(name, "jobs", columns)


def _tags(spec: Any) -> list[str]:
    tags = spec.get("tags") if isinstance(spec, dict) else None
    if not isinstance(tags, list):
        return []
    # dict.fromkeys: a spec may repeat a tag; the primary key takes it once.
    return list(
        dict.fromkeys(t for t in tags if isinstance(t, str) and 0 < len(t) <= MAX_TAG_LENGTH)
    )


def _tag_rows(conn: sa.Connection) -> Iterator[list[dict[str, Any]]]:
    # The spec column read as JSON by SQLAlchemy, so both backends decode it the same
    # way; keyset batches keep memory flat on a big table.
    jobs = sa.table("jobs", sa.column("id", BigId), sa.column("spec", sa.JSON))
    last = 0
    while True:
        batch = conn.execute(
            sa.select(jobs.c.id, jobs.c.spec)
            .where(jobs.c.id > last)
            .order_by(jobs.c.id)
            .limit(BATCH)
        ).all()
        if not batch:
            return
        last = batch[-1].id
        rows = [{"job_id": job_id, "tag": tag} for job_id, spec in batch for tag in _tags(spec)]
        if rows:
            yield rows


def _backfill(job_tags: sa.Table) -> None:
    conn = op.get_bind()
    for rows in _tag_rows(conn):
        conn.execute(job_tags.insert(), rows)


def downgrade() -> None:
    for name in JOB_INDEXES:
        op.drop_index(name, table_name="jobs")
    op.drop_index("ix_job_tags_tag_job_id", table_name="job_tags")
    op.drop_table("job_tags")
