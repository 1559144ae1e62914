"""Scaling across worker slots, and what the scheduler costs per job.

A batch of small CPU jobs (a tiny MLP on digits) runs twice through a real `celery
worker` on a private Redis and SQLite: once with 1 slot, once with 2 (one torch thread
each, TRAINYARD_TORCH_THREADS=1). Prints both wall times (first job created to last job
finished) and the speed-up (target >= 1.8x on 2 cores: docs/architecture.md,
"Performance targets").

The scheduler's dispatch overhead per job is the work a slot does before it claims,
beyond a plain claim: ranking the queue's waiting jobs (shared/scheduling.py
`candidates_for`), measured here against the same database with the whole batch
waiting. Its floor, measured in the same run against the same worker, is a raw Celery
round trip: a broadcast `ping` to the worker and its reply through Redis.

    .venv/bin/python bench/scale.py [--jobs 16] [--epochs 20] [--batches 3] [--smoke]
        [--results rows.jsonl]

Each slot count runs `--batches` batches in a row and keeps the median wall time: a
2-core machine shared with anything else varies by 20% from one batch to the next.
The jobs checkpoint every 5 epochs: an epoch here takes ~35 ms, and a checkpoint every
epoch keeps the writer thread (worker/training/checkpoint.py) busy enough that a lone
slot would already use part of the second core, which is not the "one thread per
slot" this measures.

`--smoke`: 4 jobs of one epoch; proves the path still works (tests/test_benchmarks.py),
its numbers mean nothing.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import benchlib

TARGET = benchlib.Target("ratio", ">=", 1.8, "speed-up >= 1.8x")
POLL_S = 0.25


def job_spec(epochs: int) -> dict[str, Any]:
    return {
        "kind": "train",
        "name": "scale",
        "dataset": {"name": "digits"},
        "model": {"name": "mlp", "params": {"hidden": 256, "layers": 2}},
        "optimizer": {"name": "adam", "lr": 0.003},
        "epochs": epochs,
        "batch_size": 32,
        "seed": 0,
        "checkpoint_every_epochs": 5,
    }


@contextmanager
def cluster(slots: int) -> Iterator[tuple[Any, str, Any, str]]:
    """A private Redis, SQLite, web app and a worker with `slots` slots; yields
    (requests session, API base URL, Settings, the worker's Celery node name)."""
    with tempfile.TemporaryDirectory() as tmp, benchlib.small_cluster(
        Path(tmp), slots=slots, role="admin",  # no running-jobs cap in the way
        node=f"scale{slots}@bench", TRAINYARD_TORCH_THREADS="1",
    ) as c:  # fmt: skip
        yield c.http, c.url, c.settings, c.node


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(POLL_S)


def run_batch(http: Any, url: str, settings: Any, jobs: int, epochs: int) -> float:
    """Seconds from the first job's creation until the last one finished, both read
    from the jobs' own rows: the bench does not poll the API per job while the slots
    run, since on 2 cores that polling would take a core's share from the slots."""
    # One job first: the slots' imports, dataset cache and first connection are paid
    # before the clock starts, in both runs alike.
    warm = benchlib.check(http.post(f"{url}/jobs", json=job_spec(1), timeout=10))["id"]
    wait_for(lambda: state(http, url, warm) == "succeeded", 300, "the warm-up job")
    ids = [
        benchlib.check(http.post(f"{url}/jobs", json=job_spec(epochs), timeout=10))["id"]
        for _ in range(jobs)
    ]
    rows: list[Any] = []

    def done() -> bool:
        rows[:] = batch_rows(settings, ids)
        for job_id, s, _, _ in rows:
            if s in ("failed", "cancelled"):
                raise SystemExit(f"job {job_id} {s}")
        return all(s == "succeeded" for _, s, _, _ in rows)

    wait_for(done, 1800, "the batch")
    return (max(r[3] for r in rows) - min(r[2] for r in rows)).total_seconds()


def batch_rows(settings: Any, ids: list[int]) -> list[Any]:
    """(id, state, created_at, finished_at) of each job: one cheap query per poll."""
    from sqlalchemy import select

    from shared.db import transaction
    from shared.orm import Job

    with transaction(settings.resolved_database_url) as session:
        query = select(Job.id, Job.state, Job.created_at, Job.finished_at)
        return list(session.execute(query.where(Job.id.in_(ids))).all())


def state(http: Any, url: str, job_id: int) -> str:
    return str(benchlib.check(http.get(f"{url}/jobs/{job_id}", timeout=10))["state"])


def dispatch_ms(settings: Any, http: Any, url: str, jobs: int, rounds: int) -> list[float]:
    """Milliseconds of one dispatch decision (`candidates_for`) with `jobs` jobs waiting;
    the caller holds every slot busy so that they stay waiting. Cancelled afterwards."""
    from shared.db import transaction
    from shared.scheduling import candidates_for

    ids = [
        benchlib.check(http.post(f"{url}/jobs", json=job_spec(1), timeout=10))["id"]
        for _ in range(jobs)
    ]
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        with transaction(settings.resolved_database_url) as session:
            candidates_for(session, settings, ids[-1])
        times.append((time.perf_counter() - t0) * 1000)
    for job_id in ids:
        http.post(f"{url}/jobs/{job_id}/cancel", timeout=10)
    return times


def celery_round_trip_ms(settings: Any, node: str, rounds: int) -> list[float]:
    """A raw Celery round trip: a broadcast ping to the worker and its reply."""
    from shared.celery_app import make_celery

    app = make_celery(settings)
    try:
        times = []
        for _ in range(rounds + 1):
            t0 = time.perf_counter()
            replies = app.control.ping(destination=[node], timeout=5.0, limit=1)
            elapsed = (time.perf_counter() - t0) * 1000
            if not replies:
                raise SystemExit(f"no ping reply from {node}")
            times.append(elapsed)
        return times[1:]  # the first pays for the connection
    finally:
        app.close()


def main() -> None:
    parser = benchlib.parser((__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=None, help="jobs per batch (default 16)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per job (default 20)")
    parser.add_argument("--batches", type=int, default=None, help="batches per slot count (3)")
    args = parser.parse_args()
    results = benchlib.start(
        "scale",
        args,
        full={"jobs": 16, "epochs": 20, "batches": 3},
        smoke={"jobs": 4, "epochs": 1, "batches": 1},
    )
    walls: dict[int, float] = {}
    for slots in (1, 2):
        with cluster(slots) as (http, url, settings, node):
            batches = [
                run_batch(http, url, settings, args.jobs, args.epochs) for _ in range(args.batches)
            ]
            walls[slots] = statistics.median(batches)
            print(f"{slots} slot(s): {args.jobs} jobs x {args.epochs} epochs in "
                  f"{walls[slots]:.2f} s (median of {' '.join(f'{b:.2f}' for b in batches)})",
                  flush=True)  # fmt: skip
            if slots == 2:
                rounds = 5 if args.smoke else 50
                ping = statistics.median(celery_round_trip_ms(settings, node, rounds))
                # The slots are idle now, so hold both with long jobs while measuring.
                hold = [
                    benchlib.check(http.post(f"{url}/jobs", json=job_spec(10_000), timeout=10))
                    for _ in range(2)
                ]
                wait_for(
                    lambda held=hold: all(state(http, url, h["id"]) == "running" for h in held),
                    120, "the slots to be held",
                )  # fmt: skip
                ranked = statistics.median(dispatch_ms(settings, http, url, args.jobs, rounds))
                for h in hold:
                    http.post(f"{url}/jobs/{h['id']}/cancel", timeout=10)
    speedup = walls[1] / walls[2]
    print(f"speed-up with 2 slots: {speedup:.2f}x ({TARGET.text})")
    print(f"scheduler dispatch (rank {args.jobs} waiting jobs): {ranked:.2f} ms per job; "
          f"raw Celery round trip (ping): {ping:.2f} ms; ratio {ranked / ping:.2f}")  # fmt: skip
    # figure / floor: the 1-slot wall time over the 2-slot one is the speed-up.
    results.add(f"{args.jobs} jobs: wall time, 1 slot vs 2 slots", walls[1], "s", walls[2], TARGET)
    results.add(
        f"scheduler dispatch per job ({args.jobs} waiting) vs raw Celery round trip",
        ranked, "ms", ping,
    )  # fmt: skip


if __name__ == "__main__":
    main()
