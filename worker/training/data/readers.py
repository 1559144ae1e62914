"""Readers for the official MNIST/Fashion-MNIST IDX files and CIFAR-10 python batches.

Both return raw uint8 pixels as (N, C, H, W) and int64 labels; every problem with a
file (missing, truncated, wrong header, foreign pickle) is a UserError naming it.
"""

from __future__ import annotations

import gzip
import io
import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from shared.dataset_catalog import CIFAR10_DIR, CIFAR10_FILES, IDX_FILES, find_idx_file
from worker.training.errors import UserError

log = logging.getLogger(__name__)

IDX_UBYTE = 0x08
NUM_CLASSES = 10


# ---------------------------------------------------------------- IDX


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (plain or .gz) as an array of its dimensions."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError; EOFError: cut-off .gz
        raise UserError(f"cannot read {path}: {exc}") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise UserError(f"{path} is not an IDX file (bad magic number)")
    if raw[2] != IDX_UBYTE:
        raise UserError(f"{path}: IDX data type 0x{raw[2]:02x} is not unsigned bytes (0x08)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise UserError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise UserError(
            f"{path}: header says {'x'.join(map(str, dims))} = {expected:,} bytes of data, "
            f"the file holds {len(raw) - header:,} (truncated or corrupt)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def idx_files(directory: Path) -> dict[str, Path]:
    """The four official files in `directory`; UserError names the first missing one."""
    found: dict[str, Path] = {}
    for key, stem in IDX_FILES.items():
        path = find_idx_file(directory, stem)
        if path is None:
            raise UserError(f"{directory / stem}[.gz] is missing")
        found[key] = path
    return found


def load_idx_dataset(directory: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_x, train_y, test_x, test_y): the official split, images as (N, 1, H, W) uint8."""
    files = idx_files(directory)
    out: list[np.ndarray] = []
    for part in ("train", "test"):
        images = read_idx(files[f"{part}_images"])
        labels = read_idx(files[f"{part}_labels"])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(
                f"{directory}: {part} images {images.shape} and labels {labels.shape} do not match"
            )
        if len(labels) and int(labels.max()) >= NUM_CLASSES:
            raise UserError(f"{files[f'{part}_labels']}: label {int(labels.max())} is not in 0..9")
        out += [images[:, None, :, :], labels.astype(np.int64)]
    if out[0].shape[1:] != out[2].shape[1:]:
        raise UserError(f"{directory}: train and test images differ in size")
    return out[0], out[1], out[2], out[3]


# ---------------------------------------------------------------- CIFAR-10


def _numpy_reconstruct() -> Any:
    # numpy 2 moved numpy.core to numpy._core; importing the old name only warns.
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


class _CifarUnpickler(pickle.Unpickler):
    """Unpickling runs any callable a file names; the official batches need only these.

    Everything else in them (dicts, lists, byte strings, ints) is built by opcodes that
    call nothing, so refusing every other global makes loading a file safe.
    """

    def find_class(self, module: str, name: str) -> Any:
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _numpy_reconstruct()
        if module == "numpy" and name == "ndarray":
            return np.ndarray
        if module == "numpy" and name == "dtype":
            return np.dtype
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file: (images (N, 3, 32, 32) uint8, labels (N,) int64)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    try:
        # encoding="bytes": the batches were pickled by Python 2; keys come back as bytes.
        batch = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # a corrupt pickle can raise nearly anything
        raise UserError(f"{path} is not a CIFAR-10 batch: {exc}") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise UserError(f"{path} is not a CIFAR-10 batch: no b'data' and b'labels'")
    data, labels = batch[b"data"], batch[b"labels"]
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == 3072
    ):
        shape = getattr(data, "shape", type(data).__name__)
        raise UserError(f"{path}: b'data' must be an N x 3072 uint8 array, got {shape}")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise UserError(f"{path}: b'labels' is not a list of integers") from None
    if y.shape != (len(data),):
        raise UserError(f"{path}: {len(data)} images but {y.size} labels")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= NUM_CLASSES):
        raise UserError(f"{path}: labels must be in 0..9")
    # Each row is the red, green then blue 32x32 plane, row-major: already channels-first.
    return data.reshape(-1, 3, 32, 32), y


def cifar_files(data_dir: Path) -> list[Path]:
    directory = data_dir / CIFAR10_DIR
    return [directory / name for name in CIFAR10_FILES]


def load_cifar10(data_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_x, train_y, test_x, test_y): data_batch_1..5 and test_batch."""
    parts = []
    for path in cifar_files(data_dir):
        if not path.is_file():
            raise UserError(f"cifar10: {path} is missing")
        parts.append(read_cifar_batch(path))
    train_x = np.concatenate([x for x, _ in parts[:-1]])
    train_y = np.concatenate([y for _, y in parts[:-1]])
    test_x, test_y = parts[-1]
    return train_x, train_y, test_x, test_y
