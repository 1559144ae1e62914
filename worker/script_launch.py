"""The first code a script job's child process runs: limits, then the team's entry point.

    python -m worker.script_launch ENTRY [ARGS...]

worker/script_job.py starts it in its own process group with an allowlisted
environment. Before the entry point runs, in this order:

1. Resource limits, hard as well as soft so the script cannot raise them again:
   RLIMIT_DATA (TRAINYARD_LAUNCH_MEMORY_BYTES: the job's resources.memory_gb within
   the worker slot's budget; DATA and not AS for the reasons in worker/memory_limit.py)
   and RLIMIT_NOFILE (TRAINYARD_LAUNCH_OPEN_FILES).
2. PR_SET_PDEATHSIG = SIGKILL: the kernel kills this process when the worker process
   that started it dies, however it dies (a SIGKILLed worker, the OOM killer), so a
   script never outlives its runner and keeps training a job that another worker now
   runs. The parent may have died before the call took effect, so the parent pid
   (TRAINYARD_LAUNCH_PARENT_PID) is checked after it: exit if it is not ours any more.
3. The launcher's own variables (TRAINYARD_LAUNCH_*) leave the environment, the
   process moves to the bundle's directory, and sys.path is the script's: its own
   directory and the bundle's top, not Trainyard's checkout.

Then ENTRY runs in this process: a file of the bundle (as `python ENTRY ARGS` would:
__name__ == "__main__", sys.argv = [ENTRY, *ARGS]), or
`package.module:function`, imported and called without arguments (sys.argv likewise).
The exit code is the script's: 0 when it returns, SystemExit's code, 1 for an
uncaught exception (whose traceback goes to stderr, i.e. the job log).

Standard library only: it runs before the script's imports and must not slow them.
"""

from __future__ import annotations

import builtins
import ctypes
import importlib
import os
import resource
import signal
import sys
import types
from pathlib import Path

PR_SET_PDEATHSIG = 1
# What the launcher reads and removes before the script starts.
MEMORY_VAR = "TRAINYARD_LAUNCH_MEMORY_BYTES"
OPEN_FILES_VAR = "TRAINYARD_LAUNCH_OPEN_FILES"
PARENT_VAR = "TRAINYARD_LAUNCH_PARENT_PID"
DIR_VAR = "TRAINYARD_LAUNCH_DIR"
# Where `worker` was imported from when it is not an installed package (a checkout):
# on sys.path for this module's import only, taken off before the script runs.
IMPORT_PATH_VAR = "TRAINYARD_LAUNCH_IMPORT_PATH"
LAUNCH_PREFIX = "TRAINYARD_LAUNCH_"
# The parent was gone before PR_SET_PDEATHSIG took effect: nobody waits for this.
ORPHANED_EXIT = 70


def set_limit(which: int, value: int) -> None:
    """Soft and hard limit to `value`, or to the hard limit already in force if lower."""
    _soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))


def die_with_parent(parent_pid: int | None) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        print(f"trainyard launcher: prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}",
              file=sys.stderr)  # fmt: skip
        sys.exit(ORPHANED_EXIT)
    if parent_pid is not None and os.getppid() != parent_pid:
        sys.exit(ORPHANED_EXIT)


def apply_environment() -> Path | None:
    """Limits and the death signal from the launcher's variables, which then leave the
    environment; returns the bundle's directory (None: stay where started)."""
    env = os.environ
    if env.get(MEMORY_VAR, "").isdigit():
        set_limit(resource.RLIMIT_DATA, int(env[MEMORY_VAR]))
    if env.get(OPEN_FILES_VAR, "").isdigit():
        set_limit(resource.RLIMIT_NOFILE, int(env[OPEN_FILES_VAR]))
    parent = env.get(PARENT_VAR, "")
    if sys.platform.startswith("linux"):
        die_with_parent(int(parent) if parent.isdigit() else None)
    directory = Path(env[DIR_VAR]) if env.get(DIR_VAR) else None
    import_path = env.get(IMPORT_PATH_VAR)
    if import_path:
        # `worker` stays imported (sys.modules), so `from worker import sdk` still
        # works; a package of the bundle named like Trainyard's others (shared,
        # server) is the bundle's.
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != import_path]
        kept = [
            p for p in env.get("PYTHONPATH", "").split(os.pathsep)
            if p and os.path.abspath(p) != import_path
        ]  # fmt: skip
        env["PYTHONPATH"] = os.pathsep.join(kept)
    for name in [n for n in env if n.startswith(LAUNCH_PREFIX)]:
        del env[name]
    return directory


def run_entry(entry: str, args: list[str], directory: Path) -> None:
    """Run `entry` as described in the module docstring; returns when it returns."""
    top = str(directory)
    # `python -m` put the directory it was started in first: the script's go there.
    if sys.path and sys.path[0] in ("", os.getcwd()):
        sys.path.pop(0)
    os.chdir(directory)
    sys.argv = [entry, *args]
    if ":" in entry:
        module_name, function_name = entry.split(":", 1)
        sys.path.insert(0, top)
        function = getattr(importlib.import_module(module_name), function_name)
        function()
        return
    path = directory / entry
    sys.path[:0] = list(dict.fromkeys([str(path.parent), top]))
    # As `python ENTRY` runs a file: a fresh __main__ module (what pickle and
    # multiprocessing look classes up in), __file__ absolute, argv[0] as given.
    # (runpy.run_path would put the full path in argv[0].)
    module = types.ModuleType("__main__")
    module.__file__ = str(path)
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    exec(compile(path.read_bytes(), str(path), "exec"), module.__dict__)  # noqa: S102 - the job


def main() -> None:
    if len(sys.argv) < 2:
        print("usage: python -m worker.script_launch ENTRY [ARGS...]", file=sys.stderr)
        sys.exit(2)
    entry, args = sys.argv[1], sys.argv[2:]
    directory = apply_environment() or Path.cwd()
    run_entry(entry, args, directory)


if __name__ == "__main__":
    main()
