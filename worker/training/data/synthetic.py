"""Generated datasets, fully determined by their params (data_seed included).

Each has a signal a model can learn and a baseline cannot fully exploit, so they serve
as benchmarks and as test data: class prototypes under noise (images), a linear plus
nonlinear target (regression), class-coding marker tokens among random ones (sequences).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from shared.dataset_catalog import (
    SyntheticImagesParams,
    SyntheticRegressionParams,
    SyntheticSequencesParams,
)

log = logging.getLogger(__name__)

# Generate in pieces of about this many values: bounded temporaries for large datasets.
CHUNK_VALUES = 1 << 22
IMAGE_NOISE = 1.0  # per-pixel noise std, in units of the prototypes' std
PIXEL_MID, PIXEL_SPREAD = 128.0, 40.0  # maps the generated values to uint8 pixels


def _rng(seed: int, stream: int) -> np.random.Generator:
    # A separate stream per generator: the same data_seed gives unrelated datasets.
    return np.random.default_rng([seed, stream])


def _balanced_labels(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    # Equal class counts (up to one) so stratified splits work whenever n allows.
    return rng.permutation(np.arange(n) % k).astype(np.int64)


def _prototypes(low: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Low-resolution noise upsampled to full size: smooth spatial patterns (the kind of
    signal a CNN picks up), each scaled to zero mean and unit std."""
    proto = F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
    mean = proto.mean(dim=(1, 2, 3), keepdim=True)
    std = proto.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    return (proto - mean) / std


def synthetic_images(p: SyntheticImagesParams) -> tuple[np.ndarray, np.ndarray]:
    """(N, C, H, W) uint8 pixels: a smooth random prototype per class, varied contrast, noise.

    Random draws come from numpy (a stable stream per data_seed); the arithmetic runs in
    torch, several times faster than numpy's on large datasets.
    """
    rng = _rng(p.data_seed, 1)
    y = _balanced_labels(rng, p.num_samples, p.num_classes)
    low = rng.standard_normal(
        (p.num_classes, p.channels, max(2, p.height // 4), max(2, p.width // 4))
    )
    low_t = torch.from_numpy(low.astype(np.float32))
    per_sample = p.channels * p.height * p.width
    # All prototypes at once when they fit in a chunk's memory, else per chunk's labels.
    protos = (
        _prototypes(low_t, p.height, p.width)
        if p.num_classes * per_sample <= CHUNK_VALUES
        else None
    )
    x = np.empty((p.num_samples, p.channels, p.height, p.width), dtype=np.uint8)
    out = torch.from_numpy(x)
    step = max(1, CHUNK_VALUES // per_sample)
    for start in range(0, p.num_samples, step):
        labels = torch.from_numpy(y[start : start + step])
        m = len(labels)
        chunk = (
            protos[labels] if protos is not None else _prototypes(low_t[labels], p.height, p.width)
        )
        contrast = torch.from_numpy(rng.uniform(0.6, 1.4, size=m).astype(np.float32))
        # Noise: the sum of two uniform bytes (triangular, std ~104.1), cheap to draw.
        u = torch.from_numpy(rng.integers(0, 256, size=(2, m, *chunk.shape[1:]), dtype=np.uint8))
        noise = u[0].float().add_(u[1].float()).sub_(255.0).mul_(PIXEL_SPREAD * IMAGE_NOISE / 104.1)
        values = (
            chunk.mul_((PIXEL_SPREAD * contrast)[:, None, None, None]).add_(noise).add_(PIXEL_MID)
        )
        out[start : start + m] = values.round_().clamp_(0, 255).to(torch.uint8)
    return x, y


def synthetic_regression(p: SyntheticRegressionParams) -> tuple[np.ndarray, np.ndarray]:
    """x ~ N(0, 1) (N, F) float32; y = linear + sine + quadratic terms + noise * N(0, 1)."""
    rng = _rng(p.data_seed, 2)
    f = p.num_features
    w = rng.standard_normal(f) / np.sqrt(f)  # each projection has unit variance
    u = rng.standard_normal(f) / np.sqrt(f)
    x = np.empty((p.num_samples, f), dtype=np.float32)
    y = np.empty(p.num_samples, dtype=np.float32)
    step = max(1, CHUNK_VALUES // f)
    for start in range(0, p.num_samples, step):
        chunk = rng.standard_normal((min(step, p.num_samples - start), f), dtype=np.float32)
        a, b = chunk @ w, chunk @ u
        target = a + np.sin(2.0 * b) + 0.25 * (b**2 - 1.0)
        x[start : start + len(chunk)] = chunk
        y[start : start + len(chunk)] = target + p.noise * rng.standard_normal(len(chunk))
    return x, y


def sequence_code(num_classes: int, vocab_size: int, seq_len: int) -> tuple[int, int]:
    """(base, digits): class c is written as `digits` marker tokens, c in base `base`.

    Marker tokens are 0..base-1 and never appear as background, so a class is read off
    the markers alone. With few classes each has its own token (digits = 1).
    """
    base = min(num_classes, vocab_size // 2)
    digits = 1
    while base**digits < num_classes:
        digits += 1
    if digits > seq_len:
        log.warning(
            "synthetic_sequences: %d tokens cannot tell %d classes apart with %d marker tokens; "
            "classes share codes",
            seq_len,
            num_classes,
            base,
        )
        digits = seq_len
    return base, digits


def synthetic_sequences(p: SyntheticSequencesParams) -> tuple[np.ndarray, np.ndarray]:
    """(N, seq_len) tokens (int16 or int32 to save memory) and int64 labels.

    Background tokens are uniform over the non-marker vocabulary; the class code is
    planted at random positions (several copies when it is a single token), so a model
    must find it wherever it is.
    """
    rng = _rng(p.data_seed, 3)
    n, length = p.num_samples, p.seq_len
    y = _balanced_labels(rng, n, p.num_classes)
    base, digits = sequence_code(p.num_classes, p.vocab_size, length)
    # int16, not uint16: CUDA supports few ops on unsigned 16-bit tensors.
    dtype = np.int16 if p.vocab_size <= np.iinfo(np.int16).max + 1 else np.int32
    x = np.empty((n, length), dtype=dtype)
    code = np.stack([(y // base**i) % base for i in reversed(range(digits))], axis=1)
    copies = max(1, length // 8) if digits == 1 else 1
    step = max(1, CHUNK_VALUES // length)
    for start in range(0, n, step):
        m = min(step, n - start)
        tokens = rng.integers(base, p.vocab_size, size=(m, length), dtype=np.int64)
        starts = rng.integers(0, length - digits + 1, size=(m, copies))
        positions = starts[:, :, None] + np.arange(digits)  # (m, copies, digits)
        rows = np.arange(m)[:, None, None]
        tokens[rows, positions] = code[start : start + m, None, :]
        x[start : start + m] = tokens
    return x, y
