"""Choosing and naming the devices a job runs on."""

from __future__ import annotations

import os

import torch

from worker.training.errors import NotEnoughDevices


def pick_device() -> torch.device:
    """CUDA when this process can see a GPU, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def job_devices(gpus: int, processes: int = 1) -> list[torch.device]:
    """One device per training process of a job that asks for `gpus` GPUs (its
    `resources.gpus`) or, on CPU, `processes` processes (`resources.processes`).

    A GPU job gets cuda:0..gpus-1 of the GPUs this process sees (a worker slot's,
    through CUDA_VISIBLE_DEVICES), or NotEnoughDevices if it sees fewer: a job must
    never train on fewer GPUs than it asked for. A 1-process job without GPUs keeps
    `pick_device`'s choice; a CPU data-parallel job trains on the CPU in every process.
    """
    if gpus >= 1:
        seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if seen < gpus:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            where = "" if visible is None else f" (CUDA_VISIBLE_DEVICES={visible or 'none'})"
            raise NotEnoughDevices(
                f"the job needs {gpus} GPU{'s' if gpus > 1 else ''} of one host "
                f"(resources.gpus) and this worker slot has {seen}{where}; it was not "
                "trained on fewer"
            )
        return [torch.device("cuda", i) for i in range(gpus)]
    if processes > 1:
        return [torch.device("cpu")] * processes
    return [pick_device()]


def device_name(device: torch.device) -> str:
    """A human-readable name recorded with results ("cpu", "NVIDIA H100 80GB HBM3")."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type
