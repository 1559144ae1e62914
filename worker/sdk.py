"""The Trainyard SDK for script jobs: a team's own training script talks to the worker.

Why here, in worker/: the worker runs the script (worker/script_job.py), so the SDK
ships wherever a worker is installed, and every script job can `from worker import sdk`
without installing anything. The module is standard library only and imports nothing
else of Trainyard (worker/__init__.py is empty), so importing it costs nothing, pulls
no torch, and the script keeps its own imports. A script that must also run where
Trainyard is not installed can copy this one file next to itself.

    from worker import sdk

    lr = sdk.params.get("lr", 0.01)
    start = 0
    if sdk.resume_from is not None:  # an earlier attempt's checkpoint directory
        state = torch.load(sdk.resume_from / "last.pt", weights_only=True)
        start = state["epoch"]
    for epoch in range(start + 1, epochs + 1):
        loss = train_one_epoch(...)
        sdk.log("train_loss", loss, step=epoch, epoch=epoch)
        sdk.progress(epoch=epoch, epochs=epochs)
        sdk.save_checkpoint(lambda p: torch.save({"epoch": epoch, ...}, p))
        if sdk.should_stop():  # cancel, time limit, worker shutdown: checkpoint and exit
            raise SystemExit(0)
    sdk.finish({"val_accuracy": acc})

Under Trainyard (TRAINYARD_CHANNEL_FD set: a pipe the worker reads) each call writes
one JSON line to the pipe; the worker stores metrics and progress like a built-in job's.
Outside it (local development) the same calls print readable lines to stdout,
checkpoints go to ./checkpoints and params come from TRAINYARD_PARAMS_FILE if set.

The contract underneath is plain (environment variables, JSON lines, SIGTERM), so a
script in another language can follow it without this module: see the docs.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

# And `device`, worked out on first use (see __getattr__).
__all__ = [
    "attempt",
    "checkpoint_dir",
    "dataset_dir",
    "finish",
    "job_id",
    "log",
    "params",
    "progress",
    "resume_from",
    "save_checkpoint",
    "should_stop",
]


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else None


def _load_params() -> dict[str, Any]:
    path = _env_path("TRAINYARD_PARAMS_FILE")
    if path is None:
        return {}
    with open(path, encoding="utf-8") as f:
        loaded = json.load(f)
    return loaded if isinstance(loaded, dict) else {}


def _open_channel() -> int | None:
    """The channel's file descriptor, or None (local development). A descriptor that is
    not open (a grandchild process inherited the variable, not the pipe) means local."""
    fd = _env_int("TRAINYARD_CHANNEL_FD")
    if fd is None:
        return None
    try:
        os.fstat(fd)
    except OSError:
        return None
    return fd


job_id: int | None = _env_int("TRAINYARD_JOB_ID")
attempt: int | None = _env_int("TRAINYARD_ATTEMPT")
params: dict[str, Any] = _load_params()
checkpoint_dir: Path = _env_path("TRAINYARD_CHECKPOINT_DIR") or Path("checkpoints")
resume_from: Path | None = _env_path("TRAINYARD_RESUME_DIR")
dataset_dir: Path | None = _env_path("TRAINYARD_DATASET_DIR")

_channel = _open_channel()
_write_lock = threading.Lock()
_stop = threading.Event()


def __getattr__(name: str) -> Any:
    # `device` is worked out on first use: outside Trainyard that means asking torch,
    # which this module must not import just by being imported.
    if name == "device":
        value = os.environ.get("TRAINYARD_DEVICE") or _local_device()
        globals()["device"] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _local_device() -> str:
    try:
        import torch  # noqa: PLC0415 - only outside Trainyard, and only when asked
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def _on_sigterm(signum: int, frame: object) -> None:
    _stop.set()


# The worker asks a script to stop with SIGTERM (cancel, time limit, shutdown), then
# kills it after the job's stop_grace_s. The handler only raises a flag for
# should_stop(); Python allows handlers only in the main thread, hence the check.
if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _on_sigterm)


def should_stop() -> bool:
    """True once the worker asked the script to stop: save a checkpoint and exit (any
    exit code; the job ends cancelled, failed on its time limit, or is handed back)."""
    return _stop.is_set()


def _send(message: dict[str, Any], readable: str) -> None:
    if _channel is None:
        print(f"[trainyard] {readable}", flush=True)
        return
    data = (json.dumps(message, separators=(",", ":"), default=_jsonable) + "\n").encode()
    # One line per message, whole: the lock keeps this process's threads from
    # interleaving, and the loop finishes a write a signal interrupted part way.
    with _write_lock:
        view = memoryview(data)
        while view:
            view = view[os.write(_channel, view) :]


def _jsonable(value: Any) -> Any:
    # A 0-d tensor or numpy scalar: its Python number.
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    raise TypeError(f"{type(value).__name__} is not JSON")


def log(key: str, value: float, step: int, epoch: int | None = None) -> None:
    """One point of the series `key` (at most 64 characters) at `step` (an int); it
    charts on the job page. One point per key and step: log again at a new step."""
    message: dict[str, Any] = {"type": "metric", "key": str(key), "value": float(value),
                               "step": int(step)}  # fmt: skip
    if epoch is not None:
        message["epoch"] = int(epoch)
    where = f" epoch={epoch}" if epoch is not None else ""
    _send(message, f"{key}={float(value):.6g} step={int(step)}{where}")


def progress(**fields: Any) -> None:
    """Where the run is, shown as the job's progress: epoch, epochs, step, steps_total,
    samples_per_s, eta_s, fraction (0..1); any subset. The latest call wins."""
    readable = " ".join(f"{k}={v}" for k, v in fields.items())
    _send({"type": "progress", **fields}, f"progress {readable}")


def finish(metrics: dict[str, Any]) -> None:
    """The run's result metrics (the job's result). Without a call, the result is the
    last value of each logged key. Call it once, at the end."""
    _send({"type": "finish", "metrics": metrics}, f"finish {json.dumps(metrics, default=str)}")


def save_checkpoint(obj: bytes | Callable[[Path], object], name: str = "last.pt") -> Path:
    """Write `name` in checkpoint_dir atomically: a reader (the worker uploading it, the
    next attempt resuming) sees the old file or the new one, never half of one.

    `obj` is the file's bytes, or a function that writes the file at the path it is
    given, e.g. `lambda p: torch.save(state, p)`. Returns the checkpoint's path."""
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ValueError(f"checkpoint name must be relative to checkpoint_dir: {name!r}")
    target = checkpoint_dir / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    # In the same directory (rename is atomic only within one file system), ending in
    # .tmp: the worker never uploads a file still being written.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        if isinstance(obj, (bytes, bytearray, memoryview)):
            with open(tmp, "wb") as f:
                f.write(obj)
        else:
            obj(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(target.parent)
    return target


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (a power loss otherwise may undo it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


if _channel is None and os.environ.get("TRAINYARD_CHANNEL_FD"):
    print("[trainyard] TRAINYARD_CHANNEL_FD is not open here; printing instead", file=sys.stderr)
