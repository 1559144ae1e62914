"""Fixtures for the fault-injection suite (issue 4, docs/architecture.md, "Reliability").

Every test gets its own redis-server (AOF on, so a test can restart or flush it without
disturbing any other), short reliability timings, real `celery worker` subprocesses
(tests/conftest.py's WorkerProcess), a real HTTP server, a `trainyard reconcile`
subprocess on demand, and, after the test, a check of the invariants the issue promises:

- every job is terminal, or running under a live lease, or queued with its message in
  the broker;
- no job finished twice: at most one terminal write per job in the worker and reconciler
  logs, exactly one worker success for a succeeded job, claims logged for attempts
  1..attempt, one metric point per (attempt, key, step), and for a succeeded train job
  one `val_loss` point per epoch its final attempt trained and checkpoint_path in the
  final attempt's directory;
- attempts never exceed max_attempts;
- a succeeded train job's last checkpoint loads with `torch.load(weights_only=True)`.

The timings are short (lease 3 s, heartbeat 0.5 s, reconcile every 0.5 s); a test that
needs others says so with `@pytest.mark.timings(lease_seconds=..., ...)`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
import requests
from sqlalchemy import func, select

from server.cli.local.embedded_redis import LocalRedis
from shared.celery_app import task_id_for
from shared.db import transaction, utcnow
from shared.job_states import FINISHED_STATES
from shared.metric_catalog import METRICS
from shared.orm import Job, MetricPoint
from shared.settings import Settings
from tests import conftest as root_conftest
from tests.helpers import train_spec
from tests.s3_server import fetch_url

T = TypeVar("T")

TERMINAL = FINISHED_STATES

# Short enough that a lost worker is noticed in seconds, long enough that a loaded
# 2-core machine does not miss a lease between two heartbeats.
FAST_TIMINGS: dict[str, Any] = {
    "lease_seconds": 3.0,
    "heartbeat_seconds": 0.5,
    "metric_flush_seconds": 0.3,
    "reconcile_seconds": 0.5,
    "requeue_after_seconds": 2.0,
    "max_attempts": 3,
    # One torch thread per worker child: two workers training at once on 2 cores would
    # otherwise thrash (docs/architecture.md, "Performance targets"), and results must
    # not depend on the thread count.
    "torch_threads": 1,
}

# run_job's last line names the job an attempt ran and how it ended. Celery's log of a
# task's return value names the message's job, which is the job run only for deliveries
# that ran nothing ("duplicate", "deferred"): a message runs the best-ranked waiting job
# of its queue, not necessarily its own (shared/scheduling.py).
RUN_OUTCOME = re.compile(
    r"job (\d+) attempt \d+: (succeeded|failed|cancelled|requeued|lost)\s*$", re.M
)
TASK_RETURN = re.compile(r"Task trainyard\.\w+\[trainyard-job-(\d+)\] succeeded in \S+: '(\w+)'")
MESSAGE_ONLY = ("duplicate", "deferred")
CLAIM_LINE = re.compile(r"job (\d+): claimed, attempt (\d+)")
# The reconciler's terminal writes: a job out of attempts, a cancelled job whose worker died.
RECONCILER_FINISH = re.compile(r"reconciler: job (\d+) (failed|cancelled):")

# Small jobs. SMALL finishes in well under a second; LONG (0.13 to 0.2 s an epoch on one
# thread, a checkpoint every epoch) runs long enough to be interrupted mid-training.
SMALL_MODEL = {"name": "mlp", "params": {"hidden": 16, "layers": 1}}
LONG_MODEL = {"name": "cnn", "params": {"dropout": 0.25}}


def small_spec(**overrides: Any) -> dict[str, Any]:
    return train_spec(**{"model": SMALL_MODEL, "epochs": 2, "batch_size": 32, **overrides})


def long_spec(epochs: int = 12, **overrides: Any) -> dict[str, Any]:
    return train_spec(**{"model": LONG_MODEL, "epochs": epochs, "batch_size": 16, **overrides})


def token() -> str:
    return secrets.token_hex(4)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "timings(**values): override the fault suite's short settings for one test"
    )


# ------------------------------------------------------------------ polling


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll `condition` until it returns something truthy; errors count as "not yet"
    (the database may be down on purpose) and the last one is shown on timeout."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - reported if it never succeeds
            last_error = exc
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


# ------------------------------------------------------------------ broker


def broker_task_ids(redis_url: str) -> list[str]:
    """Task ids of the messages waiting in any queue (not the unacked ones a worker holds)."""
    client = redis.Redis.from_url(redis_url)
    try:
        ids = []
        for key in client.scan_iter():
            if client.type(key) != b"list":
                continue
            for raw in client.lrange(key, 0, -1):
                try:
                    ids.append(json.loads(raw)["headers"]["id"])
                except (ValueError, KeyError, TypeError):
                    continue
        return ids
    finally:
        client.close()


def restore_unacked(redis_url: str) -> int:
    """What kombu's Redis transport does once a message outlives the visibility timeout:
    put the unacked messages back in their queues (with a timeout of zero: all of them).
    Returns how many there were."""
    from kombu import Connection

    client = redis.Redis.from_url(redis_url)
    before = client.hlen("unacked")
    client.close()
    with Connection(redis_url, transport_options={"visibility_timeout": 0}) as conn:
        conn.default_channel.qos.restore_visible(num=1000, interval=1)
    return before


# ------------------------------------------------------------------ logs


def worker_logs(log_dir: Path) -> str:
    return "".join(
        p.read_bytes().decode(errors="replace") for p in sorted(log_dir.glob("worker-*.log"))
    )


def task_outcomes(log_dir: Path) -> dict[int, Counter[str]]:
    """job id -> how often an attempt of it ended with each outcome, and how often a
    delivery of its message ran nothing (duplicate, deferred), over all worker logs."""
    logs = worker_logs(log_dir)
    outcomes: dict[int, Counter[str]] = {}
    for job_id, outcome in RUN_OUTCOME.findall(logs):
        outcomes.setdefault(int(job_id), Counter())[outcome] += 1
    for job_id, outcome in TASK_RETURN.findall(logs):
        if outcome in MESSAGE_ONLY:
            outcomes.setdefault(int(job_id), Counter())[outcome] += 1
    return outcomes


def reconciler_finishes(log_dir: Path) -> Counter[int]:
    """job id -> how often a reconciler wrote a terminal state for it."""
    text = "".join(
        p.read_bytes().decode(errors="replace") for p in sorted(log_dir.glob("reconciler-*.log"))
    )
    return Counter(int(job_id) for job_id, _ in RECONCILER_FINISH.findall(text))


def claims_logged(log_dir: Path) -> dict[int, list[int]]:
    claims: dict[int, list[int]] = {}
    for job_id, attempt in CLAIM_LINE.findall(worker_logs(log_dir)):
        claims.setdefault(int(job_id), []).append(int(attempt))
    return claims


# ------------------------------------------------------------------ processes


class ReconcilerProcess:
    """`trainyard reconcile` in a process group of its own: forked from the suite's
    zygote (its imports already done: ~2 s of CPU less a start), or a plain subprocess
    with TRAINYARD_TEST_ZYGOTE=0."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        zygote = root_conftest.worker_zygote()
        self.proc: subprocess.Popen[bytes] | root_conftest.ZygoteChild
        if zygote is not None:
            argv = ["server.cli", "reconcile"]
            self.proc = zygote.spawn(argv, env, log_path, module="server.cli")
        else:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "reconcile"],
                env=env, cwd=root_conftest.REPO, stdout=self._log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def pool_children(worker: root_conftest.WorkerProcess) -> list[int]:
    """The live pool processes of a worker (a killed one lingers as a zombie until reaped)."""
    import psutil

    try:
        children = psutil.Process(worker.proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    alive = []
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child.pid)
    return alive


def worker_pid(job: Job) -> int | None:
    """The pid of the pool process that claimed `job` (worker_name() is host:pid)."""
    if not job.worker or ":" not in job.worker:
        return None
    try:
        return int(job.worker.rsplit(":", 1)[1])
    except ValueError:
        return None


# ------------------------------------------------------------------ the cluster handle


@dataclass
class Cluster:
    """One test's Trainyard: the HTTP API, its database and Redis, and the processes."""

    settings: Settings
    db_url: str
    url: str
    redis: LocalRedis
    tmp_path: Path
    timings: dict[str, Any]
    workers: list[root_conftest.WorkerProcess] = field(default_factory=list)
    reconcilers: list[ReconcilerProcess] = field(default_factory=list)
    http: requests.Session = field(default_factory=requests.Session)

    # -- processes
    def launch_worker(self) -> root_conftest.WorkerProcess:
        """A one-slot `celery worker` subprocess on the cpu queue, still booting."""
        log_path = self.tmp_path / f"worker-{len(self.workers)}.log"
        worker = root_conftest.WorkerProcess(self.settings, log_path, "cpu", 1)
        self.workers.append(worker)
        return worker

    def start_workers(self, n: int = 1) -> list[root_conftest.WorkerProcess]:
        """`n` workers, booted together; returns once all are ready."""
        started = [self.launch_worker() for _ in range(n)]
        for worker in started:
            worker.wait_ready()
        return started

    def start_worker(self) -> root_conftest.WorkerProcess:
        return self.start_workers(1)[0]

    def stop_all(self) -> None:
        """SIGTERM every process still running, all at once, then wait for each."""
        running = [p for p in (*self.reconcilers, *self.workers) if p.proc.poll() is None]
        for p in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.proc.wait(max(0.1, deadline - time.monotonic()))
        for p in (*self.reconcilers, *self.workers):
            p.stop()  # closes its log; SIGTERMs again and then SIGKILLs one still running

    def start_reconciler(self) -> ReconcilerProcess:
        env = root_conftest.settings_env(self.settings)
        rec = ReconcilerProcess(env, self.tmp_path / f"reconciler-{len(self.reconcilers)}.log")
        self.reconcilers.append(rec)
        return rec

    def worker_holding(
        self, job: Job, workers: list[root_conftest.WorkerProcess]
    ) -> root_conftest.WorkerProcess:
        pid = worker_pid(job)
        for w in workers:
            if pid in pool_children(w):
                return w
        raise AssertionError(f"no worker's pool holds pid {pid} (job.worker={job.worker})")

    # -- HTTP
    def post_job(
        self, spec: dict[str, Any], headers: dict[str, str] | None = None
    ) -> requests.Response:
        return self.http.post(f"{self.url}/api/v1/jobs", json=spec, headers=headers, timeout=30)

    def submit(self, spec: dict[str, Any], headers: dict[str, str] | None = None) -> int:
        resp = self.post_job(spec, headers)
        assert resp.status_code in (200, 201), resp.text
        return int(resp.json()["id"])

    def cancel(self, job_id: int) -> requests.Response:
        return self.http.post(f"{self.url}/api/v1/jobs/{job_id}/cancel", timeout=30)

    # -- database
    def job(self, job_id: int) -> Job:
        with transaction(self.db_url) as s:
            job = s.get(Job, job_id)
            assert job is not None, f"job {job_id} does not exist"
            return job

    def jobs(self) -> list[Job]:
        with transaction(self.db_url) as s:
            return list(s.scalars(select(Job).order_by(Job.id)))

    def point_count(
        self, job_id: int, attempt: int | None = None, *, training_only: bool = False
    ) -> int:
        """Metric points of the job (of `attempt`); `training_only`: without the
        telemetry samples (group "system"), which come before the first step."""
        stmt = select(func.count()).select_from(MetricPoint).where(MetricPoint.job_id == job_id)
        if attempt is not None:
            stmt = stmt.where(MetricPoint.attempt == attempt)
        if training_only:
            system = [m.key for m in METRICS.values() if m.group == "system"]
            stmt = stmt.where(MetricPoint.key.not_in(system))
        with transaction(self.db_url) as s:
            return int(s.execute(stmt).scalar_one())

    def epochs_logged(self, job_id: int, attempt: int, key: str = "val_loss") -> list[int]:
        stmt = (
            select(MetricPoint.epoch)
            .where(
                MetricPoint.job_id == job_id, MetricPoint.attempt == attempt, MetricPoint.key == key
            )
            .order_by(MetricPoint.epoch)
        )
        with transaction(self.db_url) as s:
            return [int(e) for e in s.scalars(stmt)]

    def wait_state(self, job_id: int, states: set[str] | str, timeout: float = 120) -> Job:
        wanted = {states} if isinstance(states, str) else set(states)
        try:
            return wait_for(
                lambda: j if (j := self.job(job_id)).state in wanted else None,
                timeout,
                f"job {job_id} to be {'/'.join(sorted(wanted))}",
            )
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.describe(job_id)}") from None

    def wait_training(self, job_id: int, attempt: int, timeout: float = 90) -> Job:
        """Until `attempt` of the job runs and has written metric points (it is training)."""

        def ready() -> Job | None:
            job = self.job(job_id)
            training = job.state == "running" and job.attempt == attempt
            points = self.point_count(job_id, attempt, training_only=True)
            return job if training and points > 0 else None

        try:
            return wait_for(ready, timeout, f"job {job_id} attempt {attempt} to be training")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.describe(job_id)}") from None

    def checkpoint(self, job_id: int, attempt: int) -> Path:
        return (
            self.settings.resolved_artifacts_dir
            / "jobs"
            / str(job_id)
            / f"attempt-{attempt}"
            / "last.pt"
        )

    def broker_task_ids(self) -> list[str]:
        return broker_task_ids(self.redis.url)

    def describe(self, job_id: int | None = None) -> str:
        """Job rows and log tails, for assertion messages."""
        lines = []
        try:
            for j in self.jobs():
                if job_id is None or j.id == job_id:
                    lines.append(
                        f"job {j.id}: state={j.state} attempt={j.attempt}/{j.max_attempts} "
                        f"worker={j.worker} lease={j.lease_expires_at} error={j.error_message!r}"
                    )
        except Exception as exc:  # noqa: BLE001
            lines.append(f"(jobs unreadable: {exc!r})")
        for p in sorted(self.tmp_path.glob("*.log")):
            tail = p.read_bytes()[-2500:].decode(errors="replace")
            lines.append(f"--- {p.name} (tail)\n{tail}")
        return "\n".join(lines)


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def timings(request: pytest.FixtureRequest) -> dict[str, Any]:
    values = dict(FAST_TIMINGS)
    marker = request.node.get_closest_marker("timings")
    if marker is not None:
        values.update(marker.kwargs)
    return values


@pytest.fixture
def local_redis(tmp_path: Path) -> Iterator[LocalRedis]:
    """This test's own redis-server (AOF in tmp_path/redis)."""
    server = LocalRedis(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def redis_server(local_redis: LocalRedis) -> str:
    """Overrides the session-wide server of tests/conftest.py with this test's own."""
    return local_redis.url


@pytest.fixture
def settings(db_url: str, redis_url: str, tmp_path: Path, timings: dict[str, Any]) -> Settings:
    known = {k: v for k, v in timings.items() if k in Settings.model_fields}
    return Settings(
        home=tmp_path / "home",
        database_url=db_url,
        redis_url=redis_url,
        artifacts_dir=tmp_path / "artifacts",
        **known,
    )


@pytest.fixture(autouse=True)
def _subprocess_timings(monkeypatch: pytest.MonkeyPatch, timings: dict[str, Any]) -> None:
    """Workers and the reconciler get every timing, not only those tests/conftest.py passes."""
    base = root_conftest.settings_env

    def settings_env(settings: Settings) -> dict[str, str]:
        env = base(settings)
        env.update({f"TRAINYARD_{k.upper()}": str(v) for k, v in timings.items()})
        return env

    monkeypatch.setattr(root_conftest, "settings_env", settings_env)


@pytest.fixture
def cluster(
    settings: Settings,
    db_url: str,
    live_server: str,
    local_redis: LocalRedis,
    tmp_path: Path,
    timings: dict[str, Any],
    auth_headers: dict[str, str],
) -> Iterator[Cluster]:
    c = Cluster(settings, db_url, live_server, local_redis, tmp_path, timings)
    c.http.headers.update(auth_headers)
    yield c
    crashed = [r for r in c.reconcilers if not r.alive()]
    c.stop_all()
    c.http.close()
    assert not crashed, "the reconciler died during the test:\n" + crashed[0].log_tail()


@pytest.fixture(autouse=True)
def invariants(
    settings: Settings, db_url: str, local_redis: LocalRedis, tmp_path: Path
) -> Iterator[None]:
    """After the test (and after its workers and reconciler stopped): the invariants of
    docs/architecture.md, "Reliability", hold."""
    yield
    problems = check_invariants(db_url, local_redis, tmp_path)
    assert not problems, "invariants violated:\n  " + "\n  ".join(problems)


def check_invariants(db_url: str, broker: LocalRedis, log_dir: Path) -> list[str]:
    import torch

    problems: list[str] = []
    now = utcnow()
    with transaction(db_url) as s:
        jobs = list(s.scalars(select(Job).order_by(Job.id)))
        repeated = s.execute(
            select(MetricPoint.job_id, MetricPoint.attempt, MetricPoint.key, MetricPoint.step, func.count())
            .group_by(MetricPoint.job_id, MetricPoint.attempt, MetricPoint.key, MetricPoint.step)
            .having(func.count() > 1)
            .limit(5)
        ).all()  # fmt: skip
        val_points = s.execute(
            select(MetricPoint.job_id, MetricPoint.attempt, MetricPoint.epoch).where(
                MetricPoint.key == "val_loss"
            )
        ).all()
    for job_id, attempt, key, step, n in repeated:
        problems.append(f"job {job_id} attempt {attempt}: {n} points for {key} at step {step}")

    waiting = set(broker_task_ids(broker.url)) if broker.is_running() else set()
    outcomes = task_outcomes(log_dir)
    reconciled = reconciler_finishes(log_dir)
    claims = claims_logged(log_dir)
    for job in jobs:
        tag = f"job {job.id} ({job.state}, attempt {job.attempt}/{job.max_attempts})"
        if job.attempt > job.max_attempts:
            problems.append(f"{tag}: more attempts than max_attempts")
        if job.state in TERMINAL:
            if job.finished_at is None:
                problems.append(f"{tag}: terminal without finished_at")
        elif job.state == "running":
            if job.lease_expires_at is None or job.lease_expires_at <= now:
                problems.append(f"{tag}: running under an expired lease ({job.lease_expires_at})")
        elif job.state == "queued":
            if task_id_for(job.id) not in waiting:
                problems.append(f"{tag}: queued but no message for it in the broker")
        else:
            problems.append(f"{tag}: unknown state")

        finished = outcomes.get(job.id, Counter())
        terminal_outcomes = sum(n for outcome, n in finished.items() if outcome in TERMINAL)
        terminal_outcomes += reconciled[job.id]
        if terminal_outcomes > 1:
            problems.append(
                f"{tag}: finished {terminal_outcomes} times: workers {dict(finished)}, "
                f"reconciler {reconciled[job.id]}"
            )
        if job.state == "succeeded" and finished.get("succeeded", 0) != 1:
            problems.append(f"{tag}: {finished.get('succeeded', 0)} worker successes logged")
        if claims and sorted(claims.get(job.id, [])) != list(range(1, job.attempt + 1)):
            problems.append(f"{tag}: claims logged {claims.get(job.id, [])}")

        if job.state == "succeeded" and job.kind == "train":
            metrics = (job.result or {}).get("metrics", {})
            start = metrics.get("resumed_from_epoch") or 0
            epochs = sorted(e for j, a, e in val_points if j == job.id and a == job.attempt)
            expected = list(range(start + 1, int(metrics.get("epochs_run", 0)) + 1))
            if epochs != expected:
                problems.append(
                    f"{tag}: final attempt's val_loss epochs {epochs}, expected {expected}"
                )
            if not job.checkpoint_path or not job.checkpoint_path.endswith(
                f"attempt-{job.attempt}"
            ):
                problems.append(
                    f"{tag}: checkpoint_path {job.checkpoint_path!r} is not the final attempt's"
                )
            else:
                last = Path(job.checkpoint_path) / "last.pt"
                if job.checkpoint_path.startswith("s3://"):  # tests/faults/test_two_hosts.py
                    last = log_dir / f"invariants-{job.id}-last.pt"
                    fetch_url(f"{job.checkpoint_path}/last.pt", last)
                try:
                    ckpt = torch.load(last, map_location="cpu", weights_only=True)
                    if int(ckpt["epoch"]) != int(metrics.get("epochs_run", -1)):
                        problems.append(f"{tag}: {last} is at epoch {ckpt['epoch']}")
                except Exception as exc:  # noqa: BLE001
                    problems.append(f"{tag}: {last} does not load: {exc!r}")
    return problems
