"""What every benchmark under bench/ shares: `--smoke` and `--results`, result rows,
timing, the databases to measure on, a private Redis and an API token.

A benchmark prints its figure next to a floor measured in the same run (README,
"Development"). It also hands each such row to `Results.add`, which appends it as one
JSON line to the `--results` file: bench/run_all.py reads those lines to print one table
over every benchmark, and tests/test_benchmarks.py reads them to check that a `--smoke`
run still reports numbers (exit 0, positive, finite figure/floor/ratio). Smoke sizes
exist so that a benchmark which no longer runs fails the test suite; their numbers mean
nothing, and no test asserts on timings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Files in bench/ that are not benchmarks; every other bench/*.py is one, so a new
# benchmark is run by bench/run_all.py and smoke-tested without being listed anywhere.
# bench/gpu_check.py needs GPUs: run by hand on a GPU machine, its smoke mode tested in
# tests/test_slots.py.
NOT_BENCHMARKS = frozenset({"benchlib", "run_all", "gpu_check"})
DEFAULT_PG = os.environ.get(
    "TRAINYARD_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def discover() -> list[str]:
    """The benchmarks' names (bench/<name>.py), sorted."""
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if p.stem not in NOT_BENCHMARKS)


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class Target:
    """A target as docs/architecture.md ("Performance targets") states it: on the ratio
    (job vs bare loop) or on the figure itself (a latency in ms); `op` ">=" or "<="."""

    on: str
    op: str
    value: float
    text: str

    def met(self, figure: float, ratio: float) -> bool:
        x = ratio if self.on == "ratio" else figure
        return x >= self.value if self.op == ">=" else x <= self.value


@dataclass(frozen=True)
class Row:
    bench: str
    name: str
    figure: float
    unit: str
    floor: float
    ratio: float
    target: str  # "" where none is set: the row is information only
    met: bool | None
    smoke: bool
    note: str = ""


class Results:
    """Prints nothing itself: each benchmark keeps its own human-readable output."""

    def __init__(self, bench: str, args: argparse.Namespace) -> None:
        self.bench = bench
        self.smoke = bool(args.smoke)
        self.path: Path | None = args.results
        self.rows: list[Row] = []

    def add(
        self,
        name: str,
        figure: float,
        unit: str,
        floor: float,
        target: Target | None = None,
        note: str = "",
    ) -> Row:
        """A row, ratio = figure / floor; written at once so that a benchmark that
        crashes later still leaves the rows it measured."""
        ratio = figure / floor if floor > 0 else math.nan
        row = Row(
            bench=self.bench,
            name=name,
            figure=float(figure),
            unit=unit,
            floor=float(floor),
            ratio=ratio,
            target=target.text if target else "",
            met=target.met(figure, ratio) if target and math.isfinite(ratio) else None,
            smoke=self.smoke,
            note=note,
        )
        self.rows.append(row)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(asdict(row)) + "\n")
        return row


def run_bench(
    cmd: list[str], timeout: float | None, capture: bool = False, **popen: Any
) -> subprocess.CompletedProcess[str]:
    """Runs a benchmark to the end; past `timeout`, SIGTERM (see `start`: it stops its
    own subprocesses), then SIGKILL. The return code is -15 or -9 then, or what the
    benchmark exits with on SIGTERM (143)."""
    pipe = subprocess.PIPE if capture else None
    with subprocess.Popen(cmd, stdout=pipe, stderr=pipe, text=True, **popen) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                out, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            print(f"{Path(cmd[1]).name}: stopped after {timeout:.0f} s", file=sys.stderr)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# Set by tests/test_benchmarks.py: the suite's worker zygote (tests/worker_zygote.py),
# a process with torch, Celery and SQLAlchemy already imported that forks each child.
# A smoke run then starts its workers in a fraction of a second instead of ~9 s of CPU
# each; the children are the same commands either way.
ZYGOTE_SOCKET = os.environ.get("TRAINYARD_TEST_ZYGOTE_SOCKET", "")


def spawn_python(module: str, args: list[str], env: dict[str, str], log_path: Path) -> Any:
    """`python -m MODULE ARGS...` in the repository, in a session of its own, stdout and
    stderr to `log_path`: a subprocess.Popen, or under the test suite a child of its
    zygote with the same pid/poll/wait/terminate/kill/returncode."""
    if ZYGOTE_SOCKET:
        from tests import worker_zygote

        log_path.write_bytes(b"")
        return worker_zygote.spawn(ZYGOTE_SOCKET, [module, *args], env, log_path, REPO, module)
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", module, *args], env=env, cwd=REPO, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows a `--results` file holds (none if the benchmark wrote none)."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--smoke", action="store_true", help="tiny sizes, a few seconds: proves it still runs"
    )
    p.add_argument(
        "--results", type=Path, default=None, help="append the result rows as JSON lines here"
    )
    return p


def start(
    bench: str, args: argparse.Namespace, full: dict[str, Any], smoke: dict[str, Any]
) -> Results:
    """Fills each size argument left at None with its full or its smoke default (so an
    explicit `--jobs 500` wins in either mode) and returns the benchmark's Results.

    SIGTERM becomes SystemExit, so that a benchmark stopped from outside (a test's or
    run_all's timeout) still runs its `finally` and `with` exits: its worker, web and
    Redis subprocesses live in sessions of their own and would outlive it otherwise."""
    for key, value in (smoke if args.smoke else full).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    return Results(bench, args)


def write_big_csv(path: Path, megabytes: float, features: int = 10) -> int:
    """A CSV of `features` float columns and a three-class label; its size in bytes.

    Each cell is a normal sample as "+d.dddd" (200,001 distinct values) and each row is
    built as bytes with numpy arithmetic: formatting tens of millions of floats in Python
    took more CPU than the measurements themselves."""
    import numpy as np  # only here: most benchmarks need no numpy

    rng = np.random.default_rng(11)
    header = ",".join(f"f{i}" for i in range(features)) + ",label\n"
    row_bytes = features * 8 + 2
    rows = int(megabytes * (1 << 20) / row_bytes)
    with path.open("wb") as f:
        f.write(header.encode())
        for start in range(0, rows, 20_000):
            n = min(20_000, rows - start)
            values = np.clip(rng.normal(size=(n, features)), -9.9999, 9.9999)
            digits = np.rint(np.abs(values) * 10_000).astype(np.int64)
            cells = np.empty((n, features, 8), dtype=np.uint8)
            cells[..., 0] = np.where(values < 0, ord("-"), ord("+"))
            cells[..., 1] = ord("0") + digits // 10_000
            cells[..., 2] = ord(".")
            for place, power in enumerate((1000, 100, 10, 1), start=3):
                cells[..., place] = ord("0") + digits // power % 10
            cells[..., 7] = ord(",")
            tail = np.empty((n, 2), dtype=np.uint8)
            tail[:, 0] = np.frombuffer(b"abc", dtype=np.uint8)[rng.integers(0, 3, size=n)]
            tail[:, 1] = ord("\n")
            f.write(np.concatenate([cells.reshape(n, -1), tail], axis=1).tobytes())
    return path.stat().st_size


# ---------------------------------------------------------------- timing


def timed(fn: Callable[[], Any], repeat: int) -> tuple[list[float], Any]:
    """(milliseconds of each of `repeat` calls, the last call's result) after one warm-up
    call (plans, caches, the first connection)."""
    result = fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1000)
    return times, result


def percentile(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


class Capture:
    """The SELECTs one request runs (those `keep` accepts), to replay them raw through
    the same engine as the request's floor."""

    def __init__(self, engine: Any, keep: Callable[[str], bool] = lambda _statement: True):
        import sqlalchemy as sa

        self.statements: list[tuple[str, Any]] = []
        self.on = False
        self.keep = keep
        sa.event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if (
            self.on
            and statement.lstrip().upper().startswith(("SELECT", "WITH"))
            and self.keep(statement)
        ):
            self.statements.append((statement, parameters))

    def during(self, fn: Callable[[], Any]) -> tuple[list[tuple[str, Any]], Any]:
        """(the statements `fn()` runs, what it returns)."""
        self.statements.clear()
        self.on = True
        try:
            result = fn()
        finally:
            self.on = False
        return list(self.statements), result


# ---------------------------------------------------------------- services


def add_database_args(p: argparse.ArgumentParser) -> None:
    # The test suite's switch (tests/conftest.py) also holds for a benchmark it runs.
    skip_pg = os.environ.get("TRAINYARD_TEST_SKIP_PG") == "1"
    p.add_argument("--sqlite-only", action="store_true", default=skip_pg)
    p.add_argument("--pg-url", default=DEFAULT_PG, help="a server where a database can be made")


@contextlib.contextmanager
def databases(args: argparse.Namespace, tmp: Path) -> Iterator[list[tuple[str, str]]]:
    """(label, url) of each database to measure: SQLite in `tmp`, and a PostgreSQL
    database created for this run (and dropped after it) unless `--sqlite-only` or the
    server is not reachable."""
    import sqlalchemy as sa

    from shared.db import get_engine

    found = [("sqlite", f"sqlite:///{tmp / 'bench.db'}")]
    admin = None
    name = f"trainyard_bench_{secrets.token_hex(4)}"
    if not args.sqlite_only:
        try:
            admin = sa.create_engine(args.pg_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
            found.append(
                ("postgresql", admin.url.set(database=name).render_as_string(hide_password=False))
            )
        except sa.exc.OperationalError as exc:
            print(f"PostgreSQL not reachable ({type(exc).__name__}); SQLite only")
            admin = None
    try:
        yield found
    finally:
        if admin is not None:
            for _label, url in found[1:]:
                get_engine(url).dispose()
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()


def local_redis() -> tuple[Any, Callable[[], int]]:
    """(the LocalRedis class, free_port): a private redis-server, as the test suite has."""
    from server.cli.local.embedded_redis import LocalRedis, free_port

    return LocalRedis, free_port


def api_token(url: str, username: str = "bench", role: str = "member") -> str:
    """A new user in the benchmark's own database and an API token for it: the API
    answers 401 without one."""
    from shared import accounts
    from shared.db import transaction

    with transaction(url) as s:
        user = accounts.find_user(s, username) or accounts.create_user(s, username, role)
        return accounts.create_token(s, user, "bench").secret


def bench_env(**settings: str) -> dict[str, str]:
    """This process's environment without any TRAINYARD_* from the caller's shell (they
    would point the children at another database or Redis), plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINYARD_")}
    env.update(settings, PYTHONUNBUFFERED="1")
    return env


def check(resp: Any) -> Any:
    """The JSON body of a `requests` response, or an error that shows the body (a 401's
    message, say) instead of a KeyError further on."""
    if resp.status_code >= 400:
        raise SystemExit(
            f"{resp.request.method} {resp.url}: HTTP {resp.status_code}: {resp.text[:500]}"
        )
    return resp.json()


@dataclass
class SmallCluster:
    """A private Redis, a SQLite database, the web app and one celery worker."""

    http: Any  # a requests.Session with the API token
    url: str  # the API base, .../api/v1
    settings: Any  # shared.settings.Settings of the web app
    node: str  # the worker's Celery node name
    worker: Any  # subprocess.Popen, or a zygote's child under the test suite (spawn_python)
    worker_log: Path

    def worker_died(self) -> str | None:
        """Why the worker is gone (with its log's tail), or None while it runs."""
        if self.worker.poll() is None:
            return None
        tail = self.worker_log.read_bytes()[-3000:].decode(errors="replace")
        return f"the worker exited ({self.worker.returncode}):\n{tail}"


@contextlib.contextmanager
def small_cluster(
    tmp: Path, slots: int = 1, role: str = "member", node: str = "bench@bench", **env: str
) -> Iterator[SmallCluster]:
    """Everything a job needs, in `tmp`: what train_overhead and scale measure against."""
    import logging
    import threading

    import requests
    from werkzeug.serving import make_server

    from server.app import create_app
    from shared.migrate import upgrade_database
    from shared.settings import Settings

    LocalRedis, _ = local_redis()
    with LocalRedis(tmp / "redis") as redis:
        db_url = f"sqlite:///{tmp}/bench.db"
        upgrade_database(db_url)
        token = api_token(db_url, role=role)
        worker_env = bench_env(
            TRAINYARD_HOME=str(tmp), TRAINYARD_DATABASE_URL=db_url, TRAINYARD_REDIS_URL=redis.url,
            **env,
        )  # fmt: skip
        log_path = tmp / "worker.log"
        # Without gossip, mingle and heartbeat: a lone worker has nobody to sync with,
        # and mingle alone would add seconds to every start.
        worker = spawn_python(
            "celery",
            ["-A", "worker.celery_worker:app", "worker", "-Q", "cpu", "--concurrency",
             str(slots), "--prefetch-multiplier", "1", "--loglevel", "WARNING", "-n", node,
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
            worker_env, log_path,
        )  # fmt: skip
        server = None
        try:
            logging.getLogger("werkzeug").setLevel(logging.WARNING)
            settings = Settings(home=tmp, database_url=db_url, redis_url=redis.url)
            server = make_server("127.0.0.1", 0, create_app(settings), threaded=True)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            http = requests.Session()
            http.headers["Authorization"] = f"Bearer {token}"
            url = f"http://127.0.0.1:{server.server_port}/api/v1"
            yield SmallCluster(http, url, settings, node, worker, log_path)
        finally:
            if server is not None:
                server.shutdown()
            worker.terminate()
            worker.wait(30)
