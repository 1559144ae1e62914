"""Built-in datasets as fixed train/val/test splits of tensors already on the device.

The splits do not depend on the job's seed: every job on a dataset is scored on the
same test samples, and two jobs with the same val_fraction validate on the same
samples, so their metrics are comparable.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from shared.registry import DATASETS, DatasetInfo

log = logging.getLogger(__name__)

# Fixed seeds for the split; changing either changes every stored metric's meaning.
TEST_SPLIT_SEED = 20261128
VAL_SPLIT_SEED = 1128

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # float32, (N, *input_shape)
    y: torch.Tensor  # int64 class indices, (N,)

    def __len__(self) -> int:
        return self.y.shape[0]


@dataclass(frozen=True)
class Splits:
    info: DatasetInfo
    train: Split
    val: Split
    test: Split

    def get(self, name: str) -> Split:
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown split {name!r}; choose one of: {', '.join(SPLIT_NAMES)}")
        return getattr(self, name)


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixels are counts 0..16; scale to [0, 1] and add the channel axis.
    x = (bunch.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return x, bunch.target.astype(np.int64)


_LOADERS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {"digits": _load_digits}


@functools.lru_cache(maxsize=8)
def _numpy_splits(name: str, val_fraction: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Split once per process: later jobs on the same dataset skip loading and splitting."""
    info = DATASETS[name]
    x, y = _LOADERS[name]()
    if x.shape[1:] != info.input_shape or len(y) != info.num_samples:
        raise RuntimeError(f"dataset {name!r} does not match its registry entry")
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=info.test_fraction, stratify=y, random_state=TEST_SPLIT_SEED
    )
    if len(y_test) != info.test_size:
        raise RuntimeError(
            f"dataset {name!r}: test split has {len(y_test)} samples, registry says {info.test_size}"
        )
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_fraction, stratify=y_rest, random_state=VAL_SPLIT_SEED
    )
    splits = {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}
    for arrays in splits.values():
        for a in arrays:
            a.setflags(write=False)  # shared by every job in this process
    log.debug("loaded %s: %s", name, {k: len(v[1]) for k, v in splits.items()})
    return splits


def load_dataset(name: str, val_fraction: float, device: torch.device) -> Splits:
    """The dataset's fixed splits as tensors on `device` (x float32, y int64)."""
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(sorted(_LOADERS))}")
    arrays = _numpy_splits(name, float(val_fraction))
    # torch.tensor copies, so jobs never share (or write into) the cached arrays.
    parts = {
        split: Split(torch.tensor(x, device=device), torch.tensor(y, device=device))
        for split, (x, y) in arrays.items()
    }
    return Splits(info=DATASETS[name], **parts)
