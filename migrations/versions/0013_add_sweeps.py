"""add sweeps and sweep_trials

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03 05:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "sweeps",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("owner_id", BigId, sa.ForeignKey("users.id"), nullable=True),
        sa.Column("name", sa.String(200), nullable=True),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("controller", sa.String(200), nullable=True),
        sa.Column("controller_lease_expires_at", sa.DateTime(), nullable=True),
        sa.Column("controller_epoch", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
    )
    op.create_index("ix_sweeps_state_id", "sweeps", ["state", "id"])
    op.create_index("ix_sweeps_owner_id", "sweeps", ["owner_id", "id"])
    op.create_table(
        "sweep_trials",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column(
            "sweep_id", BigId, sa.ForeignKey("sweeps.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("job_id", BigId, sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("pruned_at_epoch", sa.Integer(), nullable=True),
        sa.Column("prune_reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_index(
        "ix_sweep_trials_sweep_number", "sweep_trials", ["sweep_id", "number"], unique=True
    )
    op.create_index("ix_sweep_trials_job_id", "sweep_trials", ["job_id"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_sweep_trials_job_id", "sweep_trials")
    op.drop_index("ix_sweep_trials_sweep_number", "sweep_trials")
    op.drop_table("sweep_trials")
    op.drop_index("ix_sweeps_owner_id", "sweeps")
    op.drop_index("ix_sweeps_state_id", "sweeps")
    op.drop_table("sweeps")
