"""A memory limit around each job, so that one job cannot take its host down.

A job that allocates more than its slot's share fails inside the job, where the runner
records it as an `OutOfMemory` error of the job's own (worker/failures.py), instead of
growing until the kernel's OOM killer takes this process, or a neighbour's.

The mechanism is RLIMIT_DATA on the pool child while the job body runs, restored
afterwards (the child runs the next job too). Since Linux 4.7 it bounds the process's
private writable memory (heap and anonymous mmap: what torch's CPU allocator and numpy
use) and not shared libraries or reserved but inaccessible address space, so the
limit is the process's real size, and a malloc past it fails with ENOMEM: torch raises
"DefaultCPUAllocator: can't allocate memory", Python raises MemoryError. Why not the
alternatives (docs/architecture.md, "Reliability" R10):

- RLIMIT_AS counts every mapping, and CUDA alone reserves tens of GiB of address space
  it never touches, as do glibc's per-thread arenas.
- A cgroup memory limit does not fail the allocation: it makes the kernel kill the
  process, which is what this is meant to avoid. (A per-slot cgroup also needs a
  delegated cgroup v2 subtree, which a worker in an ordinary container lacks.) A cgroup
  around the whole worker (a container's memory limit, systemd's MemoryMax) is still a
  good backstop; a child killed by it is recognised as such (worker/tasks.py).

On a CUDA device the limit is not applied: the CUDA driver and its pinned host buffers
map private writable memory that has nothing to do with the job's size, and a failed
mapping inside the driver is not a clean error. GPU memory has its own hard limit (a
CUDA out-of-memory error, also the job's own).
"""

from __future__ import annotations

import logging
import os
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.settings import Settings

log = logging.getLogger(__name__)

GIB = 1 << 30
# A cgroup v1 "no limit" is a huge page-aligned number, not the string v2 uses.
_NO_CGROUP_LIMIT = 1 << 60


@dataclass(frozen=True)
class MemoryBudget:
    """What this worker slot may use, worked out once per pool child."""

    limit_bytes: int | None  # None: not enforced
    source: str  # how the number came about, for the log and the error message


_budget: dict[str, MemoryBudget] = {}


def host_memory_bytes() -> int:
    """The RAM this process can use: the machine's, or its container's cgroup limit if
    that is lower (a container sees the host's RAM in /proc/meminfo)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _cgroup_limit_bytes()
    return min(total, limit) if limit else total


def _cgroup_limit_bytes() -> int | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            candidate = Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max"
        elif "memory" in controllers.split(","):  # cgroup v1
            candidate = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes"
        else:
            continue
        try:
            text = candidate.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < _NO_CGROUP_LIMIT:
            return int(text)
    return None


def slot_budget(settings: Settings, slots: int) -> MemoryBudget:
    """This slot's share: TRAINYARD_SLOT_MEMORY_BYTES, or a fraction of the host's RAM
    divided among the worker's slots."""
    if not settings.enforce_memory_limit:
        return MemoryBudget(None, "TRAINYARD_ENFORCE_MEMORY_LIMIT is off")
    if settings.slot_memory_bytes:
        return MemoryBudget(settings.slot_memory_bytes, "TRAINYARD_SLOT_MEMORY_BYTES")
    share = int(host_memory_bytes() * settings.slot_memory_fraction / max(1, slots))
    source = f"{settings.slot_memory_fraction:g} of the host's memory / {slots} slot(s)"
    return MemoryBudget(share, source)


def configure(settings: Settings, slots: int) -> MemoryBudget:
    """Called once in each pool child (worker/celery_worker.py). Processes that never call
    it (tests running jobs in threads of the test process) run jobs without a limit."""
    budget = slot_budget(settings, slots)
    _budget["slot"] = budget
    in_use = data_bytes()
    if budget.limit_bytes is not None and in_use and budget.limit_bytes < 2 * in_use:
        # Torch, Celery and the interpreter alone take this much: jobs get what is left.
        log.warning(
            "the memory limit per job (%s, %s) leaves little beyond the %s this worker "
            "process uses before any job; raise TRAINYARD_SLOT_MEMORY_BYTES or run fewer slots",
            format_bytes(budget.limit_bytes), budget.source, format_bytes(in_use),
        )  # fmt: skip
    return budget


def data_bytes() -> int:
    """This process's private writable memory (VmData), what RLIMIT_DATA bounds."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def current_budget() -> MemoryBudget:
    return _budget.get("slot", MemoryBudget(None, "no limit configured in this process"))


@dataclass(frozen=True)
class AppliedLimit:
    limit_bytes: int | None  # None: the job runs without one (and `why_not` says why)
    why_not: str = ""

    def describe(self) -> str:
        if self.limit_bytes is None:
            return f"no memory limit ({self.why_not})"
        return f"memory limit {format_bytes(self.limit_bytes)}"


def format_bytes(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / (1 << 20):.0f} MiB"


@contextmanager
def job_memory_limit(budget: MemoryBudget, device: torch.device) -> Iterator[AppliedLimit]:
    """Run the body with RLIMIT_DATA lowered to the slot's budget, then restore it.

    Only the soft limit moves, never above the hard one, so an unprivileged worker can
    always put it back; a process whose hard limit is already lower keeps that."""
    if budget.limit_bytes is None:
        yield AppliedLimit(None, budget.source)
        return
    if device.type == "cuda":
        yield AppliedLimit(None, "not applied on CUDA devices")
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = budget.limit_bytes if hard == resource.RLIM_INFINITY else min(budget.limit_bytes, hard)
    try:
        resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot set a memory limit of %s: %s", format_bytes(limit), exc)
        yield AppliedLimit(None, f"setrlimit failed: {exc}")
        return
    try:
        yield AppliedLimit(limit)
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
