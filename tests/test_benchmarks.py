"""Smoke tests of the benchmarks: each bench/<name>.py runs with `--smoke` (tiny sizes, a
few seconds) and must exit 0 and report rows with a positive, finite figure, floor and
ratio. That is all: a benchmark that no longer runs against today's code fails here,
while its timings are never asserted (they depend on the machine; the full runs,
`make bench`, are not part of the suite).

Every benchmark makes its own databases (SQLite in a temporary directory, PostgreSQL
databases with random names) and, where it needs one, its own redis-server, so these
tests share nothing with the other tests and run in any order. What they share is the
test process's worker zygote, which forks the processes a benchmark starts.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import worker_zygote
from tests.helpers import bench_module

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
# A hang guard only: a smoke run takes seconds (the soak, the slowest, under a minute).
TIMEOUT_S = 300
# Those that start real `celery worker` subprocesses and a private Redis.
WITH_WORKERS = {"scale", "soak", "train_overhead"}


benchlib = bench_module("benchlib")
BENCHMARKS = benchlib.discover()


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    # The bench's temporary directories (databases, Redis, logs) go under this test's.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    zygote = worker_zygote()
    if zygote is not None:
        # Its workers, reconcilers and prediction servers fork from this test process's
        # zygote (bench/benchlib.py, spawn_python): the same commands, ~9 s less CPU each.
        env["TRAINYARD_TEST_ZYGOTE_SOCKET"] = zygote.socket_path
    return benchlib.run_bench([sys.executable, *args], TIMEOUT_S, capture=True, cwd=REPO, env=env)


def _failure(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"


def test_every_benchmark_is_smoke_tested() -> None:
    expected = {"job_list", "metrics_render", "scale", "script_channel", "soak", "stream_load",
                "train_overhead"}  # fmt: skip
    assert expected <= set(BENCHMARKS)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=[pytest.mark.integration] if name in WITH_WORKERS else [])
        for name in BENCHMARKS
    ],
)
def test_bench_smoke(name: str, tmp_path: Path) -> None:
    results = tmp_path / "rows.jsonl"
    proc = _run([str(BENCH / f"{name}.py"), "--smoke", "--results", str(results)], tmp_path)
    assert proc.returncode == 0, _failure(proc)
    assert proc.stdout.strip(), "the human-readable report is gone"
    rows = benchlib.read_rows(results)
    assert rows, f"no result rows\n{_failure(proc)}"
    for row in rows:
        assert row["bench"] == name and row["smoke"] is True, row
        for key in ("figure", "floor", "ratio"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["name"] and row["unit"], row
        assert row["met"] in (True, False, None), row


def test_run_all_table_shows_every_row_and_each_failure() -> None:
    """bench/run_all.py's table (`make bench`): figure, floor and ratio of each row, its
    target and whether it is met, and a line for a benchmark that did not run."""
    from rich.console import Console

    run_all = bench_module("run_all")
    row = {"bench": "job_list", "name": "sqlite: api: first page [admin]", "figure": 9.87,
           "unit": "ms p95", "floor": 0.5, "ratio": 19.74, "target": "p95 <= 50 ms",
           "met": True, "smoke": True, "note": ""}  # fmt: skip
    info = {**row, "name": "no target", "target": "", "met": None}
    outcomes = [
        run_all.Outcome("job_list", 0, 1.0, [row, info]),
        run_all.Outcome("soak", 1, 2.0, []),
    ]
    console = Console(record=True, width=200)
    console.print(run_all.table(outcomes, smoke=True))
    text = console.export_text()
    assert "floor (same run)" in text and "sqlite: api: first page [admin]" in text, text
    assert "9.87 ms p95" in text and "0.5 ms p95" in text and "19.7" in text, text
    assert "p95 <= 50 ms" in text and "yes" in text, text
    assert "soak" in text and "failed to run (exit 1)" in text, text


def test_run_all_exits_1_when_a_bench_does_not_run(tmp_path: Path) -> None:
    proc = _run(
        [str(BENCH / "run_all.py"), "--smoke", "--only", "metrics_render",
         "--args", "metrics_render=--no-such-flag"],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1, _failure(proc)
    assert "failed to run (exit 2)" in proc.stdout, proc.stdout
