"""The process supervisor behind `trainyard up`, with real child processes."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest

from server.cli.local.processes import process_cmdline
from server.cli.local.supervisor import Backoff, ChildSpec, Supervisor


def test_backoff_doubles_to_the_cap_and_resets_after_a_healthy_run() -> None:
    backoff = Backoff()
    assert [backoff.next_delay(0.1) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff.next_delay(120.0) == 1  # it ran fine for two minutes
    assert backoff.next_delay(0.1) == 2


def _fast_backoff() -> Backoff:
    return Backoff(initial=0.05, factor=2, cap=0.2, reset_after=60)


def _poll_until(supervisor: Supervisor, condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        supervisor.poll()
        time.sleep(0.02)


def test_supervisor_restarts_a_child_that_exits() -> None:
    crash = ChildSpec("crasher", [sys.executable, "-c", "raise SystemExit(3)"])
    steady = ChildSpec("steady", [sys.executable, "-c", "import time; time.sleep(60)"])
    supervisor = Supervisor([crash, steady], backoff=_fast_backoff, stop_timeout=5)
    supervisor.start()
    try:
        steady_pid = supervisor.pids()["steady"]
        _poll_until(supervisor, lambda: supervisor.restarts()["crasher"] >= 3)
        assert supervisor.pids()["steady"] == steady_pid
        assert supervisor.restarts()["steady"] == 0
    finally:
        supervisor.stop()
    assert supervisor.pids() == {}
    assert process_cmdline(steady_pid) is None


def test_supervisor_stop_reaches_grandchildren_and_kills_the_stubborn(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    parent = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen(['sleep', '60']); "
        f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    stubborn = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"open({str(tmp_path / 'ready')!r}, 'w').close(); time.sleep(60)"
    )
    supervisor = Supervisor(
        [
            ChildSpec("parent", [sys.executable, "-c", parent]),
            ChildSpec("stubborn", [sys.executable, "-c", stubborn]),
        ],
        stop_timeout=1.0,
    )
    supervisor.start()
    _poll_until(
        supervisor,
        lambda: pidfile.exists() and pidfile.read_text() and (tmp_path / "ready").exists(),
    )
    grandchild = int(pidfile.read_text())
    pids = supervisor.pids()
    started = time.monotonic()
    supervisor.stop()
    assert time.monotonic() - started < 5
    for pid in (grandchild, *pids.values()):
        assert process_cmdline(pid) is None, pid


def test_supervisor_survives_a_missing_executable(caplog: pytest.LogCaptureFixture) -> None:
    supervisor = Supervisor(
        [ChildSpec("ghost", ["/nonexistent/trainyard-ghost"])], backoff=_fast_backoff
    )
    supervisor.start()
    try:
        _poll_until(supervisor, lambda: supervisor.restarts()["ghost"] >= 2)
    finally:
        supervisor.stop()
    assert "cannot start ghost" in caplog.text


def test_supervisor_rejects_duplicate_names() -> None:
    with pytest.raises(ValueError, match="unique"):
        Supervisor([ChildSpec("a", ["true"]), ChildSpec("a", ["true"])])
