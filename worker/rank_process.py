"""Entry point of a data-parallel job's rank processes other than rank 0:
`python -m worker.rank_process --rank R --parent PID --label job-7-attempt-2`, with its
configuration as one JSON line on stdin (worker/training/distributed.py starts these).

Everything here is about the process's lifetime, done before torch is imported (a
second or more): the training itself is worker/training/distributed.py:run_rank.

- SIGINT and SIGTERM are ignored: they reach the whole process group (Ctrl-C, a
  supervisor), and rank 0 answers them by checkpointing and handing the job back,
  which needs this rank until then.
- The kernel SIGKILLs this process when its parent dies (PR_SET_PDEATHSIG); if the
  parent died before that was set, the parent pid has already changed and this exits.
- stdin is a pipe from rank 0: EOF means rank 0 is gone or done with this rank, and
  the process exits at once from a watcher thread, wherever the training stands.
"""

from __future__ import annotations

import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)

import argparse  # noqa: E402 - after the signals, which matter from the first moment
import ctypes  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from typing import BinaryIO  # noqa: E402

EXIT_PARENT_GONE = 3  # worker/training/distributed.py:EXIT_PARENT_GONE
PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when the parent dies (Linux); exit now if it already has."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            print(f"prctl(PR_SET_PDEATHSIG) failed: errno {ctypes.get_errno()}", file=sys.stderr)
    if os.getppid() != parent:
        os._exit(EXIT_PARENT_GONE)


def _exit_at_eof(stream: BinaryIO) -> None:
    try:
        while stream.read(65536):
            pass
    finally:
        os._exit(EXIT_PARENT_GONE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.rank_process")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--label", default="job")
    args = parser.parse_args(argv)
    die_with_parent(args.parent)
    line = sys.stdin.buffer.readline()
    if not line:
        return EXIT_PARENT_GONE
    config = json.loads(line)
    threading.Thread(
        target=_exit_at_eof, args=(sys.stdin.buffer,), name="parent-watch", daemon=True
    ).start()
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {args.label} rank {args.rank} %(levelname)s %(name)s: %(message)s",
    )
    from worker.training.distributed import run_rank

    try:
        return run_rank(args.rank, config)
    except Exception:  # noqa: BLE001 - rank 0 reports the last line to the job
        lines = traceback.format_exc().rstrip().splitlines()
        print("\n".join(lines), file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
