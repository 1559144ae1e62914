"""The web server stays available under a hostile member (issue 11, "Availability of the
web server"), tested against the real gunicorn as `trainyard web` starts it.

- Open job streams do not hold request threads: 20 streams from one member, and
  `/healthz` and another user's `/api/v1/me` still answer; the per-user cap answers 429
  with Retry-After past it. With one request thread per stream (plain gthread, 16
  threads), `/healthz` waited ~26 s.
- Slow clients (slowloris): sockets that trickle one header line at a time are closed
  once the header timeout passes, and `/healthz` answers while 40 of them are open.
  With plain gthread they held every request thread for as long as they liked.

Nothing here asserts a timing: each request must complete within a generous timeout.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from server.cli.local.embedded_redis import free_port
from server.cli.process_commands import gunicorn_argv
from server.stream_hub import StreamHub
from server.stream_slots import Refusal, StreamSlot, StreamSlots
from shared import accounts
from shared.db import transaction
from shared.settings import Settings
from tests.conftest import REPO, SQLITE_ONLY, settings_env
from tests.job_rows import add_jobs

PASSWORD = "correct horse battery"
# Generous: an answer within this is "promptly"; the attacks made requests wait 26-43 s.
ANSWER_TIMEOUT_S = 10.0


class Gunicorn:
    """`trainyard web`'s gunicorn (same argv: 2 processes, its worker class and threads)."""

    def __init__(
        self, settings: Settings, tmp_path: Path, log_name: str = "gunicorn.log", **env: str
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = settings_env(settings)
        full_env.update(TRAINYARD_SECRET_KEY="test-secret-key-0123456789", **env)
        self.log = tmp_path / log_name
        argv = gunicorn_argv("127.0.0.1", self.port, workers=2, timeout=60)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                argv, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"gunicorn did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """SIGKILL to the master and its workers at once, as a host or container dies."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def accounts_and_job(db_url: str) -> dict[str, int]:
    with transaction(db_url) as s:
        alice = accounts.create_user(s, "alice", "member", PASSWORD)
        bob = accounts.create_user(s, "bob", "member", PASSWORD)
        s.flush()
        ids = {"alice": alice.id, "bob": bob.id}
    # Running: its stream stays open (a finished job's stream ends at once).
    [ids["job"]] = add_jobs(db_url, [{"owner": ids["alice"], "state": "running"}])
    return ids


def log_in(base: str, username: str) -> requests.Session:
    session = requests.Session()
    page = session.get(base + "/login", timeout=ANSWER_TIMEOUT_S).text
    token = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page)
    assert token, page[:500]
    resp = session.post(
        base + "/login",
        data={"username": username, "password": PASSWORD, "csrf_token": token.group(1)},
        timeout=ANSWER_TIMEOUT_S,
        allow_redirects=False,
    )
    assert resp.status_code in (302, 303), resp.text[:500]
    return session


def open_stream(port: int, path: str, cookies: str) -> socket.socket:
    """A raw socket that asked for `path` and is not read: an open job tab."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
        f"Cookie: {cookies}\r\n\r\n"
    )
    sock.sendall(request.encode())
    return sock


def status_of(sock: socket.socket) -> tuple[int, str]:
    """The response's status code and head (read up to the blank line); what came after
    the head is left in `BODY_START[sock]`."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    BODY_START[sock] = rest
    text = head.decode("latin-1")
    return int(text.split(" ", 2)[1]), text


BODY_START: dict[socket.socket, bytes] = {}


@SQLITE_ONLY
def test_open_job_streams_leave_requests_answered_and_are_capped_per_user(
    settings: Settings, accounts_and_job: dict[str, int], tmp_path: Path
) -> None:
    server = Gunicorn(settings, tmp_path, TRAINYARD_MAX_STREAMS_PER_USER="20")
    streams: list[socket.socket] = []
    try:
        alice = log_in(server.url, "alice")
        bob = log_in(server.url, "bob")
        cookies = "; ".join(f"{k}={v}" for k, v in alice.cookies.items())
        path = f"/jobs/{accounts_and_job['job']}/stream"
        # The attack: more open streams than the server has request threads (2 x 8).
        streams = [open_stream(server.port, path, cookies) for _ in range(20)]
        health = requests.get(server.url + "/healthz", timeout=ANSWER_TIMEOUT_S)
        assert health.status_code == 200, health.text
        me = bob.get(server.url + "/api/v1/me", timeout=ANSWER_TIMEOUT_S)
        assert me.status_code == 200 and me.json()["username"] == "bob", me.text
        statuses = [status_of(s) for s in streams]
        assert [code for code, _ in statuses] == [200] * 20, statuses
        assert all("text/event-stream" in head for _, head in statuses), statuses[0]
        # Each is a live stream: its first bytes (the retry line, then the job) arrive.
        body = BODY_START[streams[0]]
        while b"event: job" not in body:
            body += streams[0].recv(4096)
        assert body.startswith(b"retry:"), body[:200]

        # One more from the same member is over the per-user cap (across processes).
        extra = open_stream(server.port, path, cookies)
        streams.append(extra)
        code, head = status_of(extra)
        assert code == 429, head
        assert re.search(r"(?im)^retry-after: *\d+", head), head
        # Another member is not affected by alice's streams.
        bob_cookies = "; ".join(f"{k}={v}" for k, v in bob.cookies.items())
        bob_job = add_jobs(settings.resolved_database_url, [{"owner": accounts_and_job["bob"],
                                                            "state": "running"}])[0]  # fmt: skip
        theirs = open_stream(server.port, f"/jobs/{bob_job}/stream", bob_cookies)
        streams.append(theirs)
        assert status_of(theirs)[0] == 200

        # Closing tabs frees their slots: the cap counts open streams, not streams ever.
        for sock in streams[:5]:
            sock.close()
        again: socket.socket | None = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            again = open_stream(server.port, path, cookies)
            code, _ = status_of(again)
            if code == 200:
                break
            again.close()
            time.sleep(0.5)
        assert again is not None and code == 200, "a closed stream's slot never came back"
        streams.append(again)
    finally:
        for sock in streams:
            sock.close()
        server.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_slow_clients_are_cut_off_and_do_not_block_requests(
    settings: Settings, db_url: str, tmp_path: Path
) -> None:
    server = Gunicorn(settings, tmp_path, TRAINYARD_HEADER_TIMEOUT_SECONDS="3")
    slow: list[socket.socket] = []
    try:
        # Slowloris: a request line, then one header line every second, never the end.
        for _ in range(40):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            slow.append(sock)
        started = time.monotonic()
        answered = 0
        closed: set[int] = set()
        while time.monotonic() - started < 30 and len(closed) < len(slow):
            for i, sock in enumerate(slow):
                if i in closed:
                    continue
                try:
                    sock.sendall(f"X-Slow-{int(time.monotonic())}: 1\r\n".encode())
                except OSError:
                    closed.add(i)
            # Meanwhile, ordinary requests are answered.
            resp = requests.get(server.url + "/healthz", timeout=ANSWER_TIMEOUT_S)
            assert resp.status_code == 200
            answered += 1
            time.sleep(1)
        assert answered >= 2
        # Every slow socket was closed by the server (the header timeout), none answered.
        for i, sock in enumerate(slow):
            if i in closed:
                continue
            sock.settimeout(10)
            try:
                data = sock.recv(4096)
            except TimeoutError:
                pytest.fail("a slow client's connection was never closed")
            except OSError:
                data = b""  # reset: closed by the server
            assert data == b"", f"a slow client got an answer: {data[:200]!r}"
    finally:
        for sock in slow:
            sock.close()
        server.stop()


def test_gunicorn_runs_trainyards_worker_class() -> None:
    argv = gunicorn_argv("127.0.0.1", 8000, workers=2, timeout=60)
    assert argv[argv.index("--worker-class") + 1] == "server.gunicorn_worker.TrainyardWorker"
    # The web process never imports torch: neither does the worker class's module.
    out = subprocess.run(
        [sys.executable, "-c", "import sys, server.gunicorn_worker; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "False"


NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_repositorys_nginx_config_in_front_of_gunicorn(
    settings: Settings, accounts_and_job: dict[str, int], tmp_path: Path
) -> None:
    """deploy/nginx.conf as docker-compose.yml runs it, in front of the real gunicorn:
    pages pass, and a job stream arrives through it as it happens."""
    if os.environ.get("TRAINYARD_TEST_SKIP_NGINX") == "1":
        pytest.skip("TRAINYARD_TEST_SKIP_NGINX=1")
    if not os.access(NGINX, os.X_OK):
        pytest.fail("no nginx: install the 'nginx-light' package (scripts/test.sh does)")
    server = Gunicorn(settings, tmp_path, TRAINYARD_TRUSTED_PROXIES="1")
    port = free_port()
    config = (REPO / "deploy" / "nginx.conf").read_text()
    config = config.replace("server web:8000;", f"server 127.0.0.1:{server.port};")
    # No prediction server in this test: its upstream only has to resolve at start.
    config = config.replace("server serve:8100;", "server 127.0.0.1:9;")
    config = config.replace("listen 80;", f"listen 127.0.0.1:{port};")
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    (prefix / "nginx.conf").write_text(config)
    proxy = subprocess.Popen(
        [NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
         "-g", f"daemon off; pid {prefix / 'nginx.pid'};"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    sock: socket.socket | None = None
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert proxy.poll() is None, proxy.communicate()[1]
            assert time.monotonic() < deadline, "nginx never answered"
            time.sleep(0.2)
        alice = log_in(base, "alice")
        cookies = "; ".join(f"{k}={v}" for k, v in alice.cookies.items())
        sock = open_stream(port, f"/jobs/{accounts_and_job['job']}/stream", cookies)
        sock.settimeout(ANSWER_TIMEOUT_S)
        code, head = status_of(sock)
        assert code == 200 and "text/event-stream" in head, head
        body = BODY_START[sock]
        # The response lasts 30 s: its first messages arrive long before it ends.
        while b"event: job" not in body:
            chunk = sock.recv(4096)
            assert chunk, body
            body += chunk
    finally:
        if sock is not None:
            sock.close()
        proxy.terminate()
        proxy.wait(10)
        server.stop()


# ---------------------------------------------------------------- the caps themselves


def test_stream_slots_are_shared_by_processes_and_freed_on_release(redis_url: str) -> None:
    settings = Settings(redis_url=redis_url, max_streams_per_user=2)
    first, second = StreamSlots(settings), StreamSlots(settings)  # two web processes
    a, b = first.acquire(1), second.acquire(1)
    assert isinstance(a, StreamSlot) and isinstance(b, StreamSlot)
    refused = first.acquire(1)
    assert isinstance(refused, Refusal) and refused.retry_after > 0
    assert "at most 2 per user" in refused.message
    assert isinstance(second.acquire(2), StreamSlot), "another user has slots of their own"
    b.release()
    b.release()  # idempotent: the slot is not given back twice
    assert isinstance(first.acquire(1), StreamSlot)
    assert first.open == 2 and second.open == 1


def test_a_dead_processs_stream_slots_expire(redis_url: str) -> None:
    settings = Settings(redis_url=redis_url, max_streams_per_user=1)
    crashed = StreamSlots(settings, stream_seconds=0.5, grace_seconds=0.5)
    assert isinstance(crashed.acquire(7), StreamSlot)  # never released: the process died
    survivor = StreamSlots(settings, stream_seconds=0.5, grace_seconds=0.5)
    assert isinstance(survivor.acquire(7), Refusal)
    deadline = time.monotonic() + 20
    while isinstance(slot := survivor.acquire(7), Refusal):
        assert time.monotonic() < deadline, "the dead process's slot never expired"
        time.sleep(0.2)
    slot.release()


def test_stream_slots_per_process_cap_and_redis_down(redis_url: str) -> None:
    slots = StreamSlots(Settings(redis_url=redis_url, max_streams_per_process=2))
    taken = [slots.acquire(user) for user in (1, 2)]
    refused = slots.acquire(3)
    assert isinstance(refused, Refusal) and "this server" in refused.message
    for slot in taken:
        assert isinstance(slot, StreamSlot)
        slot.release()
    assert isinstance(slots.acquire(3), StreamSlot)
    # Redis unreachable: streams are not refused for it (the per-process cap still holds).
    down = StreamSlots(
        Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", max_streams_per_user=1)
    )
    first, second = down.acquire(1), down.acquire(1)
    assert isinstance(first, StreamSlot) and isinstance(second, StreamSlot)
    first.release()


# ---------------------------------------------------------------- the stream hub


def _hub_stream(hub: StreamHub, steps: Iterator[str | float]) -> tuple[socket.socket, list[str]]:
    """A connected pair: the server end given to `hub`, the client end returned."""
    server_end, client_end = socket.socketpair()
    closed: list[str] = []
    hub.add(server_end, b"HTTP/1.1 200 OK\r\n\r\n", steps, lambda: closed.append("closed"))
    client_end.settimeout(ANSWER_TIMEOUT_S)
    return client_end, closed


def _wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_stream_hub_sends_steps_then_closes_and_releases() -> None:
    hub = StreamHub()
    hub.start()
    try:
        client, closed = _hub_stream(hub, iter(["retry: 1\n\n", 0.05, "event: a\n\n"]))
        data = b""
        while chunk := client.recv(4096):
            data += chunk
        assert data == b"HTTP/1.1 200 OK\r\n\r\nretry: 1\n\nevent: a\n\n"
        _wait_for(lambda: closed == ["closed"])

        def forever() -> Iterator[str | float]:
            while True:
                yield "event: tick\n\n"
                yield 0.05

        # A client that leaves: its stream is closed and its slot released.
        gone, gone_closed = _hub_stream(hub, forever())
        assert gone.recv(4096).startswith(b"HTTP/1.1 200")
        gone.close()
        _wait_for(lambda: gone_closed == ["closed"])

        # A client that never reads: dropped once its backlog passes the buffer limit.
        def flood() -> Iterator[str | float]:
            while True:
                yield "data: " + "x" * 65536 + "\n\n"
                yield 0.0

        stuck, stuck_closed = _hub_stream(hub, flood())
        _wait_for(lambda: stuck_closed == ["closed"])
        stuck.close()

        # Steps that fail: that stream ends, the hub goes on.
        def broken() -> Iterator[str | float]:
            yield "retry: 1\n\n"
            raise RuntimeError("bug")

        bad, bad_closed = _hub_stream(hub, broken())
        _wait_for(lambda: bad_closed == ["closed"])
        bad.close()
        again, _ = _hub_stream(hub, iter(["event: b\n\n"]))
        assert again.recv(4096).endswith(b"event: b\n\n")
        assert hub._thread.is_alive()
    finally:
        hub.stop()
    assert not hub._thread.is_alive()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_head_of_a_stream_holds_nothing(
    settings: Settings, accounts_and_job: dict[str, int], tmp_path: Path
) -> None:
    """HEAD gets the stream's head at once and gives its slot back (a body iterated in a
    request thread for HEAD would hold that thread for the stream's 30 s)."""
    server = Gunicorn(settings, tmp_path, TRAINYARD_MAX_STREAMS_PER_USER="1")
    try:
        alice = log_in(server.url, "alice")
        url = f"{server.url}/jobs/{accounts_and_job['job']}/stream"
        for _ in range(3):  # one slot: each HEAD must have given it back
            resp = alice.head(url, timeout=ANSWER_TIMEOUT_S)
            assert resp.status_code == 200 and resp.content == b""
            assert resp.headers["Content-Type"].startswith("text/event-stream")
    finally:
        server.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_oversized_header_blocks_are_refused_without_a_thread(
    settings: Settings, tmp_path: Path
) -> None:
    server = Gunicorn(settings, tmp_path)
    try:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=ANSWER_TIMEOUT_S)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        # 80 KiB of headers and never the blank line (then it would trickle the rest).
        for i in range(10):
            sock.sendall(f"X-Big-{i}: {'a' * 8000}\r\n".encode())
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(4096):
                answer += chunk
        # A 431, or a reset when the close lands before the answer is read (the unread
        # headers make the kernel reset the connection): closed either way.
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431"), answer[:200]
        sock.close()
        assert requests.get(server.url + "/healthz", timeout=ANSWER_TIMEOUT_S).status_code == 200
    finally:
        server.stop()
