"""Open job pages do not slow the web server down: `/healthz` and `/api/v1/me` latency
with `--streams` live job streams open, against the same server with none.

Starts the real gunicorn exactly as `trainyard web` does (server/cli/process_commands.py
`gunicorn_argv`: 2 processes, Trainyard's worker class, 8 request threads each) on a
private Redis and SQLite and, if reachable, PostgreSQL, with `--jobs` running jobs.
Then, on one database at a time:

    floor   p50 and p95 of `--repeat` requests to /healthz and to /api/v1/me (a token)
            with no stream open
    figure  the same with `--streams` job streams open (spread over the jobs, read by a
            thread as a browser would; each polls the database once a second)

Each figure is printed next to its floor from the same run, with the target of
docs/architecture.md ("Performance targets"): p50 within 1.5x and p95 within 2x of the
floor, i.e. essentially unchanged. With plain gthread (`--worker-class gthread`, the
design before issue 11) each stream held a request thread: past 16 streams requests
wait for a stream to end (up to 30 s), which this prints as a failure to answer.

    .venv/bin/python bench/stream_load.py [--streams 100] [--repeat 200] [--jobs 5]
        [--sqlite-only] [--pg-url ...] [--worker-class gthread] [--smoke] [--results f]

`--smoke`: 5 streams, 10 requests, SQLite only: it proves the server, the streams and
the measurement still work (tests/test_benchmarks.py), nothing more.
"""

from __future__ import annotations

import argparse
import re
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import benchlib  # before shared/ and server/: it puts the repository on sys.path
import requests

from server.cli.process_commands import gunicorn_argv
from shared import accounts
from shared.db import transaction, utcnow
from shared.migrate import upgrade_database
from shared.orm import Job

PASSWORD = "bench password 1234"
P50 = benchlib.Target("ratio", "<=", 1.5, "p50 <= 1.5x floor")
P95 = benchlib.Target("ratio", "<=", 2.0, "p95 <= 2x floor")
FULL = {"streams": 100, "repeat": 200, "jobs": 5}
SMOKE = {"streams": 5, "repeat": 10, "jobs": 2}
REQUEST_TIMEOUT_S = 60.0


def seed(url: str, jobs: int) -> tuple[list[int], str]:
    """(running job ids, an API token): one member owns the jobs and watches them."""
    upgrade_database(url)
    with transaction(url) as s:
        user = accounts.create_user(s, "watcher", "member", PASSWORD)
        s.flush()
        spec = {"kind": "train", "name": "watched", "tags": [], "dataset": {"name": "digits"},
                "model": {"name": "mlp", "params": {}}, "epochs": 10, "batch_size": 16}  # fmt: skip
        rows = [
            Job(owner_id=user.id, kind="train", name=f"watched-{i}", state="running",
                queue="cpu", spec=spec, model_name="mlp", dataset_name="digits", attempt=1,
                worker="bench:1", started_at=utcnow())
            for i in range(jobs)
        ]  # fmt: skip
        s.add_all(rows)
        s.flush()
        ids = [j.id for j in rows]
        token = accounts.create_token(s, user, "bench").secret
    return ids, token


class Server:
    def __init__(self, env: dict[str, str], log: Path, worker_class: str | None) -> None:
        _, free_port = benchlib.local_redis()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = gunicorn_argv("127.0.0.1", self.port, workers=2, timeout=60)
        if worker_class:
            argv[argv.index("--worker-class") + 1] = worker_class
        with open(log, "w") as f:
            self.proc = subprocess.Popen(
                argv, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=benchlib.REPO,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"gunicorn did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def session_cookie(url: str) -> str:
    """The Cookie header of a browser logged in as the watcher."""
    http = requests.Session()
    page = http.get(url + "/login", timeout=REQUEST_TIMEOUT_S).text
    token = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page)
    if token is None:
        raise SystemExit("no CSRF token on /login")
    resp = http.post(
        url + "/login",
        data={"username": "watcher", "password": PASSWORD, "csrf_token": token.group(1)},
        allow_redirects=False,
        timeout=REQUEST_TIMEOUT_S,
    )
    if resp.status_code not in (302, 303):
        raise SystemExit(f"login failed: HTTP {resp.status_code}")
    return "; ".join(f"{k}={v}" for k, v in http.cookies.items())


class Streams:
    """`count` open job streams, drained by one thread like browsers reading them."""

    def __init__(self, port: int, paths: list[str], cookie: str, count: int) -> None:
        self.selector = selectors.DefaultSelector()
        self.sockets: list[socket.socket] = []
        self.bytes = 0
        self.ended = 0
        for i in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT_S)
            sock.sendall(
                f"GET {paths[i % len(paths)]} HTTP/1.1\r\nHost: bench\r\n"
                f"Accept: text/event-stream\r\nCookie: {cookie}\r\n\r\n".encode()
            )
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ)
            self.sockets.append(sock)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        while not self.stopping.is_set():
            for key, _ in self.selector.select(0.2):
                try:
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    # A response ends after 30 s; the measurement is shorter than that.
                    self.selector.unregister(key.fileobj)
                    self.ended += 1
                self.bytes += len(data)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join()
        for sock in self.sockets:
            sock.close()


def latencies(http: requests.Session, url: str, repeat: int) -> list[float] | None:
    """Milliseconds of each request (after one warm-up), or None if one did not answer."""
    times = []
    try:
        http.get(url, timeout=REQUEST_TIMEOUT_S).raise_for_status()
        for _ in range(repeat):
            t0 = time.perf_counter()
            http.get(url, timeout=REQUEST_TIMEOUT_S).raise_for_status()
            times.append((time.perf_counter() - t0) * 1000)
    except requests.RequestException as exc:
        print(f"  {url}: no answer ({type(exc).__name__})")
        return None
    return times


def measure(
    label: str, db_url: str, redis_url: str, tmp: Path, args: argparse.Namespace,
    results: benchlib.Results,
) -> None:  # fmt: skip
    job_ids, token = seed(db_url, args.jobs)
    env = benchlib.bench_env(
        TRAINYARD_HOME=str(tmp / f"home-{label}"),
        TRAINYARD_DATABASE_URL=db_url,
        TRAINYARD_REDIS_URL=redis_url,
        TRAINYARD_SECRET_KEY="bench-secret-key-0123456789",
        # The load, not the caps, is measured here: one member may open every stream.
        TRAINYARD_MAX_STREAMS_PER_USER=str(args.streams + 10),
        TRAINYARD_MAX_STREAMS_PER_PROCESS=str(args.streams + 10),
    )
    server = Server(env, tmp / f"gunicorn-{label}.log", args.worker_class)
    try:
        api = requests.Session()
        api.headers["Authorization"] = f"Bearer {token}"
        plain = requests.Session()
        cookie = session_cookie(server.url)
        targets = {"/healthz": plain, "/api/v1/me": api}
        floor = {p: latencies(http, server.url + p, args.repeat) for p, http in targets.items()}
        paths = [f"/jobs/{job_id}/stream" for job_id in job_ids]
        streams = Streams(server.port, paths, cookie, args.streams)
        try:
            time.sleep(2.0)  # every stream answered and polling
            loaded = {
                p: latencies(http, server.url + p, args.repeat) for p, http in targets.items()
            }
            received = streams.bytes
        finally:
            streams.close()
        print(f"{label}: {args.streams} streams open, {received:,} bytes received from them")
        for path in targets:
            base, load = floor[path], loaded[path]
            if base is None or load is None:
                raise SystemExit(f"{label}: {path} did not answer")
            for q, target in ((50, P50), (95, P95)):
                figure = benchlib.percentile(load, q)
                under = benchlib.percentile(base, q)
                row = results.add(
                    f"{label}: {path} p{q} with {args.streams} streams open",
                    figure, f"ms p{q}", under, target,
                    note=f"floor: the same requests with no stream open ({args.repeat} each)",
                )  # fmt: skip
                print(f"  {path:12} p{q}: {figure:7.2f} ms  (no streams {under:6.2f} ms, "
                      f"x{row.ratio:.2f}; target {target.text})")  # fmt: skip
    finally:
        server.stop()


def main() -> int:
    parser = benchlib.parser(__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, help="open job streams (default 100)")
    parser.add_argument("--repeat", type=int, help="requests per measurement (default 200)")
    parser.add_argument("--jobs", type=int, help="running jobs the streams watch (default 5)")
    parser.add_argument("--worker-class", help="another gunicorn worker class, to compare")
    benchlib.add_database_args(parser)
    args = parser.parse_args()
    if args.smoke:
        args.sqlite_only = True
    results = benchlib.start("stream_load", args, FULL, SMOKE)
    LocalRedis, _ = benchlib.local_redis()
    with tempfile.TemporaryDirectory(prefix="trainyard-streams-") as tmp_name:
        tmp = Path(tmp_name)
        with LocalRedis(tmp / "redis") as redis, benchlib.databases(args, tmp) as dbs:
            for label, url in dbs:
                measure(label, url, redis.url, tmp, args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
