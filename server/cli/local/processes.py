"""Is a pid still the process we started? Used before signalling a pid read from a file.

A pid in `run/up.json` or `redis/redis.pid` may belong to a process that has since
exited, or been reused by an unrelated one; these helpers let local mode tell them
apart by the command line, so it never signals a stranger.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path


def process_cmdline(pid: int) -> str | None:
    """The command line (or process title) of a live, non-zombie process; None if gone."""
    with contextlib.suppress(ChildProcessError, OSError):
        # Reap it first if it is our own exited child: a zombie still answers kill(pid, 0).
        os.waitpid(pid, os.WNOHANG)
    proc = Path(f"/proc/{pid}")
    if proc.parent.is_dir() and Path("/proc/self").exists():
        try:
            raw = (proc / "cmdline").read_bytes()
        except OSError:
            return None
        # Zombies and kernel threads have an empty cmdline.
        return raw.replace(b"\0", b" ").decode(errors="replace").strip() or None
    try:  # macOS and other systems without /proc
        out = subprocess.run(
            ["ps", "-o", "stat=,command=", "-p", str(pid)],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out or out.startswith("Z"):
        return None
    return out.split(None, 1)[1] if " " in out else None


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait up to `timeout` seconds for `pid` to exit; whether it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process_cmdline(pid) is None:
            return True
        time.sleep(0.05)
    return process_cmdline(pid) is None
