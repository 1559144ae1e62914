"""GPU and host telemetry (worker/telemetry.py): NVML sampling against a fake NVML
module, a job's system metrics, the registry's latest sample on the workers page and
API, the out-of-memory report's GPU figures, and a real worker on this CPU-only host:
CPU and resident memory sampled, no GPU keys, nothing about NVML in its log."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
import redis
import torch
from flask import Flask

from shared import metric_catalog as mc
from shared.broker import redis_client
from shared.settings import Settings
from shared.worker_registry import SlotHeartbeat, SlotInfo, online_slots, register, slot_key
from tests.conftest import TestUsers as Users
from tests.conftest import as_user, wait_for_state
from tests.helpers import train_spec
from tests.test_authorization import session_client
from worker import telemetry
from worker.failures import CUDA_OOM, GpuMemory, classify, gpu_memory
from worker.telemetry import GpuSample, JobTelemetry, ProcessSample, job_metrics, sample_gpus

SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
GIB = 1024**3


# ---------------------------------------------------------------- a fake NVML


class NotSupported(Exception):
    """What pynvml raises for a figure a board does not report."""


@dataclass(frozen=True)
class FakeGpu:
    uuid: str
    name: str
    util: int
    used: int
    total: int
    temp: int
    power_mw: int | None  # None: this board does not report power


class FakeNvml:
    """The pynvml functions telemetry calls, over a list of fake GPUs."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, gpus: list[FakeGpu]) -> None:
        self.gpus = gpus

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802 - pynvml's names
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:  # noqa: N802
        return self.gpus[index]

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> FakeGpu:  # noqa: N802
        for gpu in self.gpus:
            if gpu.uuid == uuid:
                return gpu
        raise NotSupported(f"no GPU {uuid}")

    def nvmlDeviceGetName(self, h: FakeGpu) -> bytes:  # noqa: N802 - old pynvml: bytes
        return h.name.encode()

    def nvmlDeviceGetMemoryInfo(self, h: FakeGpu) -> Any:  # noqa: N802
        return SimpleNamespace(used=h.used, total=h.total, free=h.total - h.used)

    def nvmlDeviceGetUtilizationRates(self, h: FakeGpu) -> Any:  # noqa: N802
        return SimpleNamespace(gpu=h.util, memory=0)

    def nvmlDeviceGetTemperature(self, h: FakeGpu, sensor: int) -> int:  # noqa: N802
        assert sensor == self.NVML_TEMPERATURE_GPU
        return h.temp

    def nvmlDeviceGetPowerUsage(self, h: FakeGpu) -> int:  # noqa: N802
        if h.power_mw is None:
            raise NotSupported("power")
        return h.power_mw


@dataclass(frozen=True)
class Ref:
    index: int
    uuid: str | None


H200 = FakeGpu("GPU-aaa", "NVIDIA H200", 87, 70 * GIB, 141 * GIB, 64, 451_500)
A100 = FakeGpu("GPU-bbb", "NVIDIA A100", 13, 10 * GIB, 80 * GIB, 71, None)
NVML = FakeNvml([H200, A100])


def test_sample_gpus_reads_each_gpu_by_uuid_or_index() -> None:
    warned: set[str] = set()
    # By UUID whatever the index says (CUDA_VISIBLE_DEVICES renumbers; NVML does not),
    # by index when the slot knows none, and a GPU that is gone is left out.
    refs = [Ref(0, "GPU-bbb"), Ref(0, None), Ref(3, "GPU-gone")]
    first, second = sample_gpus(NVML, refs, warned)
    assert first == GpuSample(
        index=0, uuid="GPU-bbb", name="NVIDIA A100", util_percent=13.0,
        mem_used_bytes=10 * GIB, mem_total_bytes=80 * GIB, temp_c=71.0,
        power_w=None,  # not reported by this board: absent, not an error
    )  # fmt: skip
    assert (second.name, second.power_w, second.util_percent) == ("NVIDIA H200", 451.5, 87.0)
    assert {"power", "handle-3"} <= warned


def test_a_slots_gpus_become_one_point_per_key() -> None:
    gpus = sample_gpus(NVML, [Ref(0, "GPU-aaa"), Ref(1, "GPU-bbb")])
    process = ProcessSample(cpu_percent=153.27, rss_bytes=2_500_000_000, processes=3)
    assert job_metrics(gpus, process) == {
        mc.CPU_PERCENT: 153.3,
        mc.RSS_GB: 2.5,
        mc.GPU_UTIL: 50.0,  # averaged
        mc.GPU_MEM_GB: round(80 * GIB / 1e9, 3),  # added up
        mc.GPU_TEMP_C: 71.0,  # the hottest
        mc.GPU_POWER_W: 451.5,  # the boards that report it
    }
    # A CPU slot: CPU and memory only, no gpu_* key at all.
    assert set(job_metrics([], process)) == {mc.CPU_PERCENT, mc.RSS_GB}


class ListSink:
    def __init__(self) -> None:
        self.points: list[tuple[str, float, int]] = []

    def log(self, key: str, value: float, step: int, epoch: int | None = None) -> None:
        self.points.append((key, value, step))


def test_job_telemetry_logs_gpu_and_process_samples_at_growing_steps() -> None:
    sink = ListSink()
    with JobTelemetry(sink, 3600, [Ref(0, "GPU-aaa")], offset_s=40, nvml=NVML) as job:
        first = job.sample_once()
        job.sample_once()
    assert set(first) == {mc.GPU_UTIL, mc.GPU_MEM_GB, mc.GPU_TEMP_C, mc.GPU_POWER_W,
                          mc.CPU_PERCENT, mc.RSS_GB}  # fmt: skip
    assert first[mc.GPU_UTIL] == 87.0 and first[mc.GPU_POWER_W] == 451.5
    steps = sorted({step for _, _, step in sink.points})
    # Continues after an earlier attempt's 40 s, one step per sample at least.
    assert len(steps) == 2 and 40 < steps[0] < steps[1]
    rss = [v for k, v, _ in sink.points if k == mc.RSS_GB]
    assert 0.01 < rss[0] < psutil.virtual_memory().total / 1e9


def test_job_telemetry_without_gpus_never_touches_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_nvml() -> None:
        raise AssertionError("a CPU slot must not load NVML")

    monkeypatch.setattr(telemetry, "nvml_module", no_nvml)
    sink = ListSink()
    with JobTelemetry(sink, 3600) as job:
        values = job.sample_once()
    assert set(values) == {mc.CPU_PERCENT, mc.RSS_GB}


def test_process_sampler_counts_children() -> None:
    # A job process of its own (this test process may have other children: the worker
    # zygote), which starts one child, as a data loader worker would.
    code = (
        "import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        "time.sleep(60)"
    )
    job = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        sampler = telemetry.ProcessSampler(job.pid)
        deadline = time.monotonic() + 20
        sample = sampler.sample()
        while sample.processes < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
            sample = sampler.sample()
        alone = psutil.Process(job.pid).memory_info().rss
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert sample.processes == 2
    assert sample.rss_bytes > alone


def test_no_nvml_means_no_gpu_part_and_no_log_lines(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Whether or not nvidia-ml-py is installed here, a host without it (or without a
    # driver) gets None, quietly.
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(telemetry, "_nvml", {})
    caplog.set_level(logging.INFO)
    assert telemetry.nvml_module() is None
    sample = telemetry.SlotTelemetry(gpus=lambda: [Ref(0, None)])()
    assert sample["gpus"] == [] and sample["slot"]["rss_bytes"] > 0
    assert sample["host"]["mem_total_bytes"] > 0 and sample["host"]["cpus"] >= 1
    assert caplog.records == []


def test_slot_telemetry_samples_the_slots_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telemetry, "nvml_module", lambda: NVML)
    sample = telemetry.SlotTelemetry(gpus=lambda: [Ref(1, "GPU-bbb")])()
    (gpu,) = sample["gpus"]
    assert gpu["index"] == 1 and gpu["util_percent"] == 13.0 and gpu["power_w"] is None


def test_host_gpus_lists_every_gpu_nvml_reports() -> None:
    assert [g.index for g in telemetry.host_gpus(NVML)] == [0, 1]
    assert telemetry.host_gpus(object()) == []


def test_python_m_worker_telemetry_prints_every_gpu_of_the_host(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    monkeypatch.setattr(telemetry, "nvml_module", lambda: NVML)
    telemetry.main()
    printed = json.loads(capsys.readouterr().out)
    assert [(g["index"], g["name"]) for g in printed["gpus"]] == [
        (0, "NVIDIA H200"), (1, "NVIDIA A100"),
    ]  # fmt: skip
    assert printed["host"]["mem_total_bytes"] == psutil.virtual_memory().total
    monkeypatch.setattr(telemetry, "nvml_module", lambda: None)
    assert telemetry.sample_host()["gpus"] == []


# ---------------------------------------------------------------- the catalogue


def test_system_metrics_are_catalogued_and_never_a_key_metric() -> None:
    system = [m for m in mc.METRICS.values() if m.group == "system"]
    assert {m.key for m in system} == {
        "gpu_util", "gpu_mem_gb", "gpu_temp_c", "gpu_power_w", "cpu_percent", "rss_gb",
    }  # fmt: skip
    for m in system:
        assert m.unit and m.label and m.direction is None and m.series == "time", m
        assert mc.is_system(m.key)
    assert not mc.is_system("val_loss") and not mc.is_system("some_new_key")
    assert not set(mc.ranked_metrics(["classification", "regression"])) & {m.key for m in system}
    assert not {k for keys in mc.KEY_METRIC_KEYS.values() for k in keys} & {m.key for m in system}
    assert mc.key_metric("train", {"cpu_percent": 50.0, "gpu_util": 99.0}) is None
    charts = {c["id"]: c for c in mc.catalog_json()["charts"]}
    assert charts["cpu"]["series"] == "time" and charts["gpu-util"]["keys"] == ["gpu_util"]
    from server.web.compare import default_metric

    assert default_metric(["cpu_percent", "rss_gb"]) is None
    assert default_metric(["cpu_percent", "lr"]) == "lr"


# ---------------------------------------------------------------- out of memory


def test_cuda_oom_reports_the_gpus_memory_at_the_time() -> None:
    exc = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0")
    memory = GpuMemory(used_bytes=int(139.6 * GIB), total_bytes=int(140 * GIB),
                       job_bytes=int(120.25 * GIB))  # fmt: skip
    failure = classify(exc, "cuda:0 (NVIDIA H200)", memory)
    assert failure.error_type == CUDA_OOM and not failure.retriable
    assert failure.reason == (
        "CUDA out of memory on cuda:0 (NVIDIA H200), 139.6 of 140.0 GiB in use "
        "(120.2 GiB by this job): Tried to allocate 2.00 GiB. GPU 0"
    )
    no_job = GpuMemory(used_bytes=GIB, total_bytes=2 * GIB).describe()
    assert no_job == "1.0 of 2.0 GiB in use"
    # Without figures (a CPU device, CUDA unable to answer): the message as before.
    assert classify(exc, "cpu").reason == (
        "CUDA out of memory on cpu: Tried to allocate 2.00 GiB. GPU 0"
    )


def test_gpu_memory_is_none_without_a_gpu() -> None:
    assert gpu_memory(torch.device("cpu")) is None
    if not torch.cuda.is_available():
        assert gpu_memory(torch.device("cuda:0")) is None  # guarded: no CUDA here


# ---------------------------------------------------------------- the registry and the page


@pytest.fixture
def rc(redis_url: str) -> redis.Redis:
    client = redis_client(redis_url)
    yield client
    client.close()


def slot_info(name: str, node: str = "n@gpu-01") -> SlotInfo:
    host, _, pid = name.partition(":")
    return SlotInfo(name=name, node=node, host=host, pid=int(pid), queues=("gpu",),
                    node_slots=2, gpu_names=("NVIDIA H200", "NVIDIA A100"),
                    device="cuda:0")  # fmt: skip


def sample_of(gpu_refs: list[Ref], at: float, cpu: float = 42.0) -> dict[str, Any]:
    return {
        "host": {
            "cpu_percent": cpu,
            "cpus": 16,
            "mem_used_bytes": 20e9,
            "mem_total_bytes": 64e9,
        },  # fmt: skip
        "slot": {"cpu_percent": 101.5, "rss_bytes": 1_500_000_000},
        "gpus": [g.to_json() for g in sample_gpus(NVML, gpu_refs)],
        "at": at,
    }


def test_the_registry_keeps_each_slots_latest_sample(rc: redis.Redis) -> None:
    register(rc, slot_info("gpu-01:1"), telemetry={"slot": {"cpu_percent": 5}})
    register(rc, slot_info("gpu-01:2"))
    rc.hset(slot_key("gpu-01:2"), "telemetry", "{not json")
    first, second = online_slots(rc)
    assert first.telemetry == {"slot": {"cpu_percent": 5}}
    assert second.telemetry is None  # a broken sample costs the figures, not the slot


def test_a_failing_sampler_never_stops_the_heartbeat(
    rc: redis.Redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("no psutil today")

    beat = SlotHeartbeat(redis_url, slot_info("gpu-01:3"), telemetry=broken)
    assert beat.beat() and beat.beat()
    (slot,) = online_slots(rc)
    assert slot.name == "gpu-01:3" and slot.telemetry is None
    assert len([r for r in caplog.records if "cannot sample telemetry" in r.message]) == 1


def test_workers_api_and_page_show_host_figures_and_one_bar_per_gpu(
    app: Flask, users: Users, db_url: str, rc: redis.Redis
) -> None:
    now = time.time()
    register(rc, slot_info("gpu-01:1"), telemetry=sample_of([Ref(0, "GPU-aaa")], now - 3, 10))
    register(rc, slot_info("gpu-01:2"), telemetry=sample_of([Ref(1, "GPU-bbb")], now, 55))
    register(rc, SlotInfo(name="cpu-01:7", node="n@cpu-01", host="cpu-01", pid=7,
                          queues=("cpu",), node_slots=1))  # fmt: skip

    resp = as_user(app, users.alice).get("/api/v1/workers")
    assert resp.status_code == 200
    cpu_node, gpu_node = resp.get_json()["nodes"]  # by node name
    assert gpu_node["host_stats"] == {"cpu_percent": 55.0, "cpus": 16.0,
                                      "mem_used_bytes": 20e9, "mem_total_bytes": 64e9}  # fmt: skip
    assert [(g["index"], g["slot"], g["util_percent"]) for g in gpu_node["gpu_stats"]] == [
        (0, "gpu-01:1", 87.0), (1, "gpu-01:2", 13.0),
    ]  # fmt: skip
    assert gpu_node["workers"][0]["cpu_percent"] == 101.5
    assert gpu_node["workers"][0]["rss_bytes"] == 1_500_000_000
    assert cpu_node["host_stats"] is None and cpu_node["gpu_stats"] == []
    assert cpu_node["workers"][0]["cpu_percent"] is None

    html = session_client(app, db_url, users.alice).get("/workers").get_data(as_text=True)
    assert html.count('class="gpu-bar"') == 2
    assert 'data-gpu="0"' in html and 'value="87.0"' in html and "NVIDIA H200" in html
    assert "memory 75.2 / 151.4 GB · 64 °C · 452 W" in html  # GB are 10^9 bytes
    assert "memory 10.7 / 85.9 GB · 71 °C</span>" in html  # no power reading: no watts
    assert '<strong class="host-cpu">55%</strong> of 16 cores' in html
    assert '<td data-label="CPU" class="num slot-cpu">102%</td>' in html
    assert '<td data-label="Memory" class="num slot-rss">1.5 GB</td>' in html
    assert "No sample yet" in html  # the CPU node without telemetry
    assert " style=" not in html


# ---------------------------------------------------------------- a real worker


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"telemetry_seconds": 1.0})


@SQLITE_ONLY
@pytest.mark.integration
def test_a_real_cpu_worker_samples_cpu_and_memory_and_no_gpu(
    app: Flask, users: Users, start_worker: Any
) -> None:
    worker = start_worker("cpu")
    client = as_user(app, users.alice)

    def get_json(path: str) -> dict[str, Any]:
        resp = client.get(path)
        assert resp.status_code == 200, resp.get_data(as_text=True)
        return resp.get_json()

    # Far longer than the test needs: it is cancelled once it has a few samples.
    resp = client.post("/api/v1/jobs", json=train_spec(epochs=300))
    assert resp.status_code == 201, resp.get_data(as_text=True)
    job_id = resp.get_json()["id"]
    wait_for_state(get_json, job_id, {"running", "failed"}, timeout=60)

    series: dict[str, Any] = {}
    node: dict[str, Any] = {}
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        series = get_json(f"/api/v1/jobs/{job_id}/metrics")["series"]
        nodes = get_json("/api/v1/workers")["nodes"]
        node = nodes[0] if nodes else {}
        sampled = node.get("host_stats") and node["workers"][0]["rss_bytes"]
        if len(series.get("rss_gb", {}).get("value", ())) >= 3 and sampled:
            break
        time.sleep(0.3)
    assert client.post(f"/api/v1/jobs/{job_id}/cancel").status_code in (200, 202)
    job = wait_for_state(get_json, job_id, {"succeeded", "failed", "cancelled"}, timeout=60)
    assert job["state"] == "cancelled", (job, worker.log_tail())

    # The workers API showed the running slot's sample: CPU and memory, no GPU.
    assert node.get("host_stats"), node
    assert node["gpu_stats"] == [] and node["gpus"] == 0
    assert node["host_stats"]["mem_total_bytes"] == psutil.virtual_memory().total
    assert 50e6 < node["workers"][0]["rss_bytes"] < psutil.virtual_memory().total
    assert node["workers"][0]["cpu_percent"] is not None

    # The job's metrics: CPU % and resident memory over its running time, no gpu_* key.
    assert not [k for k in series if k.startswith("gpu_")], list(series)
    cpu, rss = series["cpu_percent"], series["rss_gb"]
    assert len(rss["value"]) >= 3 and len(cpu["value"]) >= 3, series
    # Steps are seconds of running time: growing, one per sample at least.
    assert cpu["step"] == sorted(set(cpu["step"])) and cpu["step"][0] >= 1
    cores = psutil.cpu_count() or 1
    assert all(0 <= v <= 100 * cores + 50 for v in cpu["value"]), cpu["value"]
    assert max(cpu["value"]) > 1  # it trained: some CPU was used
    assert all(0.05 < v < psutil.virtual_memory().total / 1e9 for v in rss["value"]), rss

    worker.stop()
    log = worker.log_path.read_text(errors="replace")
    assert "NVML" not in log and "nvml" not in log and "telemetry" not in log.lower(), log[-3000:]
