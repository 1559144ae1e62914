"""How fast a script job's metrics reach the database, against how fast the script can
write them.

Issue 14 asks that a script logging 1,000 metrics a second neither slows the runner
down nor loses points. A child process (the script's side) logs `--points` points with
`worker.sdk.log` as fast as it can into a pipe, as under a worker; two readers take
them:

    runner   worker/script_job.py's own pieces, as a script job uses them: the pipe's
             LineReader thread, the Channel (JSON parse, checks) and a real MetricSink
             writing batches to SQLite, fenced by the attempt; timed from the child's
             start until the last point is committed (every row is counted)
    floor    the same child and pipe, read by a bare loop that only counts newlines:
             the most any reader could take in

and reports points per second for each, and their ratio. The target is on the figure:
at least 10,000 points/s end to end, ten times the issue's 1,000 a second, so a script
logging that much is never held back by a full pipe.

    .venv/bin/python bench/script_channel.py [--points 200000] [--repeat 3] [--smoke]
        [--results rows.jsonl]

`--smoke`: 3,000 points once, proving the bench still runs (tests/test_benchmarks.py).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib  # before shared/ and worker/: it puts the repository on sys.path

TARGET = benchlib.Target("figure", ">=", 10_000.0, ">= 10,000 points/s")

_CHILD = """
import sys
from worker import sdk
for i in range(int(sys.argv[1])):
    sdk.log("m", i * 0.5, step=i, epoch=i // 1000)
"""


def _spawn(points: int, write_fd: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TRAINYARD_CHANNEL_FD": str(write_fd), "PYTHONPATH": str(benchlib.REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(points)], env=env, pass_fds=(write_fd,),
        cwd=benchlib.REPO,
    )  # fmt: skip
    os.close(write_fd)
    return proc


def floor_run(points: int) -> float:
    read_fd, write_fd = os.pipe()
    t0 = time.perf_counter()
    proc = _spawn(points, write_fd)
    lines = 0
    while chunk := os.read(read_fd, 1 << 16):
        lines += chunk.count(b"\n")
    elapsed = time.perf_counter() - t0
    os.close(read_fd)
    if proc.wait() != 0 or lines != points:
        raise SystemExit(f"floor: the child exited {proc.returncode} after {lines} lines")
    return elapsed


def runner_run(points: int, work: Path, run: int) -> float:
    from sqlalchemy import func, select

    from shared.db import get_engine, transaction, utcnow
    from shared.orm import Base, Job, MetricPoint
    from worker.job_log import JobLog
    from worker.metric_sink import MetricSink
    from worker.script_job import Channel, LineReader

    url = f"sqlite:///{work / f'run-{run}.db'}"
    Base.metadata.create_all(get_engine(url))
    with transaction(url) as s:
        job = Job(kind="script", state="running", queue="cpu", spec={}, attempt=1,
                  lease_expires_at=utcnow().replace(year=2100))  # fmt: skip
        s.add(job)
        s.flush()
        job_id = job.id
    read_fd, write_fd = os.pipe()
    sink = MetricSink(url, job_id, 1, flush_seconds=0.5, flush_points=500)
    with JobLog(work / f"run-{run}.log", job_id, 1) as job_log:
        channel = Channel(sink, job_log)
        reader = LineReader(read_fd, channel.line, "bench-channel", 1 << 20)
        t0 = time.perf_counter()
        with sink:
            reader.start()
            proc = _spawn(points, write_fd)
            reader.join()
        elapsed = time.perf_counter() - t0  # the sink's close wrote the last batch
    os.close(read_fd)
    with transaction(url) as s:
        stored = s.scalar(select(func.count()).select_from(MetricPoint))
    if proc.wait() != 0 or stored != points or channel.bad_lines:
        raise SystemExit(f"runner: {stored} of {points} points stored, exit {proc.returncode}")
    return elapsed


def main() -> None:
    parser = benchlib.parser(__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, help="default 200,000 (smoke: 3,000)")
    parser.add_argument("--repeat", type=int, help="default 3 (smoke: 1)")
    args = parser.parse_args()
    results = benchlib.start(
        "script_channel", args, full={"points": 200_000, "repeat": 3},
        smoke={"points": 3_000, "repeat": 1},
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        floors = [floor_run(args.points) for _ in range(args.repeat)]
        ours = [runner_run(args.points, Path(tmp), i) for i in range(args.repeat)]
    floor_rate = args.points / statistics.median(floors)
    rate = args.points / statistics.median(ours)
    print(f"{args.points:,} points, median of {args.repeat}:")
    print(f"  runner (pipe -> channel -> MetricSink -> SQLite) {rate:12,.0f} points/s")
    print(f"  floor  (pipe, newlines counted)                  {floor_rate:12,.0f} points/s")
    print(f"  ratio {rate / floor_rate:.2f}; target {TARGET.text}")
    results.add("sdk.log to committed rows", rate, "points/s", floor_rate, TARGET,
                note=f"{args.points} points, every one counted in the database")  # fmt: skip


if __name__ == "__main__":
    main()
