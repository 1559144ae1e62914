"""Keep a few child processes running: the process supervisor behind `trainyard up`.

Each child runs in its own process group, so stopping it reaches everything it started
(gunicorn's workers, Celery's pool children), and a Ctrl-C in the terminal reaches only
the supervisor, which then stops the children in order instead of all dying at once.

A child that exits on its own is restarted after a delay that doubles on every quick
failure (1 s, 2 s, 4 s, ... capped at 30 s), so a child that cannot start does not spin
the CPU, and one that runs for a while before failing is retried promptly.

POSIX only (process groups). No Flask, Celery or torch imports here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChildSpec:
    """How to start one child. `env=None` inherits the supervisor's environment."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str] | None = None
    cwd: str | None = None


@dataclass
class Backoff:
    """Restart delays: initial, then doubled per consecutive quick failure, up to `cap`.

    A run that lasted `reset_after` seconds or more counts as healthy and starts the
    sequence again, so one crash a day is not punished with the maximum delay.
    """

    initial: float = 1.0
    factor: float = 2.0
    cap: float = 30.0
    reset_after: float = 60.0
    _failures: int = field(default=0, init=False)

    def next_delay(self, ran_for: float) -> float:
        if ran_for >= self.reset_after:
            self._failures = 0
        delay = min(self.cap, self.initial * self.factor**self._failures)
        self._failures += 1
        return delay


@dataclass
class _Child:
    spec: ChildSpec
    backoff: Backoff
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    restarts: int = 0


class Supervisor:
    """Start children, restart the ones that exit, and stop them all on request.

    Call `poll()` regularly (every fraction of a second) from the owner's loop; it
    notices exits and performs due restarts. `stop()` is safe to call more than once.
    """

    def __init__(
        self,
        specs: Sequence[ChildSpec],
        *,
        backoff: Callable[[], Backoff] = Backoff,
        stop_timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"child names must be unique: {names}")
        self._children = [_Child(spec, backoff()) for spec in specs]
        self._stop_timeout = stop_timeout
        self._clock = clock
        self._stopping = False

    def start(self) -> None:
        for child in self._children:
            self._spawn(child)

    def pids(self) -> dict[str, int]:
        """Pids of the children running now (each is also its process group id)."""
        return {
            c.spec.name: c.process.pid
            for c in self._children
            if c.process is not None and c.process.poll() is None
        }

    def restarts(self) -> dict[str, int]:
        return {c.spec.name: c.restarts for c in self._children}

    def poll(self) -> None:
        if self._stopping:
            return
        now = self._clock()
        for child in self._children:
            proc = child.process
            if proc is not None and proc.poll() is not None:
                ran_for = now - child.started_at
                delay = child.backoff.next_delay(ran_for)
                log.warning(
                    "%s (pid %s) exited with code %s after %.1f s; restarting in %.0f s",
                    child.spec.name, proc.pid, proc.returncode, ran_for, delay,
                )  # fmt: skip
                # Whatever it left in its group (a gunicorn worker, a pool child) goes too.
                _signal_group(proc.pid, signal.SIGKILL)
                child.process = None
                child.restart_at = now + delay
            if child.process is None and child.restart_at is not None and now >= child.restart_at:
                child.restart_at = None
                child.restarts += 1
                self._spawn(child)

    def stop(self) -> None:
        """SIGTERM every child's process group, wait up to `stop_timeout`, then SIGKILL."""
        self._stopping = True
        running = [c.process for c in self._children if c.process is not None]
        for proc in running:
            if proc.poll() is None:
                log.info("stopping pid %s", proc.pid)
            # Signal the group even if the leader has exited: its children may not have.
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self._stop_timeout
        for proc in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
        for proc in running:
            if proc.poll() is None:
                log.warning(
                    "pid %s did not stop within %.0f s; killing it", proc.pid, self._stop_timeout
                )
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        for child in self._children:
            child.process = None
            child.restart_at = None

    def _spawn(self, child: _Child) -> None:
        spec = child.spec
        try:
            child.process = subprocess.Popen(
                list(spec.argv),
                env=dict(spec.env) if spec.env is not None else None,
                cwd=spec.cwd,
                stdin=subprocess.DEVNULL,
                # setsid: its own session and process group, pgid == pid.
                start_new_session=True,
            )
        except OSError as exc:
            # A missing executable is retried like a crash, with the same backoff.
            log.error("cannot start %s: %s", spec.name, exc)
            child.process = None
            child.restart_at = self._clock() + child.backoff.next_delay(0.0)
            return
        child.started_at = self._clock()
        log.info("started %s (pid %s): %s", spec.name, child.process.pid, " ".join(spec.argv))


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
