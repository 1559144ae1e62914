"""Which failures are the job's fault and which are the infrastructure's.

A job's own error (bad data, a shape mismatch, a diverged loss, a bug in its spec) fails
the same way on every attempt, so it ends `failed` at once. Running out of memory is
the job's own too: host memory is capped per slot (worker/memory_limit.py) and GPU
memory by the device, so a job that needs more than its slot fails again on every
attempt, and retrying it only takes a worker away from everyone else for longer. A lost
resource (the database, the broker, the disk) says nothing about the job: the runner
hands it back for another attempt, which resumes from the last checkpoint
(docs/architecture.md, "Reliability" R4 and R10).
Anything not recognised as infrastructure counts as the job's own error: retrying an
unknown bug would only burn attempts.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass

import kombu.exceptions
import redis.exceptions
import sqlalchemy.exc
import torch

from worker.artifact_sync import StoreUnavailable

# Error types recorded on the job row (error_type): the job ran out of memory (its own
# error), or an infrastructure failure.
CUDA_OOM = "CudaOutOfMemory"
HOST_OOM = "OutOfMemory"
INFRASTRUCTURE = "InfrastructureError"

_DATABASE_ERRORS = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.DisconnectionError,
)
_BROKER_ERRORS = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    kombu.exceptions.OperationalError,
)
_DISK_ERRNOS = {
    errno.ENOSPC: "disk full",
    errno.EIO: "I/O error",
    errno.EDQUOT: "disk quota exceeded",
}

_CUDA_OOM_PREFIX = re.compile(r"^CUDA out of memory\.?\s*")
# torch's CPU allocator prefixes its message with the C++ assertion that failed.
_CPU_ALLOC_PREFIX = re.compile(r"^\[enforce fail at [^\]]*\]\s*(err == 0\.\s*)?")
# How much of the original message to keep in the one-line reason.
_DETAIL_CHARS = 300


@dataclass(frozen=True)
class Failure:
    retriable: bool
    error_type: str  # what the job row's error_type says if the job ends with this
    reason: str  # one line for error_message, without the attempt bookkeeping


@dataclass(frozen=True)
class GpuMemory:
    """A GPU's memory when a job ran out of it."""

    used_bytes: int  # by every process on the GPU
    total_bytes: int
    job_bytes: int | None = None  # what this job's PyTorch allocator held (reserved)

    def describe(self) -> str:
        text = f"{_gib(self.used_bytes)} of {_gib(self.total_bytes)} GiB in use"
        if self.job_bytes is not None:
            text += f" ({_gib(self.job_bytes)} GiB by this job)"
        return text


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f}"


def gpu_memory(device: torch.device) -> GpuMemory | None:
    """`device`'s memory now, from the CUDA driver; None on a CPU device, or when CUDA
    cannot answer (the report then goes without figures rather than failing)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        free, total = torch.cuda.mem_get_info(device)
        held = torch.cuda.memory_reserved(device)
    except Exception:  # noqa: BLE001 - a broken context after the OOM: no figures
        return None
    return GpuMemory(used_bytes=int(total - free), total_bytes=int(total), job_bytes=int(held))


def is_cuda_oom(exc: BaseException) -> bool:
    """Whether `exc` is the GPU running out of memory."""
    # Older torch raised a plain RuntimeError with this text; some CUDA paths still do.
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)
    )


def classify(exc: BaseException, device: str = "cpu", memory: GpuMemory | None = None) -> Failure:
    """Map an exception from a job to a Failure. `device` names where the job ran
    ("cuda:0 (NVIDIA H200)"), and `memory` what its GPU's memory held at the failure,
    for the out-of-memory message."""
    if is_cuda_oom(exc):
        detail = _CUDA_OOM_PREFIX.sub("", _detail(exc))  # said once is enough
        where = f"{device}, {memory.describe()}" if memory is not None else device
        return Failure(False, CUDA_OOM, f"CUDA out of memory on {where}: {detail}".rstrip(": "))
    if isinstance(exc, MemoryError) or _is_cpu_alloc_failure(exc):
        return Failure(False, HOST_OOM, f"out of host memory: {_cpu_detail(exc)}")
    if isinstance(exc, _DATABASE_ERRORS):
        return Failure(True, INFRASTRUCTURE, f"database unavailable: {_named(exc)}")
    if isinstance(exc, _BROKER_ERRORS):
        return Failure(True, INFRASTRUCTURE, f"broker unavailable: {_named(exc)}")
    if isinstance(exc, StoreUnavailable):
        return Failure(True, INFRASTRUCTURE, f"artifact store unavailable: {_detail(exc)}")
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        return Failure(True, INFRASTRUCTURE, f"{_DISK_ERRNOS[exc.errno]}: {_named(exc)}")
    return Failure(False, type(exc).__name__, str(exc))


def _is_cpu_alloc_failure(exc: BaseException) -> bool:
    # torch's CPU allocator reports a failed malloc as a RuntimeError, not MemoryError.
    return isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(
        exc
    )


def _detail(exc: BaseException) -> str:
    """The first line of the message: torch's OOM text goes on about allocator settings."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:_DETAIL_CHARS]


def _cpu_detail(exc: BaseException) -> str:
    return _CPU_ALLOC_PREFIX.sub("", _detail(exc))


def _named(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_detail(exc)}"
