"""add the model registry: registered_models, model_versions, model_stage_events

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
PRODUCTION = sa.text("stage = 'production'")


def upgrade() -> None:
    op.create_table(
        "registered_models",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("owner_id", BigId, sa.ForeignKey("users.id"), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("last_version", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_registered_models_name", "registered_models", ["name"], unique=True)
    op.create_index("ix_registered_models_owner_id", "registered_models", ["owner_id", "id"])
    op.create_table(
        "model_versions",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column(
            "model_id",
            BigId,
            sa.ForeignKey("registered_models.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("job_id", BigId, sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("job_kind", sa.String(16), nullable=False),
        sa.Column("model_file", sa.String(255), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("created_by", BigId, sa.ForeignKey("users.id"), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_index(
        "ix_model_versions_model_version", "model_versions", ["model_id", "version"], unique=True
    )
    op.create_index("ix_model_versions_job_id", "model_versions", ["job_id"])
    # A partial unique index (both databases have them): one production version a model.
    op.create_index(
        "ix_model_versions_one_production", "model_versions", ["model_id"], unique=True,
        postgresql_where=PRODUCTION, sqlite_where=PRODUCTION,
    )  # fmt: skip
    op.create_table(
        "model_stage_events",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column(
            "version_id",
            BigId,
            sa.ForeignKey("model_versions.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("from_stage", sa.String(16), nullable=True),
        sa.Column("to_stage", sa.String(16), nullable=False),
        sa.Column("user_id", BigId, sa.ForeignKey("users.id"), nullable=True),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
    )
    op.create_index("ix_model_stage_events_version_id", "model_stage_events", ["version_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_model_stage_events_version_id", "model_stage_events")
    op.drop_table("model_stage_events")
    op.drop_index("ix_model_versions_one_production", "model_versions")
    op.drop_index("ix_model_versions_job_id", "model_versions")
    op.drop_index("ix_model_versions_model_version", "model_versions")
    op.drop_table("model_versions")
    op.drop_index("ix_registered_models_owner_id", "registered_models")
    op.drop_index("ix_registered_models_name", "registered_models")
    op.drop_table("registered_models")
