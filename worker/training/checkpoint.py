"""Checkpoint files: written atomically, read with weights_only=True only.

A checkpoint is a plain dict of tensors, dicts, lists and scalars (no pickled classes),
so loading one never runs code from the file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FORMAT = 1


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` to `path` so that a reader sees the old file or the new one, whole.

    The temp file lives in the target directory: os.replace is only atomic within one
    file system. Syncing the directory makes the rename itself survive a power loss.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Directories cannot be opened for fsync on Windows; there the rename is best effort.
    if os.name != "posix":
        return
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: Path, map_location: torch.device | str | None = None) -> dict[str, Any]:
    """Read a checkpoint written by save_checkpoint; refuses anything but plain data."""
    return torch.load(path, map_location=map_location, weights_only=True)
