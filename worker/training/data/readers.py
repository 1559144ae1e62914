"""Readers for the official MNIST/Fashion-MNIST IDX files and CIFAR-10 python batches.

Both return raw uint8 pixels as (N, C, H, W) and int64 labels; every problem with a
file (missing, truncated, wrong header, oversized, foreign pickle) is a DatasetError
naming it relative to the data directory (the job's owner never sees server paths).
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from shared.dataset_catalog import (
    CIFAR10_DIR,
    CIFAR10_FILES,
    DEFAULT_MAX_DATASET_FILE_BYTES,
    IDX_FILES,
    IdxHeader,
    data_file_name,
    find_idx_file,
    open_idx,
    parse_idx_header,
)
from worker.training.errors import DatasetError

log = logging.getLogger(__name__)

NUM_CLASSES = 10
# Decompressed bytes read per call: memory stays the output array plus this, whatever
# the file inflates to.
READ_CHUNK = 1 << 20


# ---------------------------------------------------------------- IDX


def read_idx(path: Path, max_bytes: int = DEFAULT_MAX_DATASET_FILE_BYTES) -> np.ndarray:
    """An IDX file of unsigned bytes (plain or .gz) as an array of its dimensions.

    The header is checked before any data is read: its dimensions (multiplied as Python
    ints, so they cannot overflow) must fit `max_bytes`, and a plain file's size must
    match. The data is then read in chunks into an array of exactly that size, and a
    stream that inflates to more than the header says stops one byte past it: a small
    gzip file cannot make the worker hold more than the header promised.
    """
    name = data_file_name(path)
    try:
        with open_idx(path) as f:
            try:
                header = parse_idx_header(f, path, max_bytes)
            except ValueError as exc:
                raise DatasetError(str(exc)) from None
            if path.suffix != ".gz":
                size = os.fstat(f.fileno()).st_size
                if size != header.total_bytes:
                    raise DatasetError(_size_mismatch(name, header, size - header.header_bytes))
            data = np.empty(header.data_bytes, dtype=np.uint8)
            view = memoryview(data)
            got = 0
            while got < header.data_bytes:
                n = f.readinto(view[got : got + READ_CHUNK])
                if not n:
                    break
                got += n
            if got < header.data_bytes:
                raise DatasetError(_size_mismatch(name, header, got))
            if f.read(1):
                raise DatasetError(
                    f"{name}: holds more data than its header's "
                    f"{'x'.join(map(str, header.dims))} = {header.data_bytes:,} bytes "
                    "(corrupt, or not what its header claims)"
                )
    except (OSError, EOFError, zlib.error) as exc:
        # gzip.BadGzipFile is an OSError; EOFError: a cut-off .gz. The OSError's own
        # text names the absolute path, which the job's owner must not see.
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise DatasetError(f"cannot read {name}: {reason}") from None
    return data.reshape(header.dims)


def _size_mismatch(name: str, header: IdxHeader, held: int) -> str:
    return (
        f"{name}: header says {'x'.join(map(str, header.dims))} = {header.data_bytes:,} "
        f"bytes of data, the file holds {held:,} (truncated or corrupt)"
    )


def idx_files(directory: Path) -> dict[str, Path]:
    """The four official files in `directory`; DatasetError names the first missing one."""
    found: dict[str, Path] = {}
    for key, stem in IDX_FILES.items():
        path = find_idx_file(directory, stem)
        if path is None:
            raise DatasetError(f"{directory.name}/{stem}[.gz] is missing")
        found[key] = path
    return found


def load_idx_dataset(
    directory: Path, max_bytes: int = DEFAULT_MAX_DATASET_FILE_BYTES
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_x, train_y, test_x, test_y): the official split, images as (N, 1, H, W) uint8."""
    files = idx_files(directory)
    out: list[np.ndarray] = []
    for part in ("train", "test"):
        images = read_idx(files[f"{part}_images"], max_bytes)
        labels = read_idx(files[f"{part}_labels"], max_bytes)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(
                f"{directory.name}: {part} images {images.shape} and labels {labels.shape} "
                "do not match"
            )
        if len(labels) and int(labels.max()) >= NUM_CLASSES:
            raise DatasetError(
                f"{data_file_name(files[f'{part}_labels'])}: label {int(labels.max())} "
                "is not in 0..9"
            )
        out += [images[:, None, :, :], labels.astype(np.int64)]
    if out[0].shape[1:] != out[2].shape[1:]:
        raise DatasetError(f"{directory.name}: train and test images differ in size")
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


def read_cifar_batch(
    path: Path, max_bytes: int = DEFAULT_MAX_DATASET_FILE_BYTES
) -> tuple[np.ndarray, np.ndarray]:
    """One batch file: (images (N, 3, 32, 32) uint8, labels (N,) int64)."""
    name = data_file_name(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise DatasetError(
                    f"{name}: {size:,} bytes, more than the limit of {max_bytes:,} "
                    "(TRAINYARD_MAX_DATASET_FILE_BYTES)"
                )
            raw = f.read(max_bytes + 1)
    except OSError as exc:
        raise DatasetError(f"cannot read {name}: {exc.strerror or type(exc).__name__}") from None
    try:
        # encoding="bytes": the batches were pickled by Python 2; keys come back as bytes.
        batch = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # a corrupt pickle can raise nearly anything
        raise DatasetError(f"{name} is not a CIFAR-10 batch: {exc}") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DatasetError(f"{name} is not a CIFAR-10 batch: no b'data' and b'labels'")
    data, labels = batch[b"data"], batch[b"labels"]
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == 3072
    ):
        shape = getattr(data, "shape", type(data).__name__)
        raise DatasetError(f"{name}: b'data' must be an N x 3072 uint8 array, got {shape}")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DatasetError(f"{name}: b'labels' is not a list of integers") from None
    if y.shape != (len(data),):
        raise DatasetError(f"{name}: {len(data)} images but {y.size} labels")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= NUM_CLASSES):
        raise DatasetError(f"{name}: labels must be in 0..9")
    # Each row is the red, green then blue 32x32 plane, row-major: already channels-first.
    return data.reshape(-1, 3, 32, 32), y


def cifar_files(data_dir: Path) -> list[Path]:
    directory = data_dir / CIFAR10_DIR
    return [directory / name for name in CIFAR10_FILES]


def load_cifar10(
    data_dir: Path, max_bytes: int = DEFAULT_MAX_DATASET_FILE_BYTES
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_x, train_y, test_x, test_y): data_batch_1..5 and test_batch."""
    parts = []
    for path in cifar_files(data_dir):
        if not path.is_file():
            raise DatasetError(f"cifar10: {data_file_name(path)} is missing")
        parts.append(read_cifar_batch(path, max_bytes))
    train_x = np.concatenate([x for x, _ in parts[:-1]])
    train_y = np.concatenate([y for _, y in parts[:-1]])
    test_x, test_y = parts[-1]
    return train_x, train_y, test_x, test_y
