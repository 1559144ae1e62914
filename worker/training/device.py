"""Choosing and naming the device a job runs on."""

from __future__ import annotations

import torch


def pick_device() -> torch.device:
    """CUDA when this process can see a GPU, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    """A human-readable name recorded with results ("cpu", "NVIDIA H100 80GB HBM3")."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type
