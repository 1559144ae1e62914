"""add code_bundles (script jobs' code) and users.can_run_code

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03 04:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN (SQLite takes it with a constant default), not a batch copy: a
    # batch recreates `users`, and dropping the old table fails its foreign keys
    # (api_tokens, jobs, uploads point at it) once the database holds rows.
    op.add_column(
        "users",
        sa.Column("can_run_code", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.create_table(
        "code_bundles",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("owner_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  sa.ForeignKey("users.id"), nullable=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("archive_format", sa.String(16), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("unpacked_bytes", sa.BigInteger(), nullable=False),
        sa.Column("file_count", sa.Integer(), nullable=False),
        sa.Column("python_files", sa.JSON(), nullable=False),
        sa.Column("has_requirements", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )  # fmt: skip
    op.create_index(
        "ix_code_bundles_owner_sha256", "code_bundles", ["owner_id", "sha256"], unique=True
    )
    op.create_index("ix_code_bundles_sha256", "code_bundles", ["sha256"])


def downgrade() -> None:
    op.drop_index("ix_code_bundles_sha256", "code_bundles")
    op.drop_index("ix_code_bundles_owner_sha256", "code_bundles")
    op.drop_table("code_bundles")
    op.drop_column("users", "can_run_code")  # SQLite >= 3.35 drops a column in place
