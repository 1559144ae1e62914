"""add users.session_version and users.limits, jobs.artifacts_deleted_at,
uploads.storage_format; idempotency keys unique per owner instead of globally

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 16:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # ADD COLUMN with a constant default: neither database copies the table.
    op.add_column(
        "users",
        sa.Column("session_version", sa.Integer(), nullable=False, server_default="0"),
    )
    op.add_column("users", sa.Column("limits", sa.JSON(), nullable=True))
    op.add_column("jobs", sa.Column("artifacts_deleted_at", sa.DateTime(), nullable=True))
    # Uploads stored before this revision are the CSV file itself.
    op.add_column(
        "uploads",
        sa.Column("storage_format", sa.String(length=32), nullable=False, server_default="csv"),
    )
    # A key names a submission of one user: another user's key is none of their business
    # (a global key revealed the owner's job id and could be squatted).
    op.drop_index("ix_jobs_idempotency_key", table_name="jobs")
    op.create_index(
        "ix_jobs_owner_idempotency_key", "jobs", ["owner_id", "idempotency_key"], unique=True
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_owner_idempotency_key", table_name="jobs")
    op.create_index("ix_jobs_idempotency_key", "jobs", ["idempotency_key"], unique=True)
    op.drop_column("uploads", "storage_format")
    op.drop_column("jobs", "artifacts_deleted_at")
    op.drop_column("users", "limits")
    op.drop_column("users", "session_version")
