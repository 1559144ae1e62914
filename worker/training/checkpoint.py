"""Checkpoint files: written atomically, read with weights_only=True only.

A checkpoint is a plain dict of tensors, dicts, lists and scalars (no pickled classes),
so loading one never runs code from the file. train.py decides what goes in it; this
module writes and reads files and captures/restores the process-wide RNG states.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

# 2: checkpoint directories (last.pt/best.pt), mid-epoch state, schedules, scaler.
CHECKPOINT_FORMAT = 2
LAST = "last"
BEST = "best"


def checkpoint_file(checkpoint_dir: Path, which: str) -> Path:
    """`checkpoint_dir/last.pt` or `checkpoint_dir/best.pt`."""
    return Path(checkpoint_dir) / f"{which}.pt"


def serialize(payload: dict[str, Any]) -> bytes:
    """The bytes torch.save writes for `payload` (tensors are copied off the GPU)."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def save_checkpoint(
    path: Path, payload: dict[str, Any] | bytes, *, also: Sequence[Path] = ()
) -> None:
    """Write `payload` (or its `serialize`d bytes) to `path` and to each of `also`, so
    that a reader sees the old file or the new one, whole.

    The temp file lives in the target directory: os.replace is only atomic within one
    file system. Syncing the directory makes the rename itself survive a power loss.
    The copies in `also` (same directory) are hard links to the same bytes: one
    serialization and one fsync however many names the checkpoint gets.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(payload, bytes):
                f.write(payload)
            else:
                torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        for other in also:
            _place_copy(Path(tmp_name), Path(other))
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)


def _place_copy(source: Path, target: Path) -> None:
    """Atomically make `target` a copy of the (fsynced) temp file `source`."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.link.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        os.link(source, tmp)  # later replacing `source`'s name leaves this inode alone
    except OSError:  # no hard links here (some network or FUSE file systems): copy
        shutil.copyfile(source, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    try:
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def snapshot(value: Any) -> Any:
    """A copy of `value` whose tensors the training loop can no longer change."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(snapshot(v) for v in value)
    return value


def _serialize_and_save(path: Path, payload: dict[str, Any], also: Sequence[Path]) -> None:
    save_checkpoint(path, serialize(payload), also=also)


class CheckpointWriter:
    """Writes checkpoints on a background thread, so the training loop does not wait
    for pickling or the disk: serializing and fsyncing a small model's checkpoint
    takes a few milliseconds, several percent of its epoch and more than the loop's
    whole overhead budget.

    `submit` only copies the tensors (a memcpy per tensor) so the writer sees a
    consistent snapshot while training goes on; pickling, the write, fsync and the
    renames run on the writer thread. At most one write is in flight, so writes land
    in order and memory stays bounded; `flush` waits for it and re-raises its error.
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future[None] | None = None

    def submit(self, path: Path, payload: dict[str, Any], *, also: Sequence[Path] = ()) -> None:
        copy = snapshot(payload)
        self.flush()
        self._pending = self._executor.submit(_serialize_and_save, path, copy, also)

    def flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._executor.shutdown(wait=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fsync_dir(directory: Path) -> None:
    # Directories cannot be opened for fsync on Windows; there the rename is best effort.
    if os.name != "posix":
        return
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: Path, map_location: torch.device | str | None = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by save_checkpoint; refuses anything but plain data."""
    return torch.load(path, map_location=map_location, weights_only=True)


def capture_global_rng(device: torch.device) -> dict[str, torch.Tensor]:
    """The process-wide RNG states a training step draws from (dropout, init)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_global_rng(state: dict[str, torch.Tensor], device: torch.device) -> None:
    # RNG states must be CPU ByteTensors, whatever a map_location did to them.
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
