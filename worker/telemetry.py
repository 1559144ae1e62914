"""GPU and host telemetry: what a job's GPUs and processes are doing, every few seconds.

Two readers use the same sampling functions:

- `JobTelemetry`, a thread beside a running train job, logs the job's samples as metric
  points (gpu_util, gpu_mem_gb, gpu_temp_c, gpu_power_w, cpu_percent, rss_gb; keys and
  labels in shared/metric_catalog.py, group "system") through the run's MetricSink,
  every TRAINYARD_TELEMETRY_SECONDS. Their step is the job's running time in seconds
  (series kind "time"), continued across attempts.
- `SlotTelemetry`, called by the slot's registry heartbeat (shared/worker_registry.py),
  puts the latest host and GPU sample in the registry for the workers page.

GPUs are read through NVML (nvidia-ml-py), imported lazily: on a host without the
library or the driver the GPU part is simply absent, with nothing in the log. NVML is not
CUDA, so reading it never initializes CUDA in a process. Which GPUs a slot owns comes from
worker/slots.py; `sample_gpus` takes the NVML module as a parameter so that tests pass a
fake one and bench/gpu_check.py can call it on a real GPU.

Sampling must never hurt the job: every failure is caught, logged once per kind, and
that part of the sample is left out.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import psutil
from sqlalchemy import func, select

from shared import metric_catalog as mc
from shared.db import transaction
from shared.orm import MetricPoint
from shared.settings import Settings
from worker import slots

log = logging.getLogger(__name__)

GB = 1e9
# Samples are whole seconds apart on the chart's x axis (series kind "time"), so a
# shorter period would put two points at one step.
MIN_INTERVAL_S = 1.0


class GpuRef(Protocol):
    """What sampling needs of a GPU: worker/gpu_inventory.py's Gpu has both."""

    index: int
    uuid: str | None


@dataclass(frozen=True)
class GpuSample:
    """One GPU at one moment. A figure the GPU does not report (power on some boards,
    temperature in some VMs) is None."""

    index: int
    uuid: str | None
    name: str | None
    util_percent: float | None
    mem_used_bytes: int | None
    mem_total_bytes: int | None
    temp_c: float | None
    power_w: float | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ProcessSample:
    """A process and its children (data loader workers, data-parallel ranks)."""

    cpu_percent: float  # of one core: 250 means two and a half cores busy
    rss_bytes: int
    processes: int


# ---------------------------------------------------------------- NVML


_nvml: dict[str, Any] = {}
_nvml_lock = threading.Lock()


def nvml_module() -> Any | None:
    """pynvml, initialized once in this process; None without the library or a driver
    (a CPU host), silently. After a fork the child initializes its own."""
    with _nvml_lock:
        if _nvml.get("pid") == os.getpid():
            return _nvml["module"]
        module = None
        try:
            import pynvml

            pynvml.nvmlInit()
            module = pynvml
        except Exception as exc:  # noqa: BLE001 - ImportError or NVMLError: no GPUs here
            log.debug("telemetry: NVML not available (%s)", exc)
        _nvml.update(pid=os.getpid(), module=module)
        return module


def _text(value: Any) -> str:
    # nvidia-ml-py returned bytes before 11.5 and str since.
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _read(what: Callable[[], Any], warned: set[str], name: str) -> Any | None:
    try:
        return what()
    except Exception as exc:  # noqa: BLE001 - NVMLError_NotSupported and friends
        if name not in warned:
            warned.add(name)
            log.debug("telemetry: GPU %s not readable (%s)", name, exc)
        return None


def sample_gpus(
    nvml: Any, gpus: Iterable[GpuRef], warned: set[str] | None = None
) -> list[GpuSample]:
    """Utilization, memory, temperature and power of each of `gpus`, read from `nvml`
    (the pynvml module, or an object with the same functions). A GPU that cannot be
    found is left out; a figure it does not report is None."""
    warned = set() if warned is None else warned
    samples = []
    for gpu in gpus:
        try:
            handle = (
                nvml.nvmlDeviceGetHandleByUUID(gpu.uuid)
                if gpu.uuid
                else nvml.nvmlDeviceGetHandleByIndex(gpu.index)
            )
        except Exception as exc:  # noqa: BLE001 - a GPU that fell off the bus
            if f"handle-{gpu.index}" not in warned:
                warned.add(f"handle-{gpu.index}")
                log.warning("telemetry: cannot read GPU %s (%s)", gpu.index, exc)
            continue
        memory = _read(lambda h=handle: nvml.nvmlDeviceGetMemoryInfo(h), warned, "memory")
        util = _read(lambda h=handle: nvml.nvmlDeviceGetUtilizationRates(h), warned, "utilization")
        temp = _read(
            lambda h=handle: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU),
            warned,
            "temperature",
        )
        power_mw = _read(lambda h=handle: nvml.nvmlDeviceGetPowerUsage(h), warned, "power")
        name = _read(lambda h=handle: nvml.nvmlDeviceGetName(h), warned, "name")
        samples.append(
            GpuSample(
                index=gpu.index,
                uuid=gpu.uuid,
                name=None if name is None else _text(name),
                util_percent=None if util is None else float(util.gpu),
                mem_used_bytes=None if memory is None else int(memory.used),
                mem_total_bytes=None if memory is None else int(memory.total),
                temp_c=None if temp is None else float(temp),
                power_w=None if power_mw is None else power_mw / 1000.0,
            )
        )
    return samples


@dataclass(frozen=True)
class _Index:
    index: int
    uuid: str | None = None


def host_gpus(nvml: Any) -> list[GpuRef]:
    """Every GPU NVML reports, by index (for bench/gpu_check.py and hosts whose slots
    own no GPU list)."""
    try:
        return [_Index(i) for i in range(int(nvml.nvmlDeviceGetCount()))]
    except Exception:  # noqa: BLE001
        return []


def slot_gpus() -> tuple[GpuRef, ...]:
    """The GPUs the current slot owns (worker/slots.py); () on a CPU slot."""
    slot = slots.current_slot()
    return tuple(slot.gpus) if slot is not None else ()


# ---------------------------------------------------------------- processes


class ProcessSampler:
    """CPU % and resident memory of a process and its descendants. CPU % is measured
    between two calls (psutil's rule), so the first sample of a process counts 0."""

    def __init__(self, pid: int | None = None) -> None:
        self._root = psutil.Process(pid or os.getpid())
        self._known: dict[int, psutil.Process] = {}
        self._root.cpu_percent(None)

    def sample(self) -> ProcessSample:
        try:
            children = self._root.children(recursive=True)
        except psutil.Error:
            children = []
        cpu = self._root.cpu_percent(None)
        rss = self._root.memory_info().rss
        alive = {self._root.pid}
        for child in children:
            # The same Process object each time: psutil keeps the last CPU times on it.
            proc = self._known.setdefault(child.pid, child)
            try:
                cpu += proc.cpu_percent(None)
                rss += proc.memory_info().rss
                alive.add(child.pid)
            except psutil.Error:  # it exited between the listing and the reading
                continue
        self._known = {pid: p for pid, p in self._known.items() if pid in alive}
        return ProcessSample(cpu_percent=cpu, rss_bytes=int(rss), processes=len(alive))


def host_stats() -> dict[str, Any]:
    """The host's CPU and memory use, for the workers page."""
    memory = psutil.virtual_memory()
    return {
        "cpu_percent": psutil.cpu_percent(None),
        "cpus": psutil.cpu_count() or 1,
        "mem_used_bytes": int(memory.total - memory.available),
        "mem_total_bytes": int(memory.total),
    }


# ---------------------------------------------------------------- a job's metrics


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def job_metrics(gpus: Sequence[GpuSample], process: ProcessSample | None) -> dict[str, float]:
    """The metric points of one sample. A slot with several GPUs gets one point per key:
    utilization averaged, memory and power added up, the hottest temperature; the
    workers page shows each GPU on its own."""
    out: dict[str, float] = {}
    if process is not None:
        out[mc.CPU_PERCENT] = round(process.cpu_percent, 1)
        out[mc.RSS_GB] = round(process.rss_bytes / GB, 3)
    util = [g.util_percent for g in gpus if g.util_percent is not None]
    used = [g.mem_used_bytes for g in gpus if g.mem_used_bytes is not None]
    temps = [g.temp_c for g in gpus if g.temp_c is not None]
    power = [g.power_w for g in gpus if g.power_w is not None]
    if util:
        out[mc.GPU_UTIL] = round(_mean(util) or 0.0, 1)
    if used:
        out[mc.GPU_MEM_GB] = round(sum(used) / GB, 3)
    if temps:
        out[mc.GPU_TEMP_C] = max(temps)
    if power:
        out[mc.GPU_POWER_W] = round(sum(power), 1)
    return out


class _Logger(Protocol):
    def log(self, key: str, value: float, step: int, epoch: int | None = None) -> None: ...


def resumed_offset(database_url: str, job_id: int, attempt: int) -> int:
    """Seconds of running time earlier attempts of this job charted, so that a resumed
    attempt's samples continue after them instead of starting again at 0."""
    if attempt <= 1:
        return 0
    try:
        with transaction(database_url) as session:
            last = session.scalar(
                select(func.max(MetricPoint.step)).where(
                    MetricPoint.job_id == job_id,
                    MetricPoint.key == mc.CPU_PERCENT,
                    MetricPoint.attempt < attempt,
                )
            )
    except Exception:  # noqa: BLE001 - a chart that restarts at 0 beats a failed job
        log.warning("job %s: cannot read earlier telemetry; charting from 0", job_id)
        return 0
    return int(last or 0)


class JobTelemetry:
    """A daemon thread that logs the job's system metrics to `sink` every `interval_s`
    while the job body runs. `gpus`: the slot's GPUs (empty on a CPU slot)."""

    def __init__(
        self,
        sink: _Logger,
        interval_s: float,
        gpus: Sequence[GpuRef] = (),
        offset_s: int = 0,
        nvml: Any | None = None,
    ) -> None:
        self._sink = sink
        self._interval_s = max(interval_s, MIN_INTERVAL_S)
        self._gpus = tuple(gpus)
        self._nvml = nvml if nvml is not None or not self._gpus else nvml_module()
        self._offset_s = offset_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trainyard-telemetry", daemon=True)
        self._warned: set[str] = set()
        self._last_step = offset_s
        self.samples = 0

    def __enter__(self) -> JobTelemetry:
        self._started = time.monotonic()
        self._process = ProcessSampler()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def sample_once(self) -> dict[str, float]:
        gpus = sample_gpus(self._nvml, self._gpus, self._warned) if self._nvml else []
        values = job_metrics(gpus, self._process.sample())
        step = self._offset_s + round(time.monotonic() - self._started)
        step = max(step, self._last_step + 1)
        self._last_step = step
        for key, value in values.items():
            self._sink.log(key, value, step)
        self.samples += 1
        return values

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.sample_once()
            except Exception as exc:  # noqa: BLE001 - telemetry must never stop a job
                if "sample" not in self._warned:
                    self._warned.add("sample")
                    log.warning("telemetry: sampling failed (%s); will keep trying", exc)


def for_job(
    sink: _Logger, settings: Settings, job_id: int, attempt: int, *, train: bool
) -> AbstractContextManager[Any]:
    """Telemetry around a job body: sampled for train jobs (their page charts it) unless
    TRAINYARD_TELEMETRY_SECONDS is 0; an evaluation runs for moments and charts nothing."""
    if not train or settings.telemetry_seconds <= 0:
        return nullcontext()
    offset = resumed_offset(settings.resolved_database_url, job_id, attempt)
    return JobTelemetry(sink, settings.telemetry_seconds, slot_gpus(), offset_s=offset)


# ---------------------------------------------------------------- the registry


class SlotTelemetry:
    """The latest sample of this slot for its registry heartbeat: the host's CPU and
    memory, this slot's process tree, and each of the slot's GPUs."""

    def __init__(self, gpus: Callable[[], Sequence[GpuRef]] = slot_gpus) -> None:
        self._gpus = gpus
        self._process = ProcessSampler()
        psutil.cpu_percent(None)  # the host's first reading is against this one
        self._warned: set[str] = set()

    def __call__(self) -> dict[str, Any]:
        gpus = list(self._gpus())
        nvml = nvml_module() if gpus else None
        process = self._process.sample()
        slot = {"cpu_percent": round(process.cpu_percent, 1), "rss_bytes": process.rss_bytes}
        return {**telemetry_json(nvml, gpus, self._warned), "slot": slot}


def sample_host() -> dict[str, Any]:
    """One sample of this host and every GPU NVML reports, whoever owns them: what
    `python -m worker.telemetry` prints and bench/gpu_check.py can read."""
    nvml = nvml_module()
    return telemetry_json(nvml, host_gpus(nvml) if nvml else [])


def telemetry_json(
    nvml: Any | None, gpus: Sequence[GpuRef], warned: set[str] | None = None
) -> dict[str, Any]:
    """The host's figures and `gpus`' samples (none without NVML), as the registry
    stores them."""
    return {
        "host": host_stats(),
        "gpus": [g.to_json() for g in sample_gpus(nvml, gpus, warned)] if nvml else [],
        "at": time.time(),
    }


def main() -> None:
    import json

    print(json.dumps(sample_host(), indent=2))


if __name__ == "__main__":
    main()
