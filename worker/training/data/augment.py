"""Random augmentation of image batches, batched on the device.

All randomness is drawn from the caller's CPU generator (then moved to the device),
so the training loop can save and restore its state and a resumed job augments its
batches exactly as an uninterrupted one would. No per-sample Python work: each step
is a few tensor operations over the whole batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from shared.spec import AugmentSpec


def _hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    # torch.where, not boolean indexing: no host-device sync on CUDA.
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def _pad_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by `padding`, crop back to the original size at a random offset per sample."""
    n, _, h, w = x.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator).to(x.device)
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = offsets[0][:, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = offsets[1][:, None] + torch.arange(w, device=x.device)  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indexing around the channel slice gives (N, H, W, C).
    crops = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return crops.permute(0, 3, 1, 2).contiguous()


def _rotate(x: torch.Tensor, degrees: float, generator: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    angle = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * math.radians(
        degrees
    )
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(angle)
    # affine_grid works in [-1, 1] coordinates per axis; the h/w factors make this a
    # true rotation of non-square images rather than a shear.
    theta = torch.stack(
        [torch.stack([cos, -sin * h / w, zero], 1), torch.stack([sin * w / h, cos, zero], 1)], 1
    ).to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augment_batch(
    x: torch.Tensor, augment: AugmentSpec, generator: torch.Generator
) -> torch.Tensor:
    """A randomly flipped / shifted / rotated copy of the image batch x (N, C, H, W).

    Areas shifted or rotated in from outside the image are zeros of the normalized
    data. The input is not modified; shape, dtype and device are kept.
    """
    if x.ndim != 4:
        raise ValueError(f"augment_batch needs images (N, C, H, W), got shape {list(x.shape)}")
    if augment.hflip:
        x = _hflip(x, generator)
    if augment.crop_padding > 0:
        x = _pad_crop(x, augment.crop_padding, generator)
    if augment.rotation_degrees > 0:
        x = _rotate(x, augment.rotation_degrees, generator)
    return x
