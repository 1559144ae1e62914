"""Graceful worker shutdown: the running job is checkpointed and handed back, not lost.

On SIGTERM Celery's main process stops consuming and then waits for running tasks to
finish, which for a training job can take hours, and whoever sent SIGTERM will not wait
that long. So the main process raises a flag that every prefork child can read (shared
memory created before the pool forks, no signals and no races with a child that is just
starting a task); the runner polls it between training steps, writes last.pt and
requeues the job at once, and the next worker resumes from there.

A child can also get a SIGTERM of its own, when a supervisor, systemd or a test harness
signals the whole process group. Billiard's handler would exit mid-step (a half-run
epoch, a checkpoint never written), so while a job runs a first SIGTERM raises the same
flag in that child; a second one still ends it the way billiard would.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing.sharedctypes
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

REASON = "worker shutting down"


class _ShutdownFlag:
    def __init__(self) -> None:
        self.shared: Any = None  # a ctypes c_bool in shared memory, set up in the main process
        self.local = False  # raised by this process's own SIGTERM

    def is_set(self) -> bool:
        # Called before every training step: two attribute reads, no lock, no syscall.
        return self.local or (self.shared is not None and bool(self.shared.value))


_flag = _ShutdownFlag()


def share_with_children() -> None:
    """Call in the worker's main process before the pool forks (celeryd_init)."""
    if _flag.shared is None:
        _flag.shared = multiprocessing.sharedctypes.RawValue(ctypes.c_bool, False)


def request_shutdown() -> None:
    """Ask every job in this process and its pool children to hand itself back.

    Only sets flags, so it is safe in a signal handler (worker_shutting_down runs in one).
    """
    _flag.local = True
    if _flag.shared is not None:
        _flag.shared.value = True


def shutdown_requested() -> bool:
    return _flag.is_set()


def reset_for_tests() -> None:
    _flag.local = False
    if _flag.shared is not None:
        _flag.shared.value = False


@contextmanager
def sigterm_hands_back_job() -> Iterator[None]:
    """While the body runs (a job), a first SIGTERM to this process requests a graceful
    hand-back instead of killing it; the previous handler is restored afterwards.

    Signal handlers can only be set from the main thread; elsewhere (a threads pool, a
    test calling the task in a thread) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is None:  # installed outside Python: nothing we can call or restore
        previous = signal.SIG_DFL
    received = 0

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        nonlocal received
        received += 1
        if received == 1:
            _flag.local = True
            return
        # Asked twice: stop waiting for the checkpoint and die the way we would have.
        signal.signal(signal.SIGTERM, previous)
        if callable(previous):
            previous(signum, frame)
        else:
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if received:
            log.info("pid %s: job handed back after SIGTERM", os.getpid())
