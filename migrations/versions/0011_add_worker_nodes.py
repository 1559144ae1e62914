"""add worker_nodes (cordon/drain) and worker_slot_guards (crash guard)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 23:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Keyed by the Celery node name, not by a worker row: the state must exist before a
    # node starts (cordon it first) and outlive its restarts.
    op.create_table(
        "worker_nodes",
        sa.Column("node", sa.String(255), primary_key=True),
        sa.Column("cordoned", sa.Boolean(), nullable=False),
        sa.Column("draining", sa.Boolean(), nullable=False),
        sa.Column("drain_now", sa.Boolean(), nullable=False),
        sa.Column("changed_by", sa.String(64), nullable=True),
        sa.Column("changed_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "worker_slot_guards",
        sa.Column("node", sa.String(255), primary_key=True),
        sa.Column("slot", sa.Integer(), primary_key=True),
        sa.Column("quick_deaths", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("stopped_at", sa.DateTime(), nullable=True),
        sa.Column("stopped_reason", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("worker_slot_guards")
    op.drop_table("worker_nodes")
