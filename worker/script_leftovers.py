"""What a SIGKILLed worker's script attempts leave on its host, and their removal.

The script itself dies with the pool process that ran it (PR_SET_PDEATHSIG,
worker/script_launch.py), but the death signal is the script's own: processes it
started (a data loader of its own, a `sleep`, a server) live on, and nobody removes the
attempt's work directory. Each attempt therefore writes `owner.json` (the pool
process's pid and start time) into its work directory; before a script attempt
starts, `sweep` looks at every work directory of this host's home whose owner is gone,
kills the processes that still carry that attempt's TRAINYARD_JOB_ID and
TRAINYARD_ATTEMPT and its TMPDIR, a directory inside that very work directory (the
contract's environment, which they inherited), and removes the directory. Matching on
the environment rather than a saved process group id means a recycled pid is never
mistaken for a survivor; matching the TMPDIR too means another deployment's job with
the same number on the same host (or another test's) is never touched.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

OWNER_FILE = "owner.json"
# The attempt's TMPDIR, inside its work directory (worker/script_job.py hands it over).
TMP_NAME = "tmp"
_ATTEMPT_DIR = re.compile(r"job-(\d+)-attempt-(\d+)")


def claim_dir(work: Path) -> None:
    """Mark `work` as this process's (written before the script starts)."""
    me = psutil.Process()
    (work / OWNER_FILE).write_text(json.dumps({"pid": me.pid, "started": me.create_time()}))


def _owner_alive(work: Path) -> bool:
    try:
        owner = json.loads((work / OWNER_FILE).read_text())
        return bool(psutil.Process(int(owner["pid"])).create_time() == owner["started"])
    except FileNotFoundError:
        # Being set up right now (the owner file comes just after the directory), or
        # from before owner files: left alone unless it is old.
        try:
            return (time.time() - work.stat().st_mtime) < 3600
        except OSError:
            return False
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError, KeyError, TypeError):
        return False


def _survivors(work: Path, job_id: int, attempt: int) -> list[psutil.Process]:
    found = []
    wanted = {
        "TRAINYARD_JOB_ID": str(job_id),
        "TRAINYARD_ATTEMPT": str(attempt),
        "TMPDIR": str(work / TMP_NAME),
    }
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            env = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
        if all(env.get(k) == v for k, v in wanted.items()):
            found.append(proc)
    return found


def sweep(root: Path) -> int:
    """Kill the survivors of dead owners' attempts under `root` (<home>/script-work)
    and remove their directories; how many processes were killed."""
    if not root.is_dir():
        return 0
    total = 0
    for work in root.iterdir():
        match = _ATTEMPT_DIR.fullmatch(work.name)
        if match is None or not work.is_dir() or _owner_alive(work):
            continue
        job_id, attempt = int(match.group(1)), int(match.group(2))
        killed = 0
        for proc in _survivors(work, job_id, attempt):
            try:
                proc.kill()
                killed += 1
            except psutil.NoSuchProcess:
                continue
            except psutil.AccessDenied:
                log.warning("cannot kill process %s left by job %s attempt %s", proc.pid,
                            job_id, attempt)  # fmt: skip
        if killed:
            log.warning(
                "killed %d process(es) left by job %s attempt %s, whose worker died",
                killed, job_id, attempt,
            )  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)
        total += killed
    return total
