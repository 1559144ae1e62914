"""Fixtures: a fresh database per test on SQLite and on PostgreSQL, a private Redis
server per test session, a live HTTP server, and real `celery worker` subprocesses.

PostgreSQL is found at TRAINYARD_TEST_PG_URL (default: the machine's local server,
trust auth). Set TRAINYARD_TEST_SKIP_PG=1 to run the SQLite half only.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from werkzeug.serving import make_server

from shared import accounts
from shared.db import get_engine, transaction
from shared.orm import Base
from shared.settings import Settings

PG_ADMIN_URL = os.environ.get(
    "TRAINYARD_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REPO = Path(__file__).resolve().parent.parent

DB_PARAMS = (
    ["sqlite"] if os.environ.get("TRAINYARD_TEST_SKIP_PG") == "1" else ["sqlite", "postgresql"]
)


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A PostgreSQL database holding the schema, copied for each test: a template copy
    takes ~25 ms where CREATE DATABASE plus create_all takes ~180 ms, hundreds of times."""
    name = f"trainyard_template_{secrets.token_hex(4)}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine = sa.create_engine(admin.url.set(database=name))
    Base.metadata.create_all(engine)
    engine.dispose()  # a template must have no connections while it is copied
    yield name
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=DB_PARAMS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database with the schema, on each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'trainyard.db'}"
        Base.metadata.create_all(get_engine(url))
        yield url
        get_engine(url).dispose()
        return
    template = request.getfixturevalue("pg_template")
    name = f"trainyard_test_{secrets.token_hex(4)}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        # WAL_LOG (PostgreSQL 15+) copies a small template without a checkpoint.
        strategy = " STRATEGY WAL_LOG" if conn.dialect.server_version_info >= (15,) else ""
        conn.execute(sa.text(f'CREATE DATABASE "{name}" TEMPLATE "{template}"{strategy}'))
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    yield url
    get_engine(url).dispose()
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server with AOF, so tests never touch the machine's Redis data."""
    from server.cli.local.embedded_redis import LocalRedis

    with LocalRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    """The private Redis, emptied before each test."""
    import redis

    client = redis.Redis.from_url(redis_server)
    client.flushall()
    yield redis_server
    client.close()


@pytest.fixture
def settings(db_url: str, redis_url: str, tmp_path: Path) -> Settings:
    return Settings(
        home=tmp_path / "home",
        database_url=db_url,
        redis_url=redis_url,
        artifacts_dir=tmp_path / "artifacts",
        lease_seconds=10,
        heartbeat_seconds=1,
        metric_flush_seconds=0.5,
    )


@pytest.fixture
def app(settings: Settings):  # type: ignore[no-untyped-def]
    from server.app import create_app

    app = create_app(settings, {"TESTING": True})
    yield app
    app.extensions["trainyard_celery"] = None


@dataclass(frozen=True)
class TestUser:
    id: int
    username: str
    role: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass(frozen=True)
class TestUsers:
    """Two members and an admin, each with an API token (no passwords: hashing is slow)."""

    alice: TestUser
    bob: TestUser
    admin: TestUser


@pytest.fixture
def users(db_url: str) -> TestUsers:
    made = {}
    with transaction(db_url) as session:
        for name, role in (("alice", "member"), ("bob", "member"), ("root", "admin")):
            user = accounts.create_user(session, name, role)
            made[name] = TestUser(
                user.id, name, role, accounts.create_token(session, user, "tests").secret
            )
    return TestUsers(alice=made["alice"], bob=made["bob"], admin=made["root"])


@pytest.fixture
def api_token(users: TestUsers) -> str:
    """The token tests use by default: alice's, a member (the common, restricted case)."""
    return users.alice.token


@pytest.fixture
def auth_headers(api_token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_token}"}


def as_user(app, user: TestUser | None):  # type: ignore[no-untyped-def]
    """A test client that authenticates as `user` (anonymous for None)."""
    client = app.test_client()
    if user is not None:
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {user.token}"
    return client


@pytest.fixture
def client(app, api_token: str):  # type: ignore[no-untyped-def]
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {api_token}"
    return client


@pytest.fixture
def live_server(app) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """The app on a real HTTP socket (threaded werkzeug server)."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join()


def settings_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINYARD_")}
    env.update(
        TRAINYARD_HOME=str(settings.home),
        TRAINYARD_DATABASE_URL=settings.resolved_database_url,
        TRAINYARD_REDIS_URL=settings.require_redis_url(),
        TRAINYARD_ARTIFACTS_DIR=str(settings.resolved_artifacts_dir),
        TRAINYARD_LEASE_SECONDS=str(settings.lease_seconds),
        TRAINYARD_HEARTBEAT_SECONDS=str(settings.heartbeat_seconds),
        TRAINYARD_METRIC_FLUSH_SECONDS=str(settings.metric_flush_seconds),
        PYTHONUNBUFFERED="1",
    )
    return env


class WorkerProcess:
    """A real `celery worker` subprocess consuming the given queues."""

    def __init__(
        self, settings: Settings, log_path: Path, queues: str = "cpu", concurrency: int = 1
    ):
        self.log_path = log_path
        cmd = [
            sys.executable, "-m", "celery", "-A", "worker.celery_worker:app", "worker",
            "-Q", queues, "--concurrency", str(concurrency), "--prefetch-multiplier", "1",
            "--loglevel", "INFO", "-n", f"test-{secrets.token_hex(3)}@%h", "--without-gossip",
            "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, env=settings_env(settings), cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"celery worker exited early:\n{self.log_tail()}")
            if b" ready." in self.log_path.read_bytes():
                return
            time.sleep(0.1)
        raise TimeoutError(f"celery worker not ready in {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self._log.close()


@pytest.fixture
def start_worker(settings: Settings, tmp_path: Path):  # type: ignore[no-untyped-def]
    workers: list[WorkerProcess] = []

    def start(queues: str = "cpu", concurrency: int = 1) -> WorkerProcess:
        w = WorkerProcess(settings, tmp_path / f"worker-{len(workers)}.log", queues, concurrency)
        workers.append(w)
        w.wait_ready()
        return w

    yield start
    for w in workers:
        w.stop()


def wait_for_state(get_json, job_id: int, states: set[str], timeout: float = 120) -> dict:  # type: ignore[no-untyped-def]
    """Poll GET /jobs/{id} until the job is in one of `states`."""
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        job = get_json(f"/api/v1/jobs/{job_id}")
        if job["state"] in states:
            return job
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} still {job.get('state')} after {timeout}s: {job}")
