"""The loop `trainyard up` runs once everything is started, until a signal stops it.

Each turn it restarts children that exited (through the Supervisor) and the embedded
Redis if it died, keeps run/up.json current, and announces readiness once /healthz
answers. Signals only set a flag, so stopping always happens in `up` itself, in order.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import requests
from rich.console import Console

from server.cli.local.admin_bootstrap import BootstrapResult, print_login
from server.cli.local.run_dir import write_state
from server.cli.local.supervisor import Backoff, Supervisor

if TYPE_CHECKING:
    from server.cli.local.embedded_redis import LocalRedis

log = logging.getLogger(__name__)


class StopSignals:
    """Turn SIGINT/SIGTERM/SIGHUP into a flag the supervision loop checks."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.received is None:
            self.received = signum


def healthy(url: str) -> bool:
    """Whether the web server at `url` answers /healthz."""
    try:
        return requests.get(f"{url}/healthz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def supervise(
    supervisor: Supervisor,
    redis_server: LocalRedis | None,
    stop: StopSignals,
    run_dir: Path,
    url: str,
    startup_timeout: float,
    console: Console,
    login: BootstrapResult | None = None,
) -> None:
    """The loop of `up`: restart what exits, announce readiness, return on a signal."""
    from server.cli.local.embedded_redis import LocalRedisError

    ready = False
    deadline = time.monotonic() + startup_timeout
    written: dict[str, Any] = {}
    redis_backoff = Backoff()
    redis_started = time.monotonic()
    redis_retry_at: float | None = None
    while stop.received is None:
        supervisor.poll()
        now = time.monotonic()
        if redis_server is not None and not redis_server.is_running():
            # Same port on restart, so the children's TRAINYARD_REDIS_URL stays right.
            if redis_retry_at is None:
                delay = redis_backoff.next_delay(now - redis_started)
                log.warning(
                    "embedded Redis exited; restarting in %.0f s:\n%s",
                    delay,
                    redis_server.log_tail(5),
                )
                redis_retry_at = now + delay
            elif now >= redis_retry_at:
                redis_retry_at = None
                redis_started = now
                try:
                    redis_server.start()
                except LocalRedisError as exc:
                    log.error("%s", exc)
        state = {
            "pid": os.getpid(),
            "url": url,
            "redis": {"pid": redis_server.pid, "url": redis_server.url} if redis_server else None,
            "children": supervisor.pids(),
            "restarts": supervisor.restarts(),
        }
        if state != written:
            write_state(run_dir, state)
            written = state
        if not ready:
            if healthy(url):
                ready = True
                console.print(f"Trainyard is running at {url}  (Ctrl-C to stop)")
                if login is not None:
                    print_login(console, login, url)
            elif now > deadline:
                raise click.ClickException(
                    f"the web server did not answer {url}/healthz within {startup_timeout:.0f} s; "
                    "see the log above"
                )
        time.sleep(0.5 if ready else 0.25)
