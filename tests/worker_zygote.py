"""Start real `celery worker` processes in a fraction of a second, for the test suite.

A celery worker spends ~9 s of CPU importing torch, torch._dynamo, scikit-learn,
Celery and SQLAlchemy before it is ready, and the suite starts dozens of them (every
fault scenario boots its own). This process imports those libraries once and then,
for each request, forks a child that becomes a worker: new session, the request's
environment, working directory and log file, and then Celery's own command line
(`celery -A worker.celery_worker:app worker ...`) exactly as `python -m celery` runs it.
Nothing of the project's worker code (settings, the Celery app, shared-memory flags) is
imported here: each child imports it itself, under its own environment. It is what
Celery's prefork pool does to its children, one level up. `trainyard up` and the
preflight tests still start workers the ordinary way.

Protocol, over a unix socket, one connection per child: the client sends one JSON line
{"argv", "env", "cwd", "log"}; the zygote answers the child's pid, and when the child
has exited, its exit code (negative: killed by that signal), each on a line.

    python -m tests.worker_zygote SOCKET_PATH
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import runpy
import selectors
import signal
import socket
import sys
import traceback
from typing import Any

PRELOAD = (
    "torch",
    "torch._dynamo",
    "numpy",
    "sklearn.model_selection",
    "sklearn.datasets",
    "celery.bin.celery",
    "celery.worker",
    "celery.concurrency.prefork",
    "kombu.transport.redis",
    "sqlalchemy.dialects.postgresql",
    "sqlalchemy.dialects.sqlite",
    "psycopg",
    "pydantic",
    "worker.training",
)


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _become_worker(request: dict[str, Any], sockets: list[socket.socket], fds: list[int]) -> None:
    """In the forked child: never returns."""
    code = 1
    try:
        for sock in sockets:
            sock.close()
        for fd in fds:
            os.close(fd)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        os.setsid()
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = list(request["argv"])
        try:
            runpy.run_module("celery", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported in the worker's log, like a crash
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(path: str) -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    clients: dict[int, socket.socket] = {}
    parent = os.getppid()
    print("ready", flush=True)
    while os.getppid() == parent:  # the test process is gone: so is the zygote
        for key, _ in selector.select(timeout=1.0):
            if key.fileobj is server:
                conn, _ = server.accept()
                request = json.loads(_read_line(conn))
                pid = os.fork()
                if pid == 0:
                    selector.close()
                    _become_worker(request, [server, conn, *clients.values()], [wake_r, wake_w])
                clients[pid] = conn
                conn.sendall(f"{pid}\n".encode())
            else:
                os.read(wake_r, 4096)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = clients.pop(pid, None)
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
                conn.close()


if __name__ == "__main__":
    serve(sys.argv[1])
