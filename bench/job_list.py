"""Job list, jobs page and leaderboard with 100k jobs in the database.

Seeds `--jobs` jobs (default 100,000) with a realistic mix (mostly finished, a few
running and queued; 21 owners; tags from common to rare; final metrics on succeeded
jobs; a share of evaluate jobs and of unnamed jobs) by bulk insert into SQLite and, if
reachable, PostgreSQL. The rows go in at schema revision 0005 and the migration to
head follows, so the job-tags and final-metrics backfills (revisions 0006, 0007),
which write the job_tags and job_final_metrics rows, are timed at this size too.

Then measures, through Flask's test client (the whole request: auth, query, JSON or
HTML), p50 and p95 of:

    GET /api/v1/jobs            first page (admin and member), a deep keyset page, a
                                tag filter (common and rare), a name search, name sort
    GET /                       the jobs page, plain and filtered
    GET /leaderboard            a dataset's top 20 by a metric

Each line is printed next to its floor, measured in the same run: the raw SQL SELECT
for the same page (the same rows, through the same engine, no ORM, no HTTP), as a
ratio of the p95s; and against the target of p95 <= 50 ms per page
(docs/architecture.md, "Performance targets"). The full run is not part of the test
suite:

    .venv/bin/python bench/job_list.py [--jobs 100000] [--repeat 40] [--sqlite-only]
        [--pg-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres] [--explain]
        [--smoke] [--results rows.jsonl]

`--smoke`: 300 jobs, 3 repeats, every case on each database: it proves that the seeding,
the migrations and every page still work (tests/test_benchmarks.py), nothing more.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import benchlib  # before shared/ and server/: it puts the repository on sys.path
import sqlalchemy as sa

from shared import accounts
from shared.db import get_engine, transaction
from shared.migrate import upgrade_database
from shared.settings import Settings

TARGET_MS = 50.0
TARGET = benchlib.Target("figure", "<=", TARGET_MS, f"p95 <= {TARGET_MS:.0f} ms")

# (dataset, task, models that fit it); the first ones are the popular ones.
DATASETS = [
    ("digits", "classification", ["cnn", "mlp", "resnet"]),
    ("mnist", "classification", ["cnn", "resnet", "mlp"]),
    ("cifar10", "classification", ["resnet", "cnn"]),
    ("fashion_mnist", "classification", ["cnn", "resnet"]),
    ("iris", "classification", ["mlp"]),
    ("wine", "classification", ["mlp"]),
    ("breast_cancer", "classification", ["mlp"]),
    ("synthetic_sequences", "classification", ["lstm", "gru", "transformer"]),
    ("synthetic_regression", "regression", ["mlp"]),
]
DATASET_WEIGHTS = [30, 20, 15, 10, 5, 5, 5, 6, 4]
# A few very common tags, a long tail, and one that ~0.1% of jobs carry.
COMMON_TAGS = ["baseline", "sweep", "nightly"]
TAIL_TAGS = [f"exp-{i:02d}" for i in range(40)]
RARE_TAG = "regression-hunt"
STATES = ["succeeded", "failed", "cancelled", "running", "queued"]
STATE_WEIGHTS = [78, 9, 7, 3, 3]
OPTIMIZERS = ["adam", "adamw", "sgd"]


# ---------------------------------------------------------------- seeding


def _tags(rng: random.Random) -> list[str]:
    tags = []
    if rng.random() < 0.35:
        tags.append("baseline")
    if rng.random() < 0.25:
        tags.append(rng.choice(COMMON_TAGS[1:]))
    tags += rng.sample(TAIL_TAGS, rng.choice([0, 0, 1, 1, 2]))
    if rng.random() < 0.001:
        tags.append(RARE_TAG)
    return list(dict.fromkeys(tags))


def _metrics(rng: random.Random, kind: str, task: str) -> dict[str, Any]:
    if kind == "evaluate":
        if task == "regression":
            mse = rng.uniform(0.05, 2.0)
            return {"mse": mse, "mae": mse**0.5 * 0.8, "r2": max(0.0, 1 - mse / 2.5)}
        acc = rng.uniform(0.55, 0.995)
        return {"accuracy": acc, "precision": acc - 0.01, "recall": acc - 0.005, "f1": acc - 0.008}
    epochs = rng.randint(3, 50)
    common = {
        "train_loss": rng.uniform(0.01, 1.2),
        "val_loss": rng.uniform(0.03, 1.5),
        "lr": 0.001,
        "epochs_run": epochs,
        "steps": epochs * 120,
        "duration_s": rng.uniform(5, 4000),
        "samples_per_s": rng.uniform(800, 9000),
        "seed": 0,
    }
    if task == "regression":
        return common | {"val_mse": rng.uniform(0.05, 2.0), "val_mae": rng.uniform(0.1, 1.2),
                         "val_r2": rng.uniform(0.2, 0.98), "best_metric": "val_loss"}  # fmt: skip
    return common | {"val_accuracy": rng.uniform(0.5, 0.995), "val_f1": rng.uniform(0.45, 0.99),
                     "best_metric": "val_loss"}  # fmt: skip


def _job_rows(n: int, owner_ids: list[int], rng: random.Random) -> Iterator[dict[str, Any]]:
    start = datetime(2026, 9, 1)
    span = timedelta(days=90).total_seconds()
    for i in range(n):
        created = start + timedelta(seconds=span * i / n)
        dataset, task, models = rng.choices(DATASETS, DATASET_WEIGHTS)[0]
        model = rng.choice(models)
        # Recent jobs are the ones still running or queued.
        state = rng.choices(STATES, STATE_WEIGHTS)[0] if i > n * 0.98 else rng.choices(
            STATES[:3], STATE_WEIGHTS[:3])[0]  # fmt: skip
        kind = "evaluate" if rng.random() < 0.12 else "train"
        lr = rng.choice([1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 0.1])
        batch, epochs = rng.choice([16, 32, 64, 128]), rng.choice([5, 10, 20, 50])
        name = None if rng.random() < 0.05 else f"{dataset}-{model}-lr{lr:g}-{i}"
        tags = _tags(rng)
        if kind == "train":
            spec = {"kind": "train", "name": name, "tags": tags,
                    "dataset": {"name": dataset, "params": {}, "val_fraction": 0.2},
                    "model": {"name": model, "params": {"hidden": rng.choice([64, 128, 256])}},
                    "optimizer": {"name": rng.choice(OPTIMIZERS), "lr": lr},
                    "epochs": epochs, "batch_size": batch, "seed": rng.randint(0, 5),
                    "resources": {"gpus": 0}, "priority": 5}  # fmt: skip
        else:
            spec = {"kind": "evaluate", "name": name, "tags": tags, "source_job_id": max(1, i - 7),
                    "dataset": {"split": "test"}, "checkpoint": "best"}  # fmt: skip
        started = created + timedelta(seconds=rng.uniform(0.05, 30)) if state != "queued" else None
        finished = (
            started + timedelta(seconds=rng.uniform(5, 4000))
            if started is not None and state in ("succeeded", "failed", "cancelled")
            else None
        )
        running = state == "running"
        yield {
            "owner_id": rng.choice(owner_ids),
            "kind": kind,
            "name": name,
            "state": state,
            "queue": "cpu",
            "priority": 5,
            "spec": spec,
            "model_name": model,
            "dataset_name": dataset,
            "source_job_id": None,
            "attempt": 0 if state == "queued" else 1,
            "max_attempts": 3,
            "worker": "bench-host:1234" if running else None,
            "cancel_requested": False,
            "progress": {
                "epoch": 2,
                "epochs": epochs,
                "step": 240,
                "steps_total": epochs * 120,
                "samples_per_s": 5000.0,
                "eta_s": 30.0,
                "fraction": 0.2,
            }
            if running
            else None,  # fmt: skip
            # What the worker stores (worker/runner.py): the spec it ran, and the metrics.
            "result": {
                "trainyard_version": "0.1.0",
                "spec": spec,
                "metrics": _metrics(rng, kind, task),
            }
            if state == "succeeded"
            else None,  # fmt: skip
            "error_type": "UserError" if state == "failed" else None,
            "error_message": "loss diverged" if state == "failed" else None,
            "created_at": created,
            "started_at": started,
            "finished_at": finished,
            "updated_at": finished or started or created,
        }


def seed(url: str, n: int, seed_value: int = 0) -> dict[str, float]:
    """Users and `n` jobs at revision 0005, then the upgrade to head. Returns timings."""
    rng = random.Random(seed_value)
    upgrade_database(url, "0005")
    engine = get_engine(url)
    # Rows as the schema stood at 0005, through reflected tables: the ORM maps today's
    # columns, which the old schema lacks.
    users = sa.Table("users", sa.MetaData(), autoload_with=engine)
    jobs = sa.Table("jobs", sa.MetaData(), autoload_with=engine)
    names = [("bench-admin", "admin")] + [(f"member{i:02d}", "member") for i in range(20)]
    with engine.begin() as conn:
        conn.execute(
            users.insert(),
            [
                {"username": u, "role": r, "is_active": True, "created_at": datetime.now()}
                for u, r in names
            ],
        )
        by_name = dict(conn.execute(sa.select(users.c.username, users.c.id)).all())
    # The admin last, as before: members own most jobs.
    owner_ids = [by_name[u] for u, r in names[1:]] + [by_name["bench-admin"]]
    t0 = time.perf_counter()
    batch: list[dict[str, Any]] = []
    with engine.begin() as conn:
        for row in _job_rows(n, owner_ids, rng):
            batch.append(row)
            if len(batch) == 5000:
                conn.execute(jobs.insert(), batch)
                batch.clear()
        if batch:
            conn.execute(jobs.insert(), batch)
    inserted = time.perf_counter() - t0
    t0 = time.perf_counter()
    # 0006 backfills job_tags from the specs, 0007 job_final_metrics from the succeeded
    # jobs' result metrics: the rows finish_job writes for a job that succeeds now.
    upgrade_database(url)
    migrated = time.perf_counter() - t0
    # Fresh statistics and (PostgreSQL) a visibility map, as autovacuum keeps them on a
    # database that has been running a while.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE" if url.startswith("postgresql") else "ANALYZE"))
    engine.dispose()
    return {"insert_s": inserted, "migrate_s": migrated}


# ---------------------------------------------------------------- measuring


def _session_client(app: Any, url: str, username: str) -> Any:
    from server.auth import principal
    from shared.orm import User

    client = app.test_client()
    with transaction(url) as s:
        user = s.scalars(sa.select(User).where(User.username == username)).one()
        session_id = principal(user).get_id()
    with client.session_transaction() as sess:
        sess["_user_id"], sess["_fresh"] = session_id, True
    return client


def _cases(url: str) -> list[tuple[str, str, str]]:
    """(label, who, path): who is "admin" or "member" (a member owns ~1/21 of the jobs).
    A label in FILLED must show rows: the bench tells a page that lost its rows (or its
    row markup) from a fast one."""
    engine = get_engine(url)
    with engine.connect() as conn:
        low = conn.execute(sa.text("SELECT MIN(id) FROM jobs")).scalar_one()
        mid_name = conn.execute(
            sa.text("SELECT name FROM jobs WHERE name IS NOT NULL ORDER BY id LIMIT 1 OFFSET 50000")
        ).scalar_one_or_none()
    from server.job_query import PageCursor

    deep = f"before={low + 60}"
    name_cursor = PageCursor("name", True, 0, (mid_name or "m", 1)).encode()
    return [
        ("api: first page", "admin", "/api/v1/jobs"),
        ("api: first page, member", "member", "/api/v1/jobs"),
        ("api: deep keyset page (last 60 jobs)", "admin", f"/api/v1/jobs?{deep}"),
        ("api: sort=name, a middle page", "admin", f"/api/v1/jobs?sort=name&cursor={name_cursor}"),
        ("api: tag filter, common (35%)", "admin", "/api/v1/jobs?tag=baseline"),
        ("api: tag filter, rare (0.1%)", "admin", f"/api/v1/jobs?tag={RARE_TAG}"),
        ("api: name search, many hits", "admin", "/api/v1/jobs?q=mnist-cnn"),
        ("api: name search, no hit", "admin", "/api/v1/jobs?q=no-such-run"),
        ("api: name search, no hit, member", "member", "/api/v1/jobs?q=no-such-run"),
        ("page /: first page", "admin", "/"),
        ("page /: first page, member", "member", "/"),
        ("page /: state + dataset filter", "admin", "/?state=failed&dataset=mnist"),
        ("page /: tag + name search", "admin", "/?tag=sweep&q=cifar10"),
        # "cold": nothing cached; the ranking is one walk of the job_final_metrics index
        # on every request (server/web/leaderboard.py keeps no cache).
        ("page /leaderboard: most common dataset, cold", "admin", "/leaderboard"),
        ("page /leaderboard: a small dataset, cold", "admin", "/leaderboard?dataset=iris"),
        ("page /leaderboard: member, cold", "member", "/leaderboard"),
    ]


FILLED = {"api: first page", "api: first page, member", "page /: first page",
          "page /: first page, member", "page /leaderboard: most common dataset, cold"}  # fmt: skip


def _explain(conn: sa.Connection, statements: list[tuple[str, Any]], url: str) -> None:
    """Print each statement's plan: which indexes it uses (design: no full scans)."""
    for statement, params in statements:
        if url.startswith("postgresql"):
            plan = conn.exec_driver_sql("EXPLAIN " + statement, params).scalars().all()
        else:
            plan = [r[-1] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params)]
        for line in plan:
            print(f"      {line}")


def measure(
    label: str,
    url: str,
    repeat: int,
    home: Path,
    results: benchlib.Results,
    explain: bool = False,
) -> None:
    from server.app import create_app

    app = create_app(Settings(home=home / label, database_url=url))
    with transaction(url) as s:
        admin = accounts.find_user(s, "bench-admin")
        member = accounts.find_user(s, "member03")
        assert admin is not None and member is not None
        tokens = {
            "admin": accounts.create_token(s, admin, "bench").secret,
            "member": accounts.create_token(s, member, "bench").secret,
        }
    api = {}
    for who, token in tokens.items():
        api[who] = app.test_client()
        api[who].environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    pages = {"admin": _session_client(app, url, "bench-admin"),
             "member": _session_client(app, url, "member03")}  # fmt: skip
    engine = get_engine(url)
    capture = benchlib.Capture(engine, keep=lambda statement: "FROM jobs" in statement)
    floor_conn = engine.connect()
    if url.startswith("postgresql"):
        # As the app does for list queries: plans for the values at hand, not generic.
        floor_conn.exec_driver_sql("SET plan_cache_mode = force_custom_plan")
    print(
        f"\n{label}: p50 / p95 per request (ms), the raw SQL floor's p50 / p95 and the ratio"
        f" of the p95s; target p95 <= {TARGET_MS:.0f} ms"
    )
    print(
        f"  {'case':46s} {'p50':>7s} {'p95':>7s} {'floor50':>7s} {'floor95':>7s} {'ratio':>6s}  rows"
    )
    worst = 0.0
    for case, who, path in _cases(url):
        client = api[who] if path.startswith("/api/") else pages[who]
        client.get(path)  # the floor is what a warm request runs
        statements, resp = capture.during(lambda c=client, p=path: c.get(p))
        assert resp.status_code == 200, (path, resp.status_code, resp.get_data(as_text=True)[:300])
        rows = len(resp.get_json()["jobs"]) if path.startswith("/api/") else resp.get_data(
            as_text=True).count('class="job-row"') + resp.get_data(as_text=True).count('class="leaderboard-row')  # fmt: skip
        if case in FILLED and not rows:
            raise SystemExit(f"{label}: {case}: {path} shows no rows (has its markup changed?)")
        if not statements:
            raise SystemExit(f"{label}: {case}: {path} ran no SELECT on jobs to time as a floor")

        def floor(statements: list[tuple[str, Any]] = statements) -> None:
            for statement, params in statements:
                floor_conn.exec_driver_sql(statement, params).fetchall()

        def request(client: Any = client, path: str = path) -> None:
            client.get(path)

        times, _ = benchlib.timed(request, repeat)
        floors, _ = benchlib.timed(floor, repeat)
        p50, p95 = benchlib.percentile(times, 50), benchlib.percentile(times, 95)
        f50, f95 = benchlib.percentile(floors, 50), benchlib.percentile(floors, 95)
        worst = max(worst, p95)
        flag = "" if p95 <= TARGET_MS else "  over target"
        print(f"  {case:46s} {p50:7.1f} {p95:7.1f} {f50:7.1f} {f95:7.1f} {p95 / f95:5.1f}x  {rows:4d}{flag}")  # fmt: skip
        results.add(f"{label}: {case}", p95, "ms p95", f95, TARGET, note=f"{rows} rows")
        if explain:
            _explain(floor_conn, statements, url)
    floor_conn.close()
    print(f"  worst p95: {worst:.1f} ms (target <= {TARGET_MS:.0f} ms)")


def main() -> None:
    parser = benchlib.parser(__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, help="default 100,000 (smoke: 300)")
    parser.add_argument("--repeat", type=int, help="default 40 (smoke: 3)")
    benchlib.add_database_args(parser)
    parser.add_argument("--explain", action="store_true", help="print each query's plan")
    args = parser.parse_args()
    results = benchlib.start(
        "job_list", args, full={"jobs": 100_000, "repeat": 40}, smoke={"jobs": 300, "repeat": 3}
    )
    with tempfile.TemporaryDirectory() as tmp_dir, benchlib.databases(args, Path(tmp_dir)) as dbs:
        for label, url in dbs:
            timings = seed(url, args.jobs)
            print(f"{label}: seeded {args.jobs:,} jobs in {timings['insert_s']:.1f} s; "
                  f"migration to head (job_tags, job_final_metrics backfills) {timings['migrate_s']:.1f} s")  # fmt: skip
            measure(label, url, args.repeat, Path(tmp_dir), results, args.explain)


if __name__ == "__main__":
    main()
