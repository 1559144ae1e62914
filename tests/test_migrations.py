"""The Alembic revisions build exactly the schema the ORM models describe."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from shared.db import make_engine
from shared.migrate import upgrade_database
from shared.orm import Base
from tests.conftest import DB_PARAMS, PG_ADMIN_URL


@pytest.fixture(params=DB_PARAMS)
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'nested' / 'db.sqlite'}"
        return
    name = f"trainyard_mig_{secrets.token_hex(4)}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield admin.url.set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_upgrade_matches_models_and_is_repeatable(empty_db_url: str) -> None:
    upgrade_database(empty_db_url)
    upgrade_database(empty_db_url)  # a second upgrade is a no-op, as `trainyard up` relies on
    engine = make_engine(empty_db_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        version = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()
    engine.dispose()
    assert diff == [], diff
    assert version


def test_sqlite_file_uses_wal(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'wal.db'}"
    upgrade_database(url)
    engine = make_engine(url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("PRAGMA journal_mode")).scalar_one() == "wal"
    engine.dispose()
    assert os.path.exists(tmp_path / "wal.db")


def test_code_bundles_migration_keeps_a_populated_database(empty_db_url: str) -> None:
    """0012 on a database that holds users with tokens, jobs and uploads pointing at
    them: a batch copy of `users` failed here on SQLite (dropping the old table broke
    its foreign keys); up and down again, the rows stay."""
    from alembic import command

    from shared.migrate import alembic_config

    config = alembic_config(empty_db_url)
    upgrade_database(empty_db_url, "0011")
    engine = make_engine(empty_db_url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO users (id, username, role, is_active, created_at, session_version) "
                "VALUES (1, 'alice', 'member', true, CURRENT_TIMESTAMP, 0)"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO api_tokens (id, user_id, name, token_hash, prefix, created_at) "
                "VALUES (1, 1, 't', 'h', 'p', CURRENT_TIMESTAMP)"
            )
        )
        conn.execute(sa.text(
            "INSERT INTO jobs (id, owner_id, kind, state, queue, priority, spec, attempt, "
            "max_attempts, cancel_requested, created_at, updated_at) VALUES (1, 1, 'train', "
            "'queued', 'cpu', 5, '{}', 0, 3, false, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
        ))  # fmt: skip
    upgrade_database(empty_db_url)
    with engine.begin() as conn:
        row = conn.execute(sa.text("SELECT username, can_run_code FROM users")).one()
        assert (row.username, bool(row.can_run_code)) == ("alice", False)
        assert conn.execute(sa.text("SELECT count(*) FROM api_tokens")).scalar() == 1
    command.downgrade(config, "0011")
    with engine.begin() as conn:
        assert conn.execute(sa.text("SELECT username FROM users")).scalar() == "alice"
        assert conn.execute(sa.text("SELECT count(*) FROM jobs")).scalar() == 1
    engine.dispose()
