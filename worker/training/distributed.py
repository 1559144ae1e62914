"""Running a data-parallel job: rank 0 in the calling process, the other ranks in
processes of their own, DistributedDataParallel between them (NCCL on GPUs, gloo on CPU).

`train_data_parallel` is what the runner calls for a job of several processes
(`resources.gpus` > 1, or `resources.processes` > 1 on CPU), and what a script calls to
run one without a worker (bench/gpu_check.py). Every rank runs `train_job` with a
`ProcessGroup` (worker/training/parallel.py); rank 0 alone reports to the sink, writes
checkpoints and decides when to stop. Why it is built this way
(docs/architecture.md, "Data-parallel jobs"):

- Rank 0 is the caller itself: the process that holds the job's lease, metric sink,
  memory limit and the slot's GPUs, whose `should_stop` is the job's. Cancel, time
  limit, shutdown and a lost lease reach the other ranks through the stop flag rank 0
  broadcasts before every step.
- The other ranks are fresh interpreters (`python -m worker.rank_process`), not forks.
  The caller is a Celery prefork child with threads running (heartbeat, metric sink,
  registry) and torch loaded (its OpenMP pool, perhaps a CUDA context): a fork copies
  locks those threads may hold and CUDA state that does not survive a fork.
  multiprocessing's "spawn" would also start a fresh interpreter, but re-imports the
  parent's __main__ (Celery's) and leaves less control over the children's lifetime.
- Rendezvous: a TCPStore rank 0 binds on 127.0.0.1 port 0, so the kernel picks a free
  port and nothing can take it between choosing and binding; the ranks get its port
  with their configuration on stdin.
- No rank outlives its job. A rank asks the kernel to SIGKILL it when its parent dies
  (PR_SET_PDEATHSIG) and also exits when its stdin, a pipe from rank 0, reaches EOF
  (rank 0's process gone, however it went). When the job ends rank 0 waits for the
  ranks briefly and kills whatever is left. Ranks ignore SIGINT and SIGTERM: a signal
  to the worker's process group (Ctrl-C, systemd) is for rank 0 to answer by
  checkpointing and handing the job back, which needs the other ranks until then.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import torch

from shared.spec import TrainSpec, load_stored_spec
from worker.training.datasets import DataPaths
from worker.training.errors import JobCancelled, RankFailed, UserError
from worker.training.parallel import ProcessGroup
from worker.training.sink import NullSink, Sink
from worker.training.train import train_job

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# A rank starts an interpreter, imports torch and loads the dataset before it joins.
JOIN_TIMEOUT_S = 120.0
# How long a rank waits in one collective. The longest wait is the other ranks' while
# rank 0 validates an epoch alone; a rank that died is noticed at once (gloo's
# connection closes, and rank 0 watches its processes), so this only bounds a hang.
COLLECTIVE_TIMEOUT_S = 600.0
# After the last step every rank leaves at once; this is slack for a loaded host.
FINISH_TIMEOUT_S = 30.0
# A failed run's objects are released this long after gloo's own timeout has passed.
RELEASE_SLACK_S = 5.0
# A rank that exits on its own because its parent is gone.
EXIT_PARENT_GONE = 3
RANK_MODULE = "worker.rank_process"


def _never() -> bool:
    return False


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def train_data_parallel(
    spec: TrainSpec,
    devices: Sequence[torch.device],
    sink: Sink,
    checkpoint_dir: Path,
    should_stop: Callable[[], bool] = _never,
    *,
    paths: DataPaths,
    resume_from: Path | None = None,
    label: str = "job",
) -> dict[str, Any]:
    """Train `spec` with one process per device in `devices` (all cuda, or all cpu),
    this process being rank 0 on `devices[0]`; returns rank 0's result metrics.

    What `train_job` promises holds here too: `should_stop` (polled by rank 0, obeyed
    by every rank), last.pt on a stop, and resuming from `resume_from`. `label` names
    the job in the rank processes' command lines ("job-7-attempt-2"), for whoever
    lists processes. Raises RankFailed when another rank dies or fails.
    """
    import torch.distributed as dist

    if not dist.is_available():
        raise UserError("this worker's torch build has no torch.distributed: it cannot run "
                        "data-parallel jobs")  # fmt: skip
    world = len(devices)
    if world < 2:
        raise ValueError("train_data_parallel needs at least two devices")
    kinds = {d.type for d in devices}
    if len(kinds) != 1 or kinds - {"cpu", "cuda"}:
        raise ValueError(f"devices must be all cpu or all cuda, not {sorted(map(str, devices))}")
    backend = backend_for(devices[0])
    previous_threads = torch.get_num_threads()
    # The slot's CPU threads are shared out among its processes.
    threads = max(1, previous_threads // world)
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    store = dist.TCPStore(
        LOOPBACK, 0, world, is_master=True, wait_for_workers=False,
        timeout=datetime.timedelta(seconds=JOIN_TIMEOUT_S),
    )  # fmt: skip
    common = {
        "world_size": world,
        "backend": backend,
        "port": store.port,
        "threads": threads,
        "timeout_s": COLLECTIVE_TIMEOUT_S,
        "spec": spec.model_dump(mode="json"),
        "checkpoint_dir": str(checkpoint_dir),
        "resume_from": None if resume_from is None else str(resume_from),
        "paths": {
            "data_dir": str(paths.data_dir),
            "uploads_dir": str(paths.uploads_dir),
            "max_file_bytes": paths.max_file_bytes,
        },
    }
    ranks = RankProcesses(label)
    try:
        torch.set_num_threads(threads)
        for rank in range(1, world):
            ranks.start(rank, {**common, "rank": rank, "device": str(devices[rank])})
        ranks.wait_joined(store, JOIN_TIMEOUT_S)
        if backend == "nccl":
            torch.cuda.set_device(devices[0])
        dist.init_process_group(backend, store=store, rank=0, world_size=world, timeout=timeout)
        destroyed = False
        try:
            group = ProcessGroup(0, world, devices[0])
            log.info("%s: training with %d processes (%s) on %s", label, world, backend,
                     ", ".join(map(str, devices)))  # fmt: skip
            result = train_job(
                spec, devices[0], sink, checkpoint_dir, should_stop,
                paths=paths, resume_from=resume_from, parallel=group,
            )  # fmt: skip
            ranks.wait_exited(FINISH_TIMEOUT_S)
            return result
        except (JobCancelled, UserError):
            raise  # every rank stopped at the same point, for the same reason
        except Exception as exc:
            failure = ranks.failure(wait_s=2.0)
            if failure is None:
                raise
            dist.destroy_process_group()
            destroyed = True
            _release_in_background(exc)
            raise RankFailed(failure) from exc
        finally:
            if not destroyed:
                dist.destroy_process_group()
    finally:
        ranks.close()
        torch.set_num_threads(previous_threads)
        del store


def _release_in_background(exc: BaseException) -> None:
    """Drop the failed run's model and process group once gloo has given up on them.

    After a rank died, gloo's worker threads may still wait on the dead peer inside a
    collective DDP started asynchronously, until COLLECTIVE_TIMEOUT_S; the process
    group's destructor joins them, and it holds the GIL while it does, so releasing the
    last references (the DDP Reducer, in the training frames of the traceback) from
    another thread still stopped every thread of the process, the job's included (seen
    as a 10-minute hang in tests/test_data_parallel.py, twice). So the references are
    kept, off the exception, and released by a timer after the collective timeout,
    when those threads have ended and the join returns at once. The cost: the failed
    run's CPU model stays in memory that long. A slot process leaves through os._exit,
    which runs no destructor, so a process that ends sooner does not wait either."""
    tb = exc.__traceback__
    exc.__traceback__ = None
    timer = threading.Timer(
        COLLECTIVE_TIMEOUT_S + RELEASE_SLACK_S, traceback.clear_frames, args=(tb,)
    )
    timer.name, timer.daemon = "release-failed-ranks", True
    timer.start()


class RankProcesses:
    """The processes of ranks 1..N-1 of one job, started by `start`, and ended (EOF on
    their stdin, then SIGKILL for any still there) by `close`."""

    def __init__(self, label: str):
        self.label = label
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._output: dict[int, IO[bytes]] = {}

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs.values()]

    def start(self, rank: int, config: dict[str, Any]) -> None:
        output = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        argv = [
            sys.executable, "-m", RANK_MODULE, "--rank", str(rank),
            "--parent", str(os.getpid()), "--label", self.label,
        ]  # fmt: skip
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=output, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, close_fds=True,
        )  # fmt: skip
        self._procs[rank], self._output[rank] = proc, output
        assert proc.stdin is not None
        # The pipe stays open: its EOF is how the rank learns that rank 0 is gone.
        proc.stdin.write(json.dumps(config).encode() + b"\n")
        proc.stdin.flush()

    def wait_joined(self, store: Any, timeout_s: float) -> None:
        """Until every rank has reached the store; RankFailed if one exits first."""
        keys = [f"joined/{rank}" for rank in self._procs]
        deadline = time.monotonic() + timeout_s
        while not store.check(keys):
            failure = self.failure()
            if failure is not None:
                raise RankFailed(failure)
            if time.monotonic() > deadline:
                raise RankFailed(
                    f"the job's other processes did not start within {timeout_s:.0f} s"
                )
            time.sleep(0.05)

    def wait_exited(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for rank, proc in self._procs.items():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s: rank %d still running after the job; killing it", self.label, rank)

    def failure(self, wait_s: float = 0.0) -> str | None:
        """How the first rank that ended badly ended, waiting up to `wait_s` for one
        (rank 0 may see a peer's closed connection before that peer is reaped)."""
        deadline = time.monotonic() + wait_s
        while True:
            for rank, proc in self._procs.items():
                code = proc.poll()
                if code is not None and code != 0:
                    return self._describe(rank, proc, code)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def _describe(self, rank: int, proc: subprocess.Popen[bytes], code: int) -> str:
        if code < 0:
            how = f"was killed by signal {-code}"
            with contextlib.suppress(ValueError):
                how += f" ({signal.Signals(-code).name})"
        else:
            how = f"exited with code {code}"
        tail = self.output_tail(rank)
        if tail:
            log.error("%s: rank %d (pid %d) %s; its last output:\n%s", self.label, rank,
                      proc.pid, how, "\n".join(tail))  # fmt: skip
        message = f"data-parallel rank {rank} of the job {how}"
        if code > 0 and tail:
            # A rank that raised printed its traceback last: this is the error's line.
            message += f": {tail[-1]}"
        return message

    def output_tail(self, rank: int, lines: int = 20) -> list[str]:
        output = self._output.get(rank)
        if output is None:
            return []
        output.seek(0, os.SEEK_END)
        size = output.tell()
        output.seek(max(0, size - 8192))
        text = output.read().decode(errors="replace")
        return [line for line in text.splitlines() if line.strip()][-lines:]

    def close(self) -> None:
        for proc in self._procs.values():
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        deadline = time.monotonic() + 2.0
        for rank, proc in self._procs.items():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s: killing rank %d (pid %d)", self.label, rank, proc.pid)
                proc.kill()
                proc.wait()
        for output in self._output.values():
            output.close()


def run_rank(rank: int, config: dict[str, Any]) -> int:
    """The body of rank `rank` > 0 (worker/rank_process.py has set up its lifetime)."""
    import torch.distributed as dist

    world = int(config["world_size"])
    torch.set_num_threads(int(config["threads"]))
    device = torch.device(config["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=float(config["timeout_s"]))
    store = dist.TCPStore(LOOPBACK, int(config["port"]), world, is_master=False, timeout=timeout)
    store.set(f"joined/{rank}", "1")
    dist.init_process_group(
        config["backend"], store=store, rank=rank, world_size=world, timeout=timeout
    )
    try:
        spec = load_stored_spec(config["spec"])
        if not isinstance(spec, TrainSpec):
            raise TypeError("only train jobs run data-parallel")
        paths = config["paths"]
        resume_from = config.get("resume_from")
        train_job(
            spec, device, NullSink(), Path(config["checkpoint_dir"]),
            paths=DataPaths(Path(paths["data_dir"]), Path(paths["uploads_dir"]),
                            int(paths["max_file_bytes"])),
            resume_from=None if resume_from is None else Path(resume_from),
            parallel=ProcessGroup(rank, world, device),
        )  # fmt: skip
    except JobCancelled:
        log.info("rank %d: stopped with rank 0", rank)
    finally:
        dist.destroy_process_group()
    return 0
