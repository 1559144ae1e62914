"""Normalization as one affine map per channel (images) or feature (tables).

Statistics are a dict of tensors, so a checkpoint can hold them and torch.load with
weights_only=True can read them back:
    {"method": int64 scalar (1 scale, 2 standardize),
     "shift": float32 (C, 1, 1) or (F,), "scale": float32, same shape}
and applying them is always `(x - shift) / scale`. "none" is the empty dict.
"""

from __future__ import annotations

import torch

from worker.training.errors import UserError

METHOD_CODES = {"scale": 1, "standardize": 2}
# A spread this small relative to the values is constant up to rounding: dividing by
# it would blow rounding noise up to unit scale, so such channels are only shifted.
RELATIVE_EPS = 1e-6


def _reduce_dims(x: torch.Tensor, kind: str) -> tuple[int, ...]:
    # Images: over samples and pixels, per channel; tables: over samples, per feature.
    return (0, 2, 3) if kind == "image" else (0,)


def _safe(spread: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    tiny = spread <= RELATIVE_EPS * (1.0 + level.abs())
    return torch.where(tiny, torch.ones_like(spread), spread)


def compute_stats(
    train_x: torch.Tensor, kind: str, method: str, pixel_max: float | None
) -> dict[str, torch.Tensor]:
    """Statistics of `method` from the training split only (float32, on the CPU).

    Images scale by their known pixel range (0..pixel_max), not by the data seen, so
    every job on a dataset maps a pixel value to the same input.
    """
    if method == "none" or kind == "sequence":
        return {}
    if method not in METHOD_CODES:
        raise ValueError(
            f"unknown normalization {method!r}; choose one of: none, scale, standardize"
        )
    dims = _reduce_dims(train_x, kind)
    x = train_x.to(torch.float64 if kind != "image" else torch.float32)
    if method == "scale" and kind == "image":
        if pixel_max is None:
            raise ValueError("images need their pixel range to be scaled")
        channels = train_x.shape[1]
        shift, scale = torch.zeros(channels), torch.full((channels,), float(pixel_max))
    elif method == "scale":
        low, high = x.amin(dim=dims), x.amax(dim=dims)
        shift, scale = low, _safe(high - low, high)
    else:
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        shift, scale = mean, _safe(var.sqrt(), mean)
    shape = (-1, 1, 1) if kind == "image" else (-1,)
    return {
        "method": torch.tensor(METHOD_CODES[method], dtype=torch.int64),
        "shift": shift.to("cpu", torch.float32).reshape(shape),
        "scale": scale.to("cpu", torch.float32).reshape(shape),
    }


def check_stats(stats: dict[str, torch.Tensor], kind: str, input_shape: tuple[int, ...]) -> None:
    """UserError unless `stats` (e.g. from a checkpoint) fit samples of `input_shape`."""
    if not stats:
        return
    if kind == "sequence":
        raise UserError("token sequences cannot be normalized, but the checkpoint holds statistics")
    if set(stats) != {"method", "shift", "scale"}:
        raise UserError(
            f"normalization statistics have keys {sorted(stats)}; expected method, shift, scale"
        )
    expected = (input_shape[0], 1, 1) if kind == "image" else input_shape
    for key in ("shift", "scale"):
        if tuple(stats[key].shape) != expected:
            raise UserError(
                f"normalization {key} has shape {list(stats[key].shape)}, "
                f"this dataset's samples need {list(expected)}"
            )


def apply_stats(x: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """(x - shift) / scale in float32, in place when x is already a float32 copy."""
    x = x.to(torch.float32)
    if not stats:
        return x
    shift = stats["shift"].to(x.device, torch.float32)
    scale = stats["scale"].to(x.device, torch.float32)
    return x.sub_(shift).div_(scale)
