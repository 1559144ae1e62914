"""Worker slots: which GPUs each prefork pool child owns, and how it takes them.

A worker runs one job per pool child at a time (Celery prefork, prefetch 1). On a GPU
host each child owns a *slot*: a fixed set of `gpus_per_slot` GPUs, the same for the
child's whole life. The layout is decided once, in the main process, before the pool
forks (`configure`); each child then takes a free slot as it starts (`take_slot`, from
Celery's worker_process_init) and pins itself to it by setting CUDA_VISIBLE_DEVICES and
CUDA_DEVICE_ORDER=PCI_BUS_ID before anything initializes CUDA. Its jobs train on
cuda:0..K-1, which are exactly the slot's GPUs.

Taking a slot is taking an exclusive `fcntl.lockf` lock on one file per GPU of the slot
(per slot on a CPU host), under `TRAINYARD_HOME/worker-slots/`. Why locks and not
bookkeeping in the main process:

- a lock belongs to the process that holds it and the kernel drops it when that process
  exits, however it exits: a child killed by SIGKILL (the OOM killer, a kill -9) frees
  its GPUs, and the child Celery starts in its place takes exactly that slot;
- a child that is alive keeps its slot whatever its job did: finished, failed,
  cancelled or handed back, the next job of that child runs on the same GPUs and no
  other child can take them, so two jobs never share a GPU;
- GPU locks are named by the GPU's UUID and the host, so two workers started on one
  host with overlapping `--gpus` cannot both use a GPU: the second refuses to start
  (`check_gpus_free`).

POSIX record locks (lockf) are not inherited by fork, so neither the main process nor a
job's own subprocesses (DataLoader workers) ever hold a slot.

On a CPU host (no GPUs, or `--gpus none`) there are `concurrency` slots without GPUs;
they only number the children (the job's placement says which slot ran it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.settings import Settings, parse_gpu_selection
from worker.gpu_inventory import Gpu, list_gpus

log = logging.getLogger(__name__)

# What a child waits for a slot when it starts. The slot of the child it replaces is
# free once that child is dead, which it is by the time Celery starts the replacement;
# the wait covers a dying child's DataLoader workers. Below Celery's
# worker_proc_alive_timeout (4 s), past which the pool kills a child that has not
# reported itself up.
START_WAIT_S = 2.0


class SlotError(ValueError):
    """A slot layout that cannot work: the worker refuses to start with this message."""


@dataclass(frozen=True)
class Slot:
    index: int
    gpus: tuple[Gpu, ...] = ()

    @property
    def cuda_visible_devices(self) -> str:
        return ",".join(str(gpu.index) for gpu in self.gpus)

    def describe(self) -> str:
        if not self.gpus:
            return f"slot {self.index} (CPU)"
        return f"slot {self.index} (GPU {self.cuda_visible_devices})"


@dataclass(frozen=True)
class Layout:
    """What the main process decided: the slots, and whether they are GPU slots."""

    slots: tuple[Slot, ...]
    gpu: bool
    lock_dir: Path
    # Names CPU slots' lock files: unique per worker process on a host.
    owner: str
    # `--gpus none`: children hide every GPU (CUDA_VISIBLE_DEVICES="").
    hide_gpus: bool = False


def plan_gpu_slots(
    selection: str, gpus_per_slot: int, available: Sequence[Gpu] | None = None
) -> tuple[Slot, ...]:
    """The GPU slots for `--gpus SELECTION --gpus-per-slot K`; () means a CPU worker.

    `available` is what NVML lists (`list_gpus()` when None). An explicit list on a host
    where NVML lists nothing is accepted with a warning: the operator says which devices
    exist (a container without NVML, or a test that runs a worker "as if" it had GPUs),
    and the slots then know only the indices. GPUs left over after whole slots (3 GPUs,
    2 per slot) stay idle, with a warning.
    """
    chosen = parse_gpu_selection(selection)
    if gpus_per_slot < 1:
        raise SlotError(f"--gpus-per-slot must be at least 1, not {gpus_per_slot}")
    if chosen == "none":
        return ()
    found = list(list_gpus() if available is None else available)
    if chosen == "all":
        gpus = found
    else:
        by_index = {gpu.index: gpu for gpu in found}
        if not found:
            log.warning(
                "--gpus %s: NVML lists no GPU on this host; trusting the list as given "
                "(slots know these GPUs by index only)",
                selection,
            )
            gpus = [Gpu(index=i, uuid=None, name=None, memory_total_bytes=None) for i in chosen]
        else:
            missing = [i for i in chosen if i not in by_index]
            if missing:
                have = ", ".join(str(g.index) for g in found)
                raise SlotError(
                    f"--gpus {selection}: no GPU {', '.join(map(str, missing))} on this "
                    f"host (NVML lists {have})"
                )
            gpus = [by_index[i] for i in chosen]
    if not gpus:
        return ()
    if len(gpus) < gpus_per_slot:
        raise SlotError(
            f"--gpus-per-slot {gpus_per_slot} needs at least {gpus_per_slot} GPUs; "
            f"--gpus {selection} gives {len(gpus)}"
        )
    whole = len(gpus) - len(gpus) % gpus_per_slot
    if whole < len(gpus):
        idle = ", ".join(str(g.index) for g in gpus[whole:])
        log.warning(
            "%d GPUs do not split into slots of %d: GPU %s stays idle",
            len(gpus), gpus_per_slot, idle,
        )  # fmt: skip
    return tuple(
        Slot(index=n, gpus=tuple(gpus[start : start + gpus_per_slot]))
        for n, start in enumerate(range(0, whole, gpus_per_slot))
    )


def lock_dir_for(settings: Settings) -> Path:
    # Absolute: every child must name the same files whatever its working directory.
    return settings.home.resolve() / "worker-slots"


# The layout of this worker, set in the main process before the pool forks and so
# inherited by every child; and this child's slot, once taken, with its lock files.
_state: dict[str, Any] = {"layout": None, "slot": None, "fds": []}


def configure(settings: Settings) -> Layout:
    """In the worker's main process, before forking: decide the GPU slots (NVML only,
    never CUDA). Raises SlotError for a layout that cannot work."""
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    if inherited is not None:
        log.warning(
            "CUDA_VISIBLE_DEVICES=%r in the worker's environment is replaced in each slot; "
            "choose GPUs with --gpus (TRAINYARD_WORKER_GPUS) instead",
            inherited,
        )
    slots = plan_gpu_slots(settings.worker_gpus, settings.gpus_per_slot)
    layout = Layout(
        slots=slots,
        gpu=bool(slots),
        lock_dir=lock_dir_for(settings),
        owner=f"{_safe(socket.gethostname())}-{os.getpid()}",
        hide_gpus=parse_gpu_selection(settings.worker_gpus) == "none",
    )
    layout.lock_dir.mkdir(parents=True, exist_ok=True)
    if slots:
        check_gpus_free(layout)
    _state["layout"] = layout
    return layout


def with_cpu_slots(layout: Layout, count: int) -> Layout:
    """A CPU worker's layout once its concurrency is known: `count` slots, no GPUs."""
    if layout.gpu:
        return layout
    cpu = Layout(
        slots=tuple(Slot(index=i) for i in range(count)),
        gpu=False,
        lock_dir=layout.lock_dir,
        owner=layout.owner,
        hide_gpus=layout.hide_gpus,
    )
    _state["layout"] = cpu
    return cpu


def layout() -> Layout | None:
    return _state["layout"]


def current_slot() -> Slot | None:
    """This pool child's slot, once it has taken one (None in the main process)."""
    return _state["slot"]


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def _lock_names(layout: Layout, slot: Slot) -> list[str]:
    if not slot.gpus:
        return [f"cpu-{layout.owner}-slot-{slot.index}.lock"]
    host = _safe(socket.gethostname())
    # Sorted, so two processes taking overlapping sets lock in the same order.
    return sorted(f"gpu-{host}-{_safe(gpu.uuid or str(gpu.index))}.lock" for gpu in slot.gpus)


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            return None
        raise
    # For whoever looks at a held lock: which process has it.
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _try_slot(layout: Layout, slot: Slot) -> list[int] | None:
    fds: list[int] = []
    for name in _lock_names(layout, slot):
        fd = _try_lock(layout.lock_dir / name)
        if fd is None:
            for held in fds:
                os.close(held)
            return None
        fds.append(fd)
    return fds


def check_gpus_free(layout: Layout) -> None:
    """Raise SlotError if another process on this host holds one of these GPUs' locks
    (another worker started with overlapping --gpus)."""
    for slot in layout.slots:
        fds = _try_slot(layout, slot)
        if fds is None:
            raise SlotError(
                f"GPU {slot.cuda_visible_devices} is in use by another Trainyard worker on "
                f"this host (lock files in {layout.lock_dir}); give each worker its own "
                "GPUs with --gpus"
            )
        for fd in fds:
            os.close(fd)


def take_slot(wait_s: float = START_WAIT_S) -> Slot | None:
    """In a pool child: take the first free slot of this worker's layout and pin this
    process to its GPUs. Returns the slot (the one already taken on a second call), or
    None if none came free within `wait_s`."""
    if _state["slot"] is not None:
        return _state["slot"]
    layout = _state["layout"]
    if layout is None:
        return None
    layout.lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        for slot in layout.slots:
            fds = _try_slot(layout, slot)
            if fds is not None:
                _state["slot"], _state["fds"] = slot, fds
                pin(slot, layout)
                return slot
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def pin(slot: Slot, layout: Layout) -> None:
    """Make CUDA in this process see only the slot's GPUs, as cuda:0..K-1. Must run
    before CUDA is initialized in this process (it reads these once)."""
    if slot.gpus:
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        os.environ["CUDA_VISIBLE_DEVICES"] = slot.cuda_visible_devices
    elif layout.hide_gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def release_slot() -> None:
    """Give the slot back (a child that exits cleanly; the kernel does it otherwise)."""
    for fd in _state["fds"]:
        with contextlib.suppress(OSError):
            os.close(fd)
    _state["slot"], _state["fds"] = None, []


def placement(slot: Slot | None) -> dict[str, Any]:
    """Where a job runs, as jobs.placement records it (migration 0009)."""
    return {
        "host": socket.gethostname(),
        "slot": None if slot is None else slot.index,
        "gpus": [] if slot is None else [gpu.to_json() for gpu in slot.gpus],
    }
