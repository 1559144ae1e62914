"""A 1M-point series on the job page: served downsampled to <= 2,000 points in <= 100 ms
(docs/architecture.md, "Performance targets").

Seeds one running job with `--points` step_loss points (default 1,000,000) and a few
per-epoch keys by bulk insert, into SQLite and, if reachable, PostgreSQL. Then measures,
through Flask's test client (the whole request: auth, queries, JSON or HTML), p50 and
p95 of:

    GET /api/v1/jobs/{id}/metrics?max_points=2000   the page's initial chart data
    GET /jobs/{id}                                  the job page itself
    one poll of the live stream                     new points past a recent cursor

Each is printed next to its floor, measured in the same run. For the chart data: a raw
SELECT of the whole series through the same engine (what reading every point costs
before any downsampling), and the 100 ms target on the p50; the points it serves per
series are checked against the 2,000 it may send. For the page and the stream poll: the
SELECTs the request ran, replayed raw through the same engine (no target). The full
run is not part of the test suite:

    .venv/bin/python bench/metrics_render.py [--points 1000000] [--repeat 20] [--sqlite-only]
        [--pg-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres]
        [--smoke] [--results rows.jsonl]

`--smoke`: 5,000 points and 3 repeats on each database: it proves that the seeding and
the three requests still work (tests/test_benchmarks.py), nothing more.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib  # before shared/ and server/: it puts the repository on sys.path
import sqlalchemy as sa

from shared import accounts
from shared.db import get_engine, transaction, utcnow
from shared.migrate import upgrade_database
from shared.orm import Job, MetricPoint, User
from shared.settings import Settings

TARGET_MS = 100.0
MAX_POINTS = 2000
STEPS_PER_EPOCH = 1000
TARGET = benchlib.Target("figure", "<=", TARGET_MS, f"p50 <= {TARGET_MS:.0f} ms")
POINTS_TARGET = benchlib.Target("figure", "<=", MAX_POINTS, f"<= {MAX_POINTS:,} points")


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


def measure(
    label: str, url: str, args: argparse.Namespace, home: Path, results: benchlib.Results
) -> None:
    from server.app import create_app
    from server.auth import principal
    from server.job_stream import StreamCursor, poll_once
    from server.metric_series import metric_keys

    job_id, user_id, insert_s = seed(url, args.points)
    print(f"\n{label}: {args.points:,} step_loss points inserted in {insert_s:.1f} s "
          f"({args.points / insert_s:,.0f} rows/s)")  # fmt: skip
    engine = get_engine(url)
    capture = benchlib.Capture(engine)

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

    times, n = benchlib.timed(raw_select, max(3, args.repeat // 4))
    floor_p50 = benchlib.percentile(times, 50)
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

    times, body = benchlib.timed(metrics_request, args.repeat)
    p50, p95 = benchlib.percentile(times, 50), benchlib.percentile(times, 95)
    longest = max(len(s["step"]) for s in body["series"].values())
    verdict = "ok" if p50 <= TARGET_MS else "OVER TARGET"
    print(f"  {f'GET /metrics (<= {longest:,} points per series)':56} p50 {p50:7.1f} ms  "
          f"p95 {p95:7.1f} ms  {floor_p50 / p50:5.1f}x faster than the floor; "
          f"target {TARGET_MS:.0f} ms: {verdict}")  # fmt: skip
    results.add(f"{label}: GET /metrics?max_points={MAX_POINTS}", p50, "ms p50", floor_p50, TARGET,
                note=f"floor: raw SELECT of all {n:,} points")  # fmt: skip
    results.add(f"{label}: /metrics points per series", longest, "points", n, POINTS_TARGET,
                note="floor: the points stored")  # fmt: skip

    # The page and the stream poll have no design target; their floor is their own SQL.
    floor_conn = engine.connect()

    def replayed(statements: list[tuple[str, Any]]) -> float:
        def floor() -> None:
            for statement, params in statements:
                floor_conn.exec_driver_sql(statement, params).fetchall()

        return benchlib.percentile(benchlib.timed(floor, args.repeat)[0], 50)

    def page_request() -> None:
        resp = client.get(f"/jobs/{job_id}")
        assert resp.status_code == 200, resp.status_code

    statements, _ = capture.during(page_request)
    times, _ = benchlib.timed(page_request, args.repeat)
    p50, p95, f50 = (benchlib.percentile(times, 50), benchlib.percentile(times, 95),
                     replayed(statements))  # fmt: skip
    print(f"  {'GET /jobs/{id} (the HTML page)':56} p50 {p50:7.1f} ms  "
          f"p95 {p95:7.1f} ms  floor {f50:7.1f} ms")  # fmt: skip
    results.add(f"{label}: GET /jobs/{{id}} (the page)", p50, "ms p50", f50,
                note=f"floor: its {len(statements)} SELECTs replayed")  # fmt: skip

    with transaction(url) as s:
        keys = metric_keys(s, job_id)
    # A client one epoch and 20 steps behind: what each second of a live stream reads.
    epochs = math.ceil(args.points / STEPS_PER_EPOCH)
    cursor = StreamCursor(
        metrics={k: (args.points - 20 if k == "step_loss" else epochs - 1) for k in keys}
    )

    def stream_poll() -> Any:
        return poll_once(url, app.config["TRAINYARD_SETTINGS"], job_id, cursor)

    statements, poll = capture.during(stream_poll)
    if not poll.points:
        raise SystemExit(f"{label}: the stream poll found no new points past {cursor}")
    times, _ = benchlib.timed(stream_poll, args.repeat)
    p50, p95, f50 = (benchlib.percentile(times, 50), benchlib.percentile(times, 95),
                     replayed(statements))  # fmt: skip
    print(f"  {'one live-stream poll (state, points, log, timeline)':56} p50 {p50:7.1f} ms  "
          f"p95 {p95:7.1f} ms  floor {f50:7.1f} ms")  # fmt: skip
    results.add(f"{label}: one live-stream poll", p50, "ms p50", f50,
                note=f"floor: its {len(statements)} SELECTs replayed")  # fmt: skip
    floor_conn.close()
    engine.dispose()


def main() -> None:
    parser = benchlib.parser((__doc__ or "").split("\n")[0])
    parser.add_argument("--points", type=int, help="default 1,000,000 (smoke: 5,000)")
    parser.add_argument("--repeat", type=int, help="default 20 (smoke: 3)")
    benchlib.add_database_args(parser)
    args = parser.parse_args()
    results = benchlib.start(
        "metrics_render",
        args,
        full={"points": 1_000_000, "repeat": 20},
        smoke={"points": 5000, "repeat": 3},
    )
    with tempfile.TemporaryDirectory() as tmp_dir, benchlib.databases(args, Path(tmp_dir)) as dbs:
        for label, url in dbs:
            measure(label, url, args, Path(tmp_dir) / f"home-{label}", results)


if __name__ == "__main__":
    main()
