"""Fixtures: a fresh database per test on SQLite and on PostgreSQL, a private Redis
server per test session, a live HTTP server, and real `celery worker` subprocesses.

PostgreSQL is found at TRAINYARD_TEST_PG_URL (default: the machine's local server,
trust auth). Set TRAINYARD_TEST_SKIP_PG=1 to run the SQLite half only.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import queue
import secrets
import select
import shutil
import subprocess
import sys
import tempfile
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
from tests import worker_zygote as worker_zygote_client
from tests.worker_zygote import ZygoteChild


def _share_compiled_url_builders() -> None:
    """Compile each URL rule's builder once per test process, not once per app.

    Most tests make their own app (their own database, Redis and directories), and
    werkzeug compiles two Python functions for every one of the app's ~95 URL rules:
    ~40 ms of each create_app, minutes over the suite. A builder's code depends only on
    the rule's parsed parts, its defaults and which variant it is (it reaches the rule's
    converters through the `self` it is bound to later), so equal inputs can share the
    code object. The product makes one app per process and keeps werkzeug as it is.
    """
    from werkzeug.routing.rules import Rule

    compile_builder = getattr(Rule, "_compile_builder", None)
    if compile_builder is None:  # a werkzeug without it: every app compiles its own
        return
    builders: dict[tuple[object, ...], object] = {}

    def shared_builder(self: Rule, append_unknown: bool = True):  # type: ignore[no-untyped-def]
        key = (tuple(self._trace), repr(sorted((self.defaults or {}).items())), append_unknown)
        builder = builders.get(key)
        if builder is None:
            builder = builders[key] = compile_builder(self, append_unknown)
        return builder

    Rule._compile_builder = shared_builder  # type: ignore[method-assign]


_share_compiled_url_builders()


# Under pytest-xdist (scripts/test.sh) two test processes share the machine's cores:
# torch's default of one intra-op thread per core in each of them (and in every worker
# they start) oversubscribes the CPU, and OpenMP threads spinning for each other made
# in-process training several times slower. One thread each; set before torch loads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

PG_ADMIN_URL = os.environ.get(
    "TRAINYARD_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REPO = Path(__file__).resolve().parent.parent

DB_PARAMS = (
    ["sqlite"] if os.environ.get("TRAINYARD_TEST_SKIP_PG") == "1" else ["sqlite", "postgresql"]
)
# For a real-worker test whose subject is not the database (a script's process group, a
# pip environment): run once, on SQLite. Each such file keeps a PostgreSQL run of its
# tests that write through the database (claims, metric points, outcomes), so both
# backends see every kind of write; the suite's 15-minute budget pays for the rest.
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
# The same, on the production database (SQLite where the run has no PostgreSQL). Real-
# worker scenarios alternate between the two: each backend sees every kind of scenario
# (claims, resumes, hand-backs, cancels, broker loss), not every scenario twice.
ON_POSTGRESQL = pytest.mark.parametrize("db_url", [DB_PARAMS[-1]], indirect=True)


class PgDatabases:
    """PostgreSQL databases with the schema, one to a test at a time, made ready ahead.

    Each test gets a database nobody else uses while it runs. Making one per test
    (CREATE DATABASE from a template, then DROP) cost 0.3-0.5 s of waiting on the server
    each, hundreds of times; instead a background thread gets a returned database ready
    for the next test while tests run: it ends every connection still open on it (a
    thread or a worker the test left behind cannot reach the next test) and empties it,
    identities restarted, so it reads as new. A database whose tables changed is
    dropped, not reused.
    """

    READY = 2

    def __init__(self, admin_url: str) -> None:
        self._admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
        self.template = f"trainyard_template_{secrets.token_hex(4)}"
        with self._admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{self.template}"'))
            # WAL_LOG (PostgreSQL 15+) copies a small template without a checkpoint.
            wal_log = conn.dialect.server_version_info >= (15,)
        self._strategy = " STRATEGY WAL_LOG" if wal_log else ""
        engine = sa.create_engine(self._admin.url.set(database=self.template))
        Base.metadata.create_all(engine)
        engine.dispose()  # a template must have no connections while it is copied
        self._tables = {t.name for t in Base.metadata.sorted_tables}
        self._all: set[str] = set()
        self._ready: queue.Queue[str | BaseException] = queue.Queue()
        self._returned: queue.Queue[str] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-databases", daemon=True)
        self._thread.start()

    def take(self) -> str:
        """The URL of a database with the schema and no rows, for this test alone."""
        name = self._ready.get(timeout=120)
        if isinstance(name, BaseException):
            raise RuntimeError("could not prepare a test database") from name
        return self._url(name)

    def give_back(self, url: str) -> None:
        self._returned.put(sa.make_url(url).database or "")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(60)
        for name in [*self._all, self.template]:
            self._drop(name)
        self._admin.dispose()

    def _url(self, name: str) -> str:
        return self._admin.url.set(database=name).render_as_string(hide_password=False)

    def _drop(self, name: str) -> None:
        # FORCE: a connection a test left open (a thread, a killed worker) cannot block it.
        with self._admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self._all.discard(name)

    def _create(self) -> str:
        name = f"trainyard_test_{secrets.token_hex(4)}"
        with self._admin.connect() as conn:
            conn.execute(
                sa.text(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"{self._strategy}')
            )
            # Throwaway data: a commit need not wait for the WAL to reach the disk.
            conn.execute(sa.text(f'ALTER DATABASE "{name}" SET synchronous_commit = off'))
        self._all.add(name)
        return name

    def _reset(self, name: str) -> bool:
        """Empty a returned database for reuse; False if it must be dropped instead."""
        with self._admin.connect() as conn:
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
        engine = sa.create_engine(self._admin.url.set(database=name), poolclass=sa.NullPool)
        try:
            with engine.begin() as conn:
                found = {
                    row[0]
                    for row in conn.execute(
                        sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                    )
                }
                if found != self._tables:
                    return False
                tables = ", ".join(f'"{t}"' for t in sorted(self._tables))
                conn.execute(sa.text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
            return True
        except sa.exc.SQLAlchemyError:
            return False
        finally:
            engine.dispose()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                try:
                    name = self._returned.get_nowait()
                except queue.Empty:
                    name = None
                if name is not None:
                    if self._reset(name):
                        self._ready.put(name)
                    else:
                        self._drop(name)
                elif self._ready.qsize() < self.READY:
                    self._ready.put(self._create())
                else:
                    self._stop.wait(0.01)
            except Exception as exc:  # noqa: BLE001 - handed to the test that waits for it
                self._ready.put(exc)
                return


@pytest.fixture(scope="session")
def pg_databases() -> Iterator[PgDatabases]:
    databases = PgDatabases(PG_ADMIN_URL)
    yield databases
    databases.close()


@functools.cache
def _sqlite_template() -> Path:
    """An empty SQLite database with the schema, made once per test process and copied
    for each test: a copy takes a millisecond, create_all ~50 ms."""
    directory = tempfile.mkdtemp(prefix="trainyard-sqlite-template-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    path = Path(directory) / "template.db"
    url = f"sqlite:///{path}"
    Base.metadata.create_all(get_engine(url))
    get_engine(url).dispose()  # the last connection checkpoints the WAL into the file
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0
    return path


@pytest.fixture(params=DB_PARAMS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database with the schema, on each backend."""
    if request.param == "sqlite":
        path = tmp_path / "trainyard.db"
        shutil.copyfile(_sqlite_template(), path)
        url = f"sqlite:///{path}"
        yield url
        get_engine(url).dispose()
        return
    databases: PgDatabases = request.getfixturevalue("pg_databases")
    url = databases.take()
    yield url
    get_engine(url).dispose()
    databases.give_back(url)


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


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible server on loopback (tests/s3_server.py); its credentials go
    into this process's environment, so boto3 here and in worker subprocesses finds them."""
    from tests.s3_server import CREDENTIALS, ENDPOINT_VARIABLE, s3_server

    for name, value in CREDENTIALS.items():
        os.environ.setdefault(name, value)
    with s3_server() as endpoint:
        os.environ[ENDPOINT_VARIABLE] = endpoint
        yield endpoint


@pytest.fixture
def s3_settings(settings: Settings, s3_endpoint: str) -> Settings:
    """`settings` with artifacts and uploads in a fresh bucket of the S3 server."""
    from tests.s3_server import new_bucket

    return settings.model_copy(
        update={
            "artifacts_url": f"s3://{new_bucket(s3_endpoint)}/trainyard",
            "s3_endpoint_url": s3_endpoint,
        }
    )


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
        # Workers the tests start train with one thread: they run beside other tests.
        torch_threads=1,
    )


@pytest.fixture
def app(settings: Settings):  # type: ignore[no-untyped-def]
    from server.app import create_app

    app = create_app(settings, {"TESTING": True})
    yield app
    app.extensions["trainyard_celery"] = None


@dataclass(frozen=True)
class TestUser:
    __test__ = False  # a fixture's value, not a test class

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

    __test__ = False

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
        TRAINYARD_TORCH_THREADS=str(settings.torch_threads),
        PYTHONUNBUFFERED="1",
    )
    # Whatever else a test set (a memory limit, claim limits) reaches its workers too.
    for name in sorted(settings.model_fields_set):
        value = getattr(settings, name)
        if value is not None:
            env.setdefault(f"TRAINYARD_{name.upper()}", str(value))
    return env


class WorkerZygote:
    """tests/worker_zygote.py for this test process, started on first use."""

    def __init__(self, directory: Path) -> None:
        self.socket_path = str(directory / "zygote.sock")
        self._log = open(directory / "zygote.log", "wb")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.worker_zygote", self.socket_path],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=self._log,
        )  # fmt: skip
        ready, _, _ = select.select([self.proc.stdout], [], [], 180)
        if not ready or self.proc.stdout.readline().strip() != b"ready":  # type: ignore[union-attr]
            self.stop()
            raise RuntimeError(f"the worker zygote did not start: {directory / 'zygote.log'}")

    def spawn(
        self,
        argv: list[str],
        env: dict[str, str],
        log_path: Path,
        hostname: str = "",
        module: str = "celery",
    ) -> ZygoteChild:
        """`python -m MODULE argv[1:]` (argv[0] names the module, as in sys.argv)."""
        return worker_zygote_client.spawn(
            self.socket_path, argv, env, log_path, REPO, module=module, hostname=hostname
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self._log.close()


_zygote: dict[str, WorkerZygote] = {}


def worker_zygote() -> WorkerZygote | None:
    """The zygote of this test process; None with TRAINYARD_TEST_ZYGOTE=0, which starts
    every worker as a plain subprocess instead (same processes, ~9 s slower each)."""
    if os.environ.get("TRAINYARD_TEST_ZYGOTE", "1") == "0":
        return None
    if "zygote" not in _zygote:
        import tempfile

        _zygote["zygote"] = WorkerZygote(Path(tempfile.mkdtemp(prefix="trainyard-zygote-")))
    return _zygote["zygote"]


def pytest_sessionfinish(session: pytest.Session) -> None:
    zygote = _zygote.pop("zygote", None)
    if zygote is not None:
        zygote.stop()


class WorkerProcess:
    """A real `celery worker` process consuming the given queues: forked from the worker
    zygote (tests/worker_zygote.py) with its libraries already imported, or a plain
    subprocess with TRAINYARD_TEST_ZYGOTE=0."""

    def __init__(
        self,
        settings: Settings,
        log_path: Path,
        queues: str = "cpu",
        concurrency: int = 1,
        name: str | None = None,
    ):
        """`name`: the Celery node name (-n); a fresh random one by default. A test that
        restarts "the same" worker passes one."""
        self.log_path = log_path
        self.name = name or f"test-{secrets.token_hex(3)}@%h"
        cmd = [
            sys.executable, "-m", "celery", "-A", "worker.celery_worker:app", "worker",
            "-Q", queues, "--concurrency", str(concurrency), "--prefetch-multiplier", "1",
            "--loglevel", "INFO", "-n", self.name, "--without-gossip",
            "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        zygote = worker_zygote()
        self.proc: subprocess.Popen[bytes] | ZygoteChild
        if zygote is not None:
            argv = ["celery", *cmd[3:]]
            self.proc = zygote.spawn(argv, settings_env(settings), log_path)
        else:
            self.proc = subprocess.Popen(
                cmd, env=settings_env(settings), cwd=REPO, stdout=self._log,
                stderr=subprocess.STDOUT, start_new_session=True,
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
        """A warm shutdown, as `docker stop` or systemd gives it: SIGTERM to the main
        process only. (Signalling the whole group also killed the pool child, which the
        pool then restarted mid-shutdown: 4-5 s per worker.) Whatever is left of the
        group afterwards is killed."""
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(20)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, 9)
        self.proc.wait()
        self._log.close()


@pytest.fixture
def start_worker(settings: Settings, tmp_path: Path):  # type: ignore[no-untyped-def]
    workers: list[WorkerProcess] = []

    def start(queues: str = "cpu", concurrency: int = 1, name: str | None = None) -> WorkerProcess:
        log_path = tmp_path / f"worker-{len(workers)}.log"
        w = WorkerProcess(settings, log_path, queues, concurrency, name)
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


# The longest tests, longest first (measured: tens of seconds each, most of it real
# workers booting and training). pytest-xdist splits the collected order between its
# processes and idle ones steal from the end: with these at the front, the run ends on
# short tests on both processes instead of one process still running a long one alone.
LONG_FIRST = (
    "tests/test_api_fuzz.py",
    "tests/faults/test_worker_loss.py",
    "tests/test_benchmarks.py",
    "tests/faults/test_database_outage.py",
    "tests/faults/test_broker_loss.py",
    "tests/browser/test_ui_flows.py",
    "tests/test_up.py",
    "tests/test_worker_reliability.py",
    "tests/integration/",
    "tests/faults/",
    "tests/test_workers.py",
)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.path.relative_to(REPO).as_posix()
        return next(
            (i for i, prefix in enumerate(LONG_FIRST) if path.startswith(prefix)),
            len(LONG_FIRST),
        )

    items.sort(key=rank)  # stable: the rest keeps its order
