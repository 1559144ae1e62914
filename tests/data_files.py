"""Tiny dataset files in the exact official formats, for tests.

- write_mnist: the four IDX files of MNIST / Fashion-MNIST (big-endian header, magic
  0x00000801 labels / 0x00000803 images), plain or gzipped.
- write_cifar10: data_batch_1..5 and test_batch as the Python 2 pickles the official
  archive holds (byte strings, numpy.core.multiarray._reconstruct), so loaders see
  what they would see on the real files.
- write_csv: a CSV upload.

Pixel values depend on the label, so a model can learn them; everything is fixed by
the `seed` argument.
"""

from __future__ import annotations

import csv
import gzip
import pickle
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shared.dataset_catalog import CIFAR10_DIR, IDX_FILES


def _images(rng: np.random.Generator, labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    # A bright band whose position depends on the label, on noise.
    x = rng.integers(0, 60, size=(len(labels), *shape), dtype=np.int64)
    rows = shape[-2]
    for i, label in enumerate(labels):
        start = int(label) * rows // 10
        x[i, ..., start : start + max(1, rows // 10), :] += 180
    return x.clip(0, 255).astype(np.uint8)


def idx_bytes(array: np.ndarray) -> bytes:
    """An array of uint8 as an IDX file: 0, 0, type 0x08, ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    data = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def write_mnist(
    directory: Path, n_train: int = 50, n_test: int = 20, gz: bool = False, seed: int = 0,
    size: int = 28,
) -> dict[str, Path]:  # fmt: skip
    """The four official files in `directory` (created; e.g. data_dir / "mnist")."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for part, n in (("train", n_train), ("test", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        images = _images(rng, labels, (size, size))
        out[f"{part}_images"] = write_idx(directory / IDX_FILES[f"{part}_images"], images, gz)
        out[f"{part}_labels"] = write_idx(directory / IDX_FILES[f"{part}_labels"], labels, gz)
    return out


# ---------------------------------------------------------------- CIFAR-10


def _reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


class Py2Pickler(pickle._Pickler):  # type: ignore[name-defined, misc]
    """Pickles the way Python 2's cPickle wrote the CIFAR-10 batches.

    Python 2 had no separate bytes type: str and bytes both become BINSTRING opcodes,
    which Python 3 reads back as bytes with encoding="bytes"; numpy's reconstructor is
    named by its numpy 1 module, numpy.core.multiarray.
    """

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_py2_str(self, obj: bytes | str) -> None:
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if obj is _reconstruct():
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)

    dispatch[type(_reconstruct())] = save_global


def py2_pickle(obj: Any) -> bytes:
    import io

    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def cifar_batch(images: np.ndarray, labels: Sequence[int], batch_label: str) -> dict[bytes, Any]:
    """One batch dict: images (N, 3, 32, 32) uint8 stored as rows of R, G, B planes."""
    return {
        b"batch_label": batch_label.encode(),
        b"labels": [int(v) for v in labels],
        b"data": np.ascontiguousarray(images.reshape(len(images), 3072), dtype=np.uint8),
        b"filenames": [f"img_{i:05d}.png".encode() for i in range(len(images))],
    }


def write_cifar10(data_dir: Path, n_per_batch: int = 10, seed: int = 0) -> Path:
    """data_dir/cifar-10-batches-py/ with five training batches and a test batch."""
    directory = data_dir / CIFAR10_DIR
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [(f"data_batch_{i}", f"training batch {i} of 5") for i in range(1, 6)]
    for file_name, label in [*names, ("test_batch", "testing batch 1 of 1")]:
        labels = (np.arange(n_per_batch) % 10).astype(np.int64)
        rng.shuffle(labels)
        images = _images(rng, labels, (3, 32, 32))
        (directory / file_name).write_bytes(py2_pickle(cifar_batch(images, labels.tolist(), label)))
    return directory


# ---------------------------------------------------------------- CSV


def write_csv(path: Path, rows: Iterable[Sequence[Any]]) -> Path:
    """rows[0] is the header; values are written with str()."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([[str(v) for v in row] for row in rows])
    return path
