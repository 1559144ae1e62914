"""add jobs.preempt_requested_by and jobs.preempted_at (scheduler preemption)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 17:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # No foreign key: the preemptor is only named on the victim's timeline, and a
    # deleted preemptor must not block anything.
    op.add_column("jobs", sa.Column("preempt_requested_by", sa.BigInteger(), nullable=True))
    op.add_column("jobs", sa.Column("preempted_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "preempted_at")
    op.drop_column("jobs", "preempt_requested_by")
