"""The host's NVIDIA GPUs, listed through NVML (nvidia-ml-py), never through torch.cuda.

A worker's main process lists its GPUs before the prefork pool forks. Initializing CUDA
there would break every child (CUDA does not survive fork), and `torch.cuda.device_count()`
may initialize it; NVML is a separate driver library that does not. pynvml is imported
lazily: on a host without the library or the driver, `list_gpus()` is [] without a word
in the log, which is what a CPU host should look like.

NVML numbers GPUs in PCI bus order. CUDA's default order is "fastest first", so the
slots set CUDA_DEVICE_ORDER=PCI_BUS_ID next to CUDA_VISIBLE_DEVICES (worker/slots.py):
then index 2 here is the same card as CUDA_VISIBLE_DEVICES=2.

    python -m worker.gpu_inventory      # prints what a worker here would see, as JSON
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger(__name__)

_nvml_lock = threading.Lock()


@dataclass(frozen=True)
class Gpu:
    """One GPU as NVML describes it. A GPU an operator named with `--gpus` on a host
    where NVML cannot be read (worker/slots.py) has only its index: the rest is None."""

    index: int
    uuid: str | None
    name: str | None
    memory_total_bytes: int | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _text(value: bytes | str) -> str:
    # nvidia-ml-py returned bytes before 11.5 and str since.
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def list_gpus() -> list[Gpu]:
    """Every GPU NVML reports on this host, by index. [] when nvidia-ml-py is not
    installed, libnvidia-ml cannot be loaded, or the driver answers with an error.

    Ignores CUDA_VISIBLE_DEVICES on purpose: the worker decides which GPUs each slot
    sees (`--gpus`), and NVML indices are the ones `nvidia-smi` shows."""
    try:
        import pynvml
    except ImportError:
        return []
    with _nvml_lock:
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - no driver: a CPU host
            log.debug("NVML not available (%s): no GPUs", exc)
            return []
        try:
            gpus = []
            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                gpus.append(
                    Gpu(
                        index=index,
                        uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                        name=_text(pynvml.nvmlDeviceGetName(handle)),
                        memory_total_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                    )
                )
            return gpus
        except Exception as exc:  # noqa: BLE001 - a driver in a bad state counts as no GPU
            log.warning("NVML: cannot list GPUs (%s); treating this host as having none", exc)
            return []
        finally:
            with contextlib.suppress(Exception):
                pynvml.nvmlShutdown()


def main() -> None:
    print(json.dumps([gpu.to_json() for gpu in list_gpus()], indent=2))


if __name__ == "__main__":
    main()
