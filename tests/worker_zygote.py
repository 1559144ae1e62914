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

The benchmarks' smoke runs (tests/test_benchmarks.py, bench/gpu_check.py's test) get the
zygote's socket in TRAINYARD_TEST_ZYGOTE_SOCKET and start their workers, reconcilers and
prediction servers through it too (`python -m server.cli ...`: the request's "module").
`trainyard worker` and `trainyard serve` exec `python -m celery|gunicorn`; in a child that
exec runs the module in place (_run_execs_in_place), or it would import torch afresh.
The two-hosts fault test asks for a host name of the child's own ("hostname": a UTS
namespace, as `unshare --uts` gives).

Protocol, over a unix socket, one connection per child: the client (`spawn`) sends one
JSON line {"argv", "env", "cwd", "log", "module", "hostname"}; the zygote answers the
child's pid, and when the child has exited, its exit code (negative: killed by that
signal), each on a line.

    python -m tests.worker_zygote SOCKET_PATH
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import runpy
import select
import selectors
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
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


CLONE_NEWUTS = 0x04000000


def _own_host_name(name: str) -> None:
    """A UTS namespace of its own with `name` as host name, as `unshare --uts` gives
    (root only): socket.gethostname() differs as on another machine."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWUTS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUTS)")
    socket.sethostname(name)


class _Exec(BaseException):  # noqa: N818 - not an error: the child's exec
    """Raised by the child's os.exec* for `python -m MODULE ...`: unwinds the program
    that exec'd (as exec discards it) and runs MODULE in its place, in this process."""

    def __init__(self, module: str, argv: list[str], env: dict[str, str]) -> None:
        super().__init__(module)
        self.module, self.argv, self.env = module, argv, env


def _run_execs_in_place() -> None:
    """`trainyard worker` and `trainyard serve` exec `python -m celery|gunicorn ...`: a
    real exec would start a fresh interpreter and import torch again (~9 s of CPU), so in
    a zygote child an exec of this Python with -m runs the module in place instead. Any
    other exec is a real one."""
    real = {name: getattr(os, name) for name in ("execv", "execve", "execvp", "execvpe")}

    def stand_in(name: str) -> Any:
        def exec_(path: str, args: Any, *env: Any) -> None:
            argv = [str(a) for a in args]
            if path == sys.executable and len(argv) > 2 and argv[1] == "-m":
                environ = dict(env[0]) if env else dict(os.environ)
                raise _Exec(argv[2], [argv[2], *argv[3:]], environ)
            real[name](path, args, *env)

        return exec_

    for name in real:
        setattr(os, name, stand_in(name))


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
        if request.get("hostname"):
            _own_host_name(request["hostname"])
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.chdir(request["cwd"])
        _run_execs_in_place()
        module, argv, env = request.get("module", "celery"), request["argv"], request["env"]
        while True:
            os.environ.clear()
            os.environ.update(env)
            sys.argv = list(argv)
            try:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except _Exec as exc:  # `trainyard worker` / `serve` exec Celery / gunicorn
                module, argv, env = exc.module, exc.argv, exc.env
                continue
            break
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


class ZygoteChild:
    """A process forked by tests/worker_zygote.py, with the parts of subprocess.Popen
    the tests use: pid, poll, wait, terminate, returncode."""

    def __init__(self, conn: socket.socket, argv: list[str]) -> None:
        self._conn = conn
        self._argv = argv
        self._buffer = b""
        self.returncode: int | None = None
        self.pid = int(self._line(timeout=30))

    def _line(self, timeout: float | None) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._conn], [], [], left)
            if not ready:
                raise subprocess.TimeoutExpired(self._argv, timeout or 0)
            chunk = self._conn.recv(64)
            if not chunk:  # the zygote is gone; so are its children's reports
                self._buffer += b"-9\n"
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def poll(self) -> int | None:
        if self.returncode is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.returncode = int(self._line(timeout=0))
                self._conn.close()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = int(self._line(timeout))
            self._conn.close()
        return self.returncode

    def terminate(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


def spawn(
    socket_path: str,
    argv: list[str],
    env: dict[str, str],
    log_path: Path,
    cwd: Path,
    module: str = "celery",
    hostname: str = "",
) -> ZygoteChild:
    """`python -m MODULE argv[1:]`, forked from the zygote at `socket_path`, in its own
    session, with stdout and stderr appended to `log_path`; with `hostname`, in a UTS
    namespace of its own under that name (root only)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(socket_path)
    request = {"argv": argv, "env": env, "cwd": str(cwd), "log": str(log_path),
               "module": module, "hostname": hostname}  # fmt: skip
    conn.sendall(json.dumps(request).encode() + b"\n")
    return ZygoteChild(conn, argv)


if __name__ == "__main__":
    serve(sys.argv[1])
