"""A 1M-point series on the job page (design.md 5: served downsampled to <= 2,000 points
in <= 100 ms).

Seeds one running job with `--points` step_loss points (default 1,000,000) and a few
per-epoch keys by bulk insert, into SQLite and, if reachable, PostgreSQL. Then measures,
through Flask's test client (the whole request: auth, queries, JSON or HTML), p50 and
p95 of:

    GET /api/v1/jobs/{id}/metrics?max_points=2000   the page's initial chart data
    GET /jobs/{id}                                  the job page itself
    one poll of the live stream                     new points past a recent cursor

Each is printed next to its floor, measured in the same run: a raw SELECT of the whole
series through the same engine (what reading every point costs before any
downsampling), and against the 100 ms target. Not a test:

    .venv/bin/python bench/metrics_render.py [--points 1000000] [--repeat 20] [--sqlite-only]
        [--pg-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import sqlalchemy as sa  # noqa: E402

from shared import accounts  # noqa: E402
from shared.db import get_engine, transaction, utcnow  # noqa: E402
from shared.migrate import upgrade_database  # noqa: E402
from shared.orm import Job, MetricPoint, User  # noqa: E402
from shared.settings import Settings  # noqa: E402

TARGET_MS = 100.0
MAX_POINTS = 2000
STEPS_PER_EPOCH = 1000
DEFAULT_PG = os.environ.get(
    "TRAINYARD_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def seed(url: str, points: int) -> tuple[int, int, float]:
    """(job id, user id, seconds to insert): a running job with `points` step_loss points."""
    upgrade_database(url)
    with transaction(url) as s:
        user = accounts.create_user(s, "bench", "admin")
        epochs = math.ceil(points / STEPS_PER_EPOCH)
        spec = {"kind": "train", "name": "million-points", "tags": [], "dataset": {"name": "digits"},
                "model": {"name": "mlp", "params": {}}, "epochs": epochs, "batch_size": 16}  # fmt: skip
        job = Job(owner_id=user.id, kind="train", name="million-points", state="running",
                  queue="cpu", spec=spec, model_name="mlp", dataset_name="digits", attempt=1,
                  worker="bench:1", started_at=utcnow(),
                  progress={"epoch": epochs, "epochs": epochs, "step": points,
                            "steps_total": points, "samples_per_s": 7300.0, "eta_s": 1.0,
                            "fraction": 1.0})  # fmt: skip
        s.add(job)
        s.flush()
        job_id, user_id = job.id, user.id
    engine = get_engine(url)
    table = MetricPoint.__table__
    t0 = time.perf_counter()
    with engine.begin() as conn:
        batch: list[dict[str, Any]] = []
        for step in range(1, points + 1):
            batch.append({"job_id": job_id, "attempt": 1, "key": "step_loss", "step": step,
                          "epoch": (step - 1) // STEPS_PER_EPOCH + 1,
                          "value": 2.0 / math.sqrt(step), "wall_time": float(step)})  # fmt: skip
            if len(batch) == 20_000:
                conn.execute(table.insert(), batch)
                batch.clear()
        for key in ("train_loss", "val_loss", "val_accuracy", "lr"):
            batch += [{"job_id": job_id, "attempt": 1, "key": key, "step": e, "epoch": e,
                       "value": 1.0 / e, "wall_time": float(e)}
                      for e in range(1, epochs + 1)]  # fmt: skip
        conn.execute(table.insert(), batch)
    inserted = time.perf_counter() - t0
    with engine.begin() as conn:
        conn.execute(sa.text("ANALYZE"))
    return job_id, user_id, inserted


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    """(p50 ms, p95 ms, last result) over `repeat` calls after one warm-up."""
    result = fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.95))], result


def measure(label: str, url: str, args: argparse.Namespace, home: Path) -> None:
    from server.app import create_app
    from server.auth import principal
    from server.job_stream import StreamCursor, poll_once
    from server.metric_series import metric_keys

    job_id, user_id, insert_s = seed(url, args.points)
    print(f"\n{label}: {args.points:,} step_loss points inserted in {insert_s:.1f} s "
          f"({args.points / insert_s:,.0f} rows/s)")  # fmt: skip
    engine = get_engine(url)

    def raw_select() -> int:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT step, epoch, value FROM metric_points "
                    "WHERE job_id = :j AND key = 'step_loss' ORDER BY step"
                ),
                {"j": job_id},
            ).fetchall()
        return len(rows)

    floor_p50, _, n = timed(raw_select, max(3, args.repeat // 4))
    print(f"  {f'floor: raw SELECT of the whole series ({n:,} rows)':56} p50 {floor_p50:7.1f} ms")

    app = create_app(Settings(home=home, database_url=url, redis_url=None), {"TESTING": True})
    client = app.test_client()
    with transaction(url) as s:
        session_id = principal(s.get(User, user_id)).get_id()
    with client.session_transaction() as sess:
        sess["_user_id"], sess["_fresh"] = session_id, True

    def metrics_request() -> dict[str, Any]:
        resp = client.get(f"/api/v1/jobs/{job_id}/metrics?max_points={MAX_POINTS}")
        assert resp.status_code == 200, resp.get_data(as_text=True)[:300]
        return resp.get_json()

    p50, p95, body = timed(metrics_request, args.repeat)
    longest = max(len(s["step"]) for s in body["series"].values())
    verdict = "ok" if p50 <= TARGET_MS else "OVER TARGET"
    print(f"  {f'GET /metrics (<= {longest:,} points per series)':56} p50 {p50:7.1f} ms  "
          f"p95 {p95:7.1f} ms  {floor_p50 / p50:5.1f}x faster than the floor; "
          f"target {TARGET_MS:.0f} ms: {verdict}")  # fmt: skip

    def page_request() -> None:
        resp = client.get(f"/jobs/{job_id}")
        assert resp.status_code == 200, resp.status_code

    p50, p95, _ = timed(page_request, args.repeat)
    print(f"  {'GET /jobs/{id} (the HTML page)':56} p50 {p50:7.1f} ms  "
          f"p95 {p95:7.1f} ms")  # fmt: skip

    with transaction(url) as s:
        keys = metric_keys(s, job_id)
    # A client one epoch and 20 steps behind: what each second of a live stream reads.
    epochs = math.ceil(args.points / STEPS_PER_EPOCH)
    cursor = StreamCursor(
        metrics={k: (args.points - 20 if k == "step_loss" else epochs - 1) for k in keys}
    )

    def stream_poll() -> int:
        return len(poll_once(url, app.config["TRAINYARD_SETTINGS"], job_id, cursor))

    p50, p95, _ = timed(stream_poll, args.repeat)
    print(f"  {'one live-stream poll (state, points, log, timeline)':56} p50 {p50:7.1f} ms  "
          f"p95 {p95:7.1f} ms")  # fmt: skip
    engine.dispose()


@contextlib.contextmanager
def databases(args: argparse.Namespace, tmp: Path) -> Iterator[list[tuple[str, str]]]:
    """(label, url) of each database to measure; a PostgreSQL one is created and dropped."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--sqlite-only", action="store_true")
    parser.add_argument("--pg-url", default=DEFAULT_PG)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir, databases(args, Path(tmp_dir)) as dbs:
        for label, url in dbs:
            measure(label, url, args, Path(tmp_dir) / f"home-{label}")


if __name__ == "__main__":
    main()
