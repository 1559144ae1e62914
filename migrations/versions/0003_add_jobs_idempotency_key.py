"""add jobs idempotency key

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 13:34:22.028598
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A nullable column and a separate unique index: SQLite can add both without
    # copying the table (ALTER TABLE ... ADD COLUMN cannot carry UNIQUE there).
    op.add_column("jobs", sa.Column("idempotency_key", sa.String(length=200), nullable=True))
    op.create_index("ix_jobs_idempotency_key", "jobs", ["idempotency_key"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_jobs_idempotency_key", table_name="jobs")
    op.drop_column("jobs", "idempotency_key")
