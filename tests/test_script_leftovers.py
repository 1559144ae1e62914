"""worker/script_leftovers.py: a dead worker's script processes are killed by the next
sweep of its own host's work directories, and nothing else is: not a live owner's, not
another deployment's job with the same number (it failed a CI run when two tests' job 1
attempt 1 met on one machine)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import psutil

from worker import script_leftovers


def attempt_dir(home: Path, owner_pid: int) -> Path:
    work = home / "script-work" / "job-1-attempt-1"
    (work / "tmp").mkdir(parents=True)
    started = psutil.Process(owner_pid).create_time() if psutil.pid_exists(owner_pid) else 0.0
    (work / script_leftovers.OWNER_FILE).write_text(
        json.dumps({"pid": owner_pid, "started": started})
    )
    return work


def survivor(work: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TRAINYARD_JOB_ID": "1", "TRAINYARD_ATTEMPT": "1",
           "TMPDIR": str(work / "tmp")}  # fmt: skip
    return subprocess.Popen(["sleep", "1000"], env=env)


def gone(proc: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + 5
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc.poll() is not None


def test_only_a_dead_owners_own_processes_are_killed(tmp_path: Path) -> None:
    dead = attempt_dir(tmp_path / "a", owner_pid=2**22 + 12345)  # no such process
    alive = attempt_dir(tmp_path / "b", owner_pid=os.getpid())
    other = attempt_dir(tmp_path / "c", owner_pid=2**22 + 12346)
    left, running = survivor(dead), survivor(alive)
    try:
        # Another home's sweep: its own dead dir holds nobody; a's job 1 is not its.
        assert script_leftovers.sweep(other.parent) == 0 and not other.exists()
        assert left.poll() is None
        assert script_leftovers.sweep(alive.parent) == 0 and alive.exists()  # live owner
        assert running.poll() is None
        assert script_leftovers.sweep(dead.parent) == 1
        assert gone(left) and not dead.exists()
    finally:
        for proc in (left, running):
            proc.kill()
            proc.wait()
