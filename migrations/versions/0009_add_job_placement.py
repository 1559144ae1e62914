"""add jobs.placement: where the current attempt runs (host, worker slot, GPUs)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 17:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("placement", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "placement")
