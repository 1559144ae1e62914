"""Soak test (issue 4): many small jobs while workers are killed at random.

Starts a private Redis (AOF), a database (SQLite in a temporary directory, or
`--database-url`, an empty PostgreSQL database, say), the web server, `--workers`
Celery workers and the reconciler, each a subprocess started the way production starts
it (`python -m server.cli web|worker|reconcile`). Submits `--jobs` small training jobs
over HTTP, cancels `--cancels` of them on the way (running ones when there are), and
meanwhile SIGKILLs the worker of a running job `--kills` times at random moments: mostly
the whole process group (a lost host; a new worker is started in its place), sometimes
only the pool child (what the OOM killer does; Celery forks a new one, and the job ends
failed as KilledBySignal, docs/architecture.md, "Reliability" R10). Then waits, at
most `--timeout` seconds, until every job is terminal, and prints:

    submitted / succeeded / failed / cancelled / duplicated / lost

`duplicated`: a job that finished more than once (more than one terminal outcome in the
workers' and the reconciler's logs) or whose final attempt wrote a metric twice (an
epoch's `val_loss`, or any key at one step); `lost`: a job not terminal at the end. The
exit code is 1 if either is non-zero. Jobs are submitted with the API token of a user
made in the soak's own database. Two result rows (`--results`): the jobs that settled
exactly once against those submitted (target: all of them), and the wall time until
every job was terminal against the training time the succeeded jobs needed per worker
(what the kills, restarts, lease expiries and queueing cost; no target). The full run is
not part of the test suite:

    .venv/bin/python bench/soak.py [--jobs 40] [--workers 2] [--kills 10] [--cancels 2]
        [--database-url postgresql+psycopg://postgres@127.0.0.1:5432/soak] [--seed 0]
        [--smoke] [--results rows.jsonl]

`--smoke`: 3 short jobs, one worker, one kill, one cancel: the real processes and the
real chaos, in well under a minute (tests/test_benchmarks.py).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchlib  # before shared/: it puts the repository on sys.path
import psutil
import requests
from sqlalchemy import func, select

from shared.db import transaction
from shared.orm import Job, MetricPoint

REPO = benchlib.REPO

TERMINAL = {"succeeded", "failed", "cancelled"}
TASK_RETURN = re.compile(r"Task trainyard\.\w+\[trainyard-job-(\d+)\] succeeded in \S+: '(\w+)'")
RECONCILER_FINISH = re.compile(r"reconciler: job (\d+) (failed|cancelled):")

# Reliability timings: short, so that lost workers are noticed in seconds.
TIMINGS = {
    "TRAINYARD_LEASE_SECONDS": "3",
    "TRAINYARD_HEARTBEAT_SECONDS": "0.5",
    "TRAINYARD_RECONCILE_SECONDS": "0.5",
    "TRAINYARD_REQUEUE_AFTER_SECONDS": "3",
    "TRAINYARD_METRIC_FLUSH_SECONDS": "0.5",
}


def job_spec(rng: random.Random, i: int, scale: float = 1.0) -> dict[str, Any]:
    """A small job: an MLP or a CNN on digits, about 1 to 4 s on one core (times `scale`)."""
    if rng.random() < 0.6:
        model = {"name": "mlp", "params": {"hidden": 64, "layers": 1}}
        epochs = rng.randint(10, 40)
    else:
        model = {"name": "cnn", "params": {"dropout": 0.25}}
        epochs = rng.randint(4, 12)
    epochs = max(2, round(epochs * scale))
    return {
        "kind": "train",
        "name": f"soak-{i}",
        "tags": ["soak"],
        "dataset": {"name": "digits"},
        "model": model,
        "optimizer": {"name": "adam", "lr": 0.003},
        "epochs": epochs,
        "batch_size": 16,
        "seed": rng.randint(0, 10_000),
    }


@dataclass
class Child:
    name: str
    proc: Any  # subprocess.Popen, or a zygote child under the test suite (benchlib.spawn_python)
    log_path: Path

    def alive(self) -> bool:
        return self.proc.poll() is None


class Cluster:
    def __init__(self, base: Path, env: dict[str, str]) -> None:
        self.base = base
        self.env = env
        self.logs = base / "logs"
        self.logs.mkdir()
        self.children: list[Child] = []
        self.workers: list[Child] = []
        self._worker_count = 0

    def spawn(self, name: str, args: list[str]) -> Child:
        log_path = self.logs / f"{name}.log"
        proc = benchlib.spawn_python("server.cli", args, self.env, log_path)
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def start_worker(self) -> Child:
        n = self._worker_count
        self._worker_count += 1
        worker = self.spawn(
            f"worker-{n}",
            ["worker", "--queues", "cpu", "--concurrency", "1", "--name", f"soak-{n}@%h"],
        )
        self.workers.append(worker)
        return worker

    def wait_ready(self, worker: Child, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while b" ready." not in worker.log_path.read_bytes():
            if not worker.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{worker.name} did not start:\n{tail(worker.log_path)}")
            time.sleep(0.1)

    def live_workers(self) -> list[Child]:
        return [w for w in self.workers if w.alive()]

    def stop(self) -> None:
        running = [c for c in self.children if c.alive()]
        for c in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(c.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for c in running:
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.proc.pid, signal.SIGKILL)
                c.proc.wait()


def tail(path: Path, n: int = 3000) -> str:
    return path.read_bytes()[-n:].decode(errors="replace")


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the web server at {url} did not come up")


class Chaos(threading.Thread):
    """`kills` times, a random `gap` (0.5 to 4 s) apart, SIGKILLs the worker of a running
    job: its pool child alone in a `pool_share` of the kills, else its process group."""

    def __init__(
        self,
        cluster: Cluster,
        db_url: str,
        kills: int,
        rng: random.Random,
        done: threading.Event,
        gap: tuple[float, float] = (0.5, 4.0),
        pool_share: float = 0.3,
    ) -> None:
        super().__init__(name="chaos", daemon=True)
        self.cluster, self.db_url, self.kills, self.rng, self.done = (
            cluster,
            db_url,
            kills,
            rng,
            done,
        )
        self.gap, self.pool_share = gap, pool_share
        self.log: list[str] = []

    def run(self) -> None:
        started = time.monotonic()
        while len(self.log) < self.kills and not self.done.wait(self.rng.uniform(*self.gap)):
            target = self._busy_worker()
            if target is None:
                continue
            victim, job_id, pid = target
            at = f"{time.monotonic() - started:6.1f}s"
            if self.rng.random() < self.pool_share:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self.log.append(f"{at}  job {job_id}: SIGKILL pool child {pid} of {victim.name}")
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(victim.proc.pid, signal.SIGKILL)
            victim.proc.wait()
            replacement = self.cluster.start_worker()
            self.log.append(
                f"{at}  job {job_id}: SIGKILL process group of {victim.name}; "
                f"started {replacement.name}"
            )

    def _busy_worker(self) -> tuple[Child, int, int] | None:
        """A live worker whose pool child is running a job, the job and the child's pid."""
        with transaction(self.db_url) as s:
            running = s.execute(select(Job.id, Job.worker).where(Job.state == "running")).all()
        self.rng.shuffle(running)
        for job_id, worker in running:
            pid = int(worker.rsplit(":", 1)[1]) if worker and ":" in worker else None
            for w in self.cluster.live_workers():
                if pid in _pool_children(w.proc.pid):
                    return w, job_id, pid
        return None


def _pool_children(pid: int) -> list[int]:
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    alive = []
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.status() != psutil.STATUS_ZOMBIE:  # killed, not yet reaped
                alive.append(child.pid)
    return alive


@dataclass
class Report:
    submitted: int
    states: Counter[str]
    duplicated: list[str]
    lost: list[str]
    attempts: Counter[int]
    failures: Counter[str]
    training_s: float  # what the succeeded jobs' training needed at their measured rate
    unsettled: set[int]  # the jobs lost or duplicated

    @property
    def settled_once(self) -> int:
        return self.submitted - len(self.unsettled)

    def print(self) -> None:
        print(
            f"submitted={self.submitted} succeeded={self.states['succeeded']} "
            f"failed={self.states['failed']} cancelled={self.states['cancelled']} "
            f"duplicated={len(self.duplicated)} lost={len(self.lost)}"
        )
        print(f"attempts per job: {dict(sorted(self.attempts.items()))}")
        for reason, n in self.failures.most_common():
            print(f"failed x{n}: {reason}")
        for line in self.duplicated + self.lost:
            print(f"  {line}")


def build_report(db_url: str, ids: list[int], logs: Path) -> Report:
    outcomes: dict[int, Counter[str]] = {}
    for path in sorted(logs.glob("worker-*.log")):
        for job_id, outcome in TASK_RETURN.findall(path.read_bytes().decode(errors="replace")):
            outcomes.setdefault(int(job_id), Counter())[outcome] += 1
    reconciler_log = (logs / "reconciler.log").read_bytes().decode(errors="replace")
    for job_id, outcome in RECONCILER_FINISH.findall(reconciler_log):
        outcomes.setdefault(int(job_id), Counter())[f"reconciler {outcome}"] += 1
    with transaction(db_url) as s:
        jobs = {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(ids)))}
        repeated = {
            (job_id, attempt)
            for job_id, attempt in s.execute(
                select(MetricPoint.job_id, MetricPoint.attempt)
                .group_by(
                    MetricPoint.job_id, MetricPoint.attempt, MetricPoint.key, MetricPoint.step
                )
                .having(func.count() > 1)
            )
        }
        val_epochs = Counter(
            (job_id, attempt, epoch)
            for job_id, attempt, epoch in s.execute(
                select(MetricPoint.job_id, MetricPoint.attempt, MetricPoint.epoch).where(
                    MetricPoint.key == "val_loss"
                )
            )
        )
    states: Counter[str] = Counter()
    duplicated, lost = [], []
    unsettled: set[int] = set()
    attempts: Counter[int] = Counter()
    failures: Counter[str] = Counter()
    training_s = 0.0
    for job_id in ids:
        job = jobs[job_id]
        states[job.state] += 1
        if job.state == "succeeded":
            training_s += _training_seconds((job.result or {}).get("metrics", {}))
        attempts[job.attempt] += 1
        if job.state not in TERMINAL:
            unsettled.add(job_id)
            lost.append(f"job {job_id}: {job.state}, attempt {job.attempt}, worker {job.worker}")
        if job.state == "failed":
            failures[re.sub(r"\d+", "N", job.error_message or "?")[:120]] += 1
        finished = outcomes.get(job_id, Counter())
        terminal = sum(
            n for outcome, n in finished.items() if outcome.removeprefix("reconciler ") in TERMINAL
        )
        twice = [
            e for (j, a, e), n in val_epochs.items() if j == job_id and a == job.attempt and n > 1
        ]
        if terminal > 1 or twice or (job_id, job.attempt) in repeated:
            unsettled.add(job_id)
            duplicated.append(
                f"job {job_id}: outcomes {dict(finished)}, epochs logged twice {twice}, "
                f"repeated points {(job_id, job.attempt) in repeated}"
            )
    return Report(len(ids), states, duplicated, lost, attempts, failures, training_s, unsettled)


def _training_seconds(metrics: dict[str, Any]) -> float:
    """The whole job's training time at the rate its final attempt measured: a resumed
    attempt's own train_time_s covers only the epochs it ran."""
    rate = metrics.get("samples_per_s") or 0.0
    if rate > 0:
        return metrics["epochs_run"] * metrics["num_train_samples"] / rate
    return float(metrics.get("train_time_s") or 0.0)


# Smoke: jobs a tenth as long; kills 0.3 to 1 s apart, so that the one kill lands while a
# job runs, and of the pool child (Celery forks another at once; a new worker process
# would take most of the smoke run to import torch); a generous timeout, because a
# smoke run proves that the soak still runs, not how fast.
FULL = {"jobs": 40, "workers": 2, "kills": 10, "cancels": 2, "timeout": 600.0,
        "web_workers": 2, "scale": 1.0, "gap": (0.5, 4.0), "pool_share": 0.3}  # fmt: skip
SMOKE = {"jobs": 3, "workers": 1, "kills": 1, "cancels": 1, "timeout": 120.0,
         "web_workers": 1, "scale": 0.1, "gap": (0.3, 1.0), "pool_share": 1.0}  # fmt: skip


def main() -> int:
    parser = benchlib.parser(__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, help="default 40 (smoke: 3)")
    parser.add_argument("--workers", type=int, help="default 2 (smoke: 1)")
    parser.add_argument("--kills", type=int, help="default 10 (smoke: 1)")
    parser.add_argument("--cancels", type=int, help="default 2 (smoke: 1)")
    parser.add_argument("--max-attempts", type=int, default=5)
    parser.add_argument("--database-url", help="an empty database; default: SQLite in a temp dir")
    parser.add_argument("--timeout", type=float, help="seconds to wait for the jobs (600)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, database)")
    args = parser.parse_args()
    results = benchlib.start("soak", args, FULL, SMOKE)
    LocalRedis, free_port = benchlib.local_redis()
    rng = random.Random(args.seed)

    base = Path(tempfile.mkdtemp(prefix="trainyard-soak-"))
    cluster: Cluster | None = None
    try:
        with LocalRedis(base / "redis") as redis:
            db_url = args.database_url or f"sqlite:///{base / 'trainyard.db'}"
            env = benchlib.bench_env(
                **TIMINGS,
                TRAINYARD_HOME=str(base / "home"),
                TRAINYARD_DATABASE_URL=db_url,
                TRAINYARD_REDIS_URL=redis.url,
                TRAINYARD_ARTIFACTS_DIR=str(base / "artifacts"),
                TRAINYARD_MAX_ATTEMPTS=str(args.max_attempts),
                TRAINYARD_TORCH_THREADS=str(max(1, (os.cpu_count() or 1) // args.workers)),
            )
            cluster = Cluster(base, env)
            # Workers first: they take longest to boot and do not touch the database
            # until a job arrives, so they boot while the schema is made.
            workers = [cluster.start_worker() for _ in range(args.workers)]
            subprocess.run(
                [sys.executable, "-m", "server.cli", "db", "upgrade"],
                env=env, cwd=REPO, check=True, capture_output=True,
            )  # fmt: skip
            token = benchlib.api_token(db_url, "soak")
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            cluster.spawn(
                "web",
                ["web", "--host", "127.0.0.1", "--port", str(port),
                 "--workers", str(args.web_workers)],
            )  # fmt: skip
            cluster.spawn("reconciler", ["reconcile"])
            for w in workers:
                cluster.wait_ready(w)
            wait_http(url)

            started = time.monotonic()
            http = requests.Session()
            http.headers["Authorization"] = f"Bearer {token}"
            ids = []
            for i in range(args.jobs):
                resp = http.post(
                    f"{url}/api/v1/jobs", json=job_spec(rng, i, args.scale), timeout=30
                )
                ids.append(benchlib.check(resp)["id"])
            print(f"submitted {len(ids)} jobs in {time.monotonic() - started:.1f}s; logs in {base}")

            done = threading.Event()
            chaos = Chaos(cluster, db_url, args.kills, rng, done, args.gap, args.pool_share)
            drained: float | None = None
            chaos.start()
            cancels_left, next_cancel = args.cancels, started + 3.0
            cancelled_log: list[str] = []
            deadline = time.monotonic() + args.timeout
            while time.monotonic() < deadline:
                with transaction(db_url) as s:
                    states = dict(s.execute(select(Job.id, Job.state).where(Job.id.in_(ids))).all())
                if cancels_left and time.monotonic() > next_cancel:
                    # A running job if there is one (the loop must notice), else a queued one.
                    running = [i for i in ids if states[i] == "running"]
                    queued = [i for i in ids if states[i] == "queued"]
                    if running or queued:
                        victim = rng.choice(running or queued)
                        # Unchecked: the job may have finished since it was read (a 409).
                        http.post(f"{url}/api/v1/jobs/{victim}/cancel", timeout=30)
                        cancelled_log.append(f"job {victim} ({states[victim]})")
                        cancels_left -= 1
                    next_cancel = time.monotonic() + 4.0
                if all(states[i] in TERMINAL for i in ids) and not chaos.is_alive():
                    break
                if all(states[i] in TERMINAL for i in ids):
                    drained = drained or time.monotonic() - started
                    done.set()
                time.sleep(0.5)
            done.set()
            chaos.join(30)
            elapsed = time.monotonic() - started
            drained = drained or elapsed
            cluster.stop()
            report = build_report(db_url, ids, cluster.logs)
            print("\n".join(chaos.log))
            print(f"cancel requested: {', '.join(cancelled_log) or 'none'}")
            print(f"kills: {len(chaos.log)}; wall time {elapsed:.1f}s")
            report.print()
            ideal = report.training_s / args.workers
            print(f"drained in {drained:.1f}s; the succeeded jobs' training needs "
                  f"{ideal:.1f}s per worker")  # fmt: skip
            results.add(
                "jobs settled exactly once (none lost or duplicated)",
                report.settled_once, "jobs", report.submitted,
                benchlib.Target("ratio", ">=", 1.0, "ratio = 1 (all jobs)"),
                note=f"{len(chaos.log)} kills, {len(cancelled_log)} cancels",
            )  # fmt: skip
            results.add(
                "wall time to drain vs training time per worker",
                drained, "s", ideal,
                note=f"{args.workers} workers, {report.states['succeeded']} succeeded",
            )  # fmt: skip
            return 1 if report.duplicated or report.lost else 0
    finally:
        if cluster is not None:
            cluster.stop()
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
