"""One job per GPU, pinned (worker/slots.py, worker/gpu_inventory.py).

No GPU here: the layout is planned from GPUs the test describes, the locks are real
fcntl locks held by real processes, and one real `celery worker` runs "as if" it had
GPUs 0 and 1 (`--gpus 0,1` on a host without NVML). bench/gpu_check.py covers what
needs a real GPU.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from shared.db import transaction
from shared.orm import Job, JobEvent
from shared.settings import Settings, parse_gpu_selection
from shared.state_machine import claim_job
from tests.conftest import REPO, WorkerProcess, wait_for_state, worker_zygote
from tests.helpers import train_spec
from tests.test_authorization import session_client
from worker import slots
from worker.gpu_inventory import Gpu, list_gpus
from worker.slots import Slot, SlotError, plan_gpu_slots

GiB = 1 << 30
FOUR = [Gpu(i, f"GPU-{i:04d}", "NVIDIA H200", 141 * GiB) for i in range(4)]
TINY_MLP = {"name": "mlp", "params": {"hidden": 32, "layers": 1}}


# ------------------------------------------------------------------- the layout


def test_a_four_gpu_host_splits_into_slots() -> None:
    one = plan_gpu_slots("all", 1, FOUR)
    assert [s.cuda_visible_devices for s in one] == ["0", "1", "2", "3"]
    assert [s.index for s in one] == [0, 1, 2, 3]
    two = plan_gpu_slots("all", 2, FOUR)
    assert [s.cuda_visible_devices for s in two] == ["0,1", "2,3"]
    assert two[1].gpus == (FOUR[2], FOUR[3])
    # In the order given: the operator decides which GPUs pair up.
    assert [s.cuda_visible_devices for s in plan_gpu_slots("3,1", 1, FOUR)] == ["3", "1"]
    assert plan_gpu_slots("none", 1, FOUR) == ()
    assert plan_gpu_slots("all", 1, []) == ()  # a CPU host


def test_bad_layouts_are_refused_with_the_reason(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(SlotError, match=r"no GPU 7 on this host \(NVML lists 0, 1, 2, 3\)"):
        plan_gpu_slots("0,7", 1, FOUR)
    with pytest.raises(SlotError, match="--gpus-per-slot 4 needs at least 4 GPUs"):
        plan_gpu_slots("0,1", 4, FOUR)
    with caplog.at_level(logging.WARNING, logger="worker.slots"):
        three = plan_gpu_slots("0,1,2", 2, FOUR)
    assert [s.cuda_visible_devices for s in three] == ["0,1"]
    assert "GPU 2 stays idle" in caplog.text
    for bad in ("0,0", "x", "", "1,,2", "-1"):
        with pytest.raises(ValueError):
            parse_gpu_selection(bad)
    with pytest.raises(ValueError, match="TRAINYARD_WORKER_GPUS|worker_gpus"):
        Settings(worker_gpus="0,0")
    assert Settings(worker_gpus=" 2, 0 ").worker_gpus == "2,0"


def test_named_gpus_without_nvml_are_trusted_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="worker.slots"):
        layout = plan_gpu_slots("0,1", 1, [])
    assert [s.gpus for s in layout] == [
        (Gpu(0, None, None, None),),
        (Gpu(1, None, None, None),),
    ]
    assert "NVML lists no GPU" in caplog.text


def test_no_nvml_means_no_gpus_and_no_log_noise(caplog: pytest.LogCaptureFixture) -> None:
    # This machine has nvidia-ml-py but no driver: exactly a CPU worker host.
    with caplog.at_level(logging.DEBUG - 1):
        assert list_gpus() == []
    assert [r for r in caplog.records if r.levelno >= logging.INFO] == []


def test_placement_names_host_slot_and_gpus() -> None:
    slot = Slot(1, (FOUR[2], FOUR[3]))
    placement = slots.placement(slot)
    assert placement["slot"] == 1 and placement["host"]
    assert placement["gpus"] == [
        {"index": 2, "uuid": "GPU-0002", "name": "NVIDIA H200", "memory_total_bytes": 141 * GiB},
        {"index": 3, "uuid": "GPU-0003", "name": "NVIDIA H200", "memory_total_bytes": 141 * GiB},
    ]
    assert slots.placement(None)["gpus"] == []


def test_the_claim_writes_the_placement_in_its_own_update(db_url: str, users) -> None:  # type: ignore[no-untyped-def]
    from tests.job_rows import add_jobs

    [job_id] = add_jobs(db_url, [{"owner": users.alice.id, "state": "queued"}])
    placement = slots.placement(Slot(0, (FOUR[1],)))
    with transaction(db_url) as s:
        assert claim_job(s, job_id, "h:1", 30, placement=placement) is not None
    with transaction(db_url) as s:
        assert s.get(Job, job_id).placement == placement


# ------------------------------------------------------- locks held by processes

HOLDER = textwrap.dedent(
    """
    import sys, time
    from shared.settings import Settings
    from worker import slots
    settings = Settings(home=sys.argv[1], worker_gpus=sys.argv[2])
    slots.configure(settings) if sys.argv[3] == "configure" else None
    if sys.argv[3] == "take":
        slots._state["layout"] = slots.Layout(
            slots.plan_gpu_slots(settings.worker_gpus, 1), True,
            slots.lock_dir_for(settings), "test",
        )
        slot = slots.take_slot(wait_s=float(sys.argv[4]))
        import os
        print(slot.cuda_visible_devices if slot else "none", os.environ.get("CUDA_VISIBLE_DEVICES"), flush=True)
    else:
        print("configured", flush=True)
    time.sleep(600)
    """
)


def _holder(home: Path, gpus: str, mode: str, wait_s: float = 0) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(home), gpus, mode, str(wait_s)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _first_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line:
        proc.wait(10)
        raise AssertionError(proc.stderr.read() if proc.stderr else "no output")
    return line


def test_each_process_takes_its_own_slot_and_a_killed_ones_is_taken_again(
    tmp_path: Path,
) -> None:
    procs: list[subprocess.Popen[str]] = []
    try:
        first = _holder(tmp_path, "0,1", "take")
        procs.append(first)
        assert _first_line(first) == "0 0"  # pinned: CUDA_VISIBLE_DEVICES=0
        second = _holder(tmp_path, "0,1", "take")
        procs.append(second)
        assert _first_line(second) == "1 1"
        third = _holder(tmp_path, "0,1", "take", wait_s=0.5)
        procs.append(third)
        assert _first_line(third) == "none None"  # both held: no GPU shared
        # SIGKILL: no cleanup code runs; the kernel drops the dead process's locks.
        first.kill()
        first.wait()
        fourth = _holder(tmp_path, "0,1", "take", wait_s=10)
        procs.append(fourth)
        assert _first_line(fourth) == "0 0"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_a_second_worker_on_the_same_gpus_refuses_to_start(tmp_path: Path) -> None:
    holder = _holder(tmp_path, "1", "take")
    try:
        assert _first_line(holder) == "1 1"
        settings = Settings(home=tmp_path, worker_gpus="0,1")
        with pytest.raises(SlotError, match="GPU 1 is in use by another Trainyard worker"):
            slots.configure(settings)
        assert slots.configure(Settings(home=tmp_path, worker_gpus="0")).gpu
    finally:
        holder.kill()
        holder.wait()
        slots._state.update(layout=None, slot=None, fds=[])


# ------------------------------------------- a real worker "as if" it had GPUs 0, 1

_CLAIMED = re.compile(r"\(slot (\d+) \(GPU ([\d,]+)\), CUDA_VISIBLE_DEVICES=([\d,]+)\)")


def _seen(settings: Settings, job_id: int) -> list[tuple[int, str]]:
    """(attempt, CUDA_VISIBLE_DEVICES) for each attempt, as the job's own process logged it."""
    from shared.job_files import log_path

    path = log_path(settings, job_id)
    # "running" is written at claim time, a moment before the job's first log line.
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        match = _CLAIMED.search(line)
        if match and "claimed by" in line:
            attempt = int(re.search(r"\[attempt (\d+)\]", line).group(1))  # type: ignore[union-attr]
            assert match.group(2) == match.group(3), line  # the slot's GPUs are what CUDA sees
            found.append((attempt, match.group(3)))
    return found


def _intervals(
    url: str, seen: dict[int, list[tuple[int, str]]]
) -> list[tuple[str, int, datetime, datetime | None]]:
    """(devices, job, claimed at, ended at) for every attempt: from the timeline."""
    out = []
    with transaction(url) as s:
        for job_id, attempts in seen.items():
            events = s.scalars(
                select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
            ).all()
            for attempt, devices in attempts:
                mine = [e for e in events if e.attempt == attempt]
                start = next(e.at for e in mine if e.kind == "claimed")
                ends = [
                    e.at for e in mine if e.kind not in ("claimed", "resumed", "cancel_requested")
                ]
                out.append((devices, job_id, start, ends[0] if ends else None))
    return out


def _assert_never_shared(intervals: list[tuple[str, int, datetime, datetime | None]]) -> None:
    for i, (dev_a, job_a, start_a, end_a) in enumerate(intervals):
        for dev_b, job_b, start_b, end_b in intervals[i + 1 :]:
            if dev_a != dev_b:
                continue
            overlap = start_a < (end_b or datetime.max) and start_b < (end_a or datetime.max)
            assert not overlap, f"jobs {job_a} and {job_b} both ran on GPU {dev_a} at once"


@pytest.mark.integration
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_worker_with_gpus_0_1_never_puts_two_jobs_on_one_device_set(
    client, settings: Settings, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Four-plus jobs through one worker with two 1-GPU slots: every job's process saw
    CUDA_VISIBLE_DEVICES of its slot, no two ran on one set at once, and a set is
    free again after its job finished, failed, was cancelled, had its process
    SIGKILLed, or was handed back (SIGTERM of the worker)."""
    url = settings.resolved_database_url
    pinned = settings.model_copy(update={"worker_gpus": "0,1"})
    workers: list[WorkerProcess] = []

    def start() -> WorkerProcess:
        # The cpu queue and CPU jobs: the slots pin whatever their children run, and
        # jobs asking for GPUs would (rightly) refuse to train on this GPU-less host.
        worker = WorkerProcess(pinned, tmp_path / f"worker-{len(workers)}.log", "cpu", 2)
        workers.append(worker)
        worker.wait_ready()
        return worker

    def get(path: str) -> dict[str, Any]:
        return client.get(path).get_json()

    def submit(spec: dict[str, Any]) -> int:
        resp = client.post("/api/v1/jobs", json=spec)
        assert resp.status_code == 201, resp.get_json()
        return resp.get_json()["id"]

    def running(job_id: int) -> dict[str, Any]:
        return wait_for_state(get, job_id, {"running"}, timeout=120)

    def until(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out: {what}\n{workers[-1].log_tail()}"
            time.sleep(0.1)

    long_spec = train_spec(model=TINY_MLP, epochs=400)
    short_spec = train_spec(model=TINY_MLP, epochs=2)
    ended = {"succeeded", "failed", "cancelled"}
    try:
        worker = start()
        assert "GPU slot(s): slot 0 (GPU 0); slot 1 (GPU 1)" in worker.log_tail(100_000)
        a, b = submit(long_spec), submit(long_spec)
        c = submit(short_spec)
        # Fails: past its time limit (a failure of the job itself, like any other).
        d = submit(train_spec(model=TINY_MLP, epochs=400, max_runtime_s=2))
        running(a), running(b)
        until(lambda: len(_seen(settings, a)) == 1 and len(_seen(settings, b)) == 1, "logs")
        a_set, b_set = _seen(settings, a)[0][1], _seen(settings, b)[0][1]
        assert {a_set, b_set} == {"0", "1"}
        placement = get(f"/api/v1/jobs/{a}")["placement"]
        assert placement["gpus"] == [
            {"index": int(a_set), "uuid": None, "name": None, "memory_total_bytes": None}
        ]
        assert placement["slot"] == int(a_set) and placement["host"]
        assert get(f"/api/v1/jobs/{c}")["state"] == "queued"  # both slots busy

        # Cancel: a's set goes to the next job (c), which finishes; then d fails on it.
        assert client.post(f"/api/v1/jobs/{a}/cancel").status_code == 200
        assert wait_for_state(get, a, ended)["state"] == "cancelled"
        assert wait_for_state(get, c, ended)["state"] == "succeeded"
        assert wait_for_state(get, d, ended)["state"] == "failed"
        assert _seen(settings, c)[0][1] == a_set and _seen(settings, d)[0][1] == a_set
        # After a failure: the set is free again for the next job.
        e = submit(long_spec)
        running(e)
        until(lambda: bool(_seen(settings, e)), "e's log")
        assert _seen(settings, e)[0][1] == a_set
        # A pool child SIGKILLed mid-job: its replacement takes the freed set.
        with transaction(url) as s:
            e_pid = int(s.get(Job, e).worker.rpartition(":")[2])
        os.kill(e_pid, signal.SIGKILL)
        assert wait_for_state(get, e, ended)["state"] == "failed"
        f = submit(short_spec)
        assert wait_for_state(get, f, ended)["state"] == "succeeded"
        assert _seen(settings, f)[0][1] == a_set
        with transaction(url) as s:
            assert s.get(Job, f).worker != s.get(Job, e).worker  # a new child, same GPU

        # Hand-back: SIGTERM the worker; b is requeued, and a new worker on the same
        # GPUs (the first one's slots are free once it is gone) resumes it.
        assert get(f"/api/v1/jobs/{b}")["state"] == "running"
        os.kill(worker.proc.pid, signal.SIGTERM)
        until(lambda: get(f"/api/v1/jobs/{b}")["state"] == "queued", "b handed back")
        assert worker.proc.wait(30) == 0, worker.log_tail()
        start()
        until(lambda: len(_seen(settings, b)) == 2, "b resumed")
        assert get(f"/api/v1/jobs/{b}")["attempt"] == 2
        assert client.post(f"/api/v1/jobs/{b}/cancel").status_code == 200
        assert wait_for_state(get, b, ended)["state"] == "cancelled"

        seen = {job: _seen(settings, job) for job in (a, b, c, d, e, f)}
        assert all(seen.values())
        intervals = _intervals(url, seen)
        _assert_never_shared(intervals)
        # It did run two jobs at once (on different sets): a and b overlapped.
        assert {dev for dev, job, *_ in intervals if job in (a, b)} == {"0", "1"}
    finally:
        for worker in workers:
            worker.stop()


@pytest.mark.integration
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_more_jobs_at_once_than_gpu_slots_is_refused(settings: Settings, tmp_path: Path) -> None:
    pinned = settings.model_copy(update={"worker_gpus": "0"})
    worker = WorkerProcess(pinned, tmp_path / "worker.log", "cpu", 2)
    try:
        with pytest.raises(RuntimeError, match="exited early"):
            worker.wait_ready()
        assert "--concurrency 2 is more than the 1 GPU slot(s)" in worker.log_tail()
    finally:
        worker.stop()


# ------------------------------------------------------------ bench/gpu_check.py


def _gpu_check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), *args],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip


def test_the_gpu_check_says_there_is_no_gpu_and_exits_0() -> None:
    if list_gpus():
        pytest.skip("this host has GPUs: the check would run for real")
    proc = _gpu_check("--smoke")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no GPU found" in proc.stdout and proc.stderr == ""


@pytest.mark.integration
def test_the_gpu_check_runs_end_to_end_on_a_worker_as_if_it_had_two_gpus(
    tmp_path: Path,
) -> None:
    """Its own Redis, database and real worker; CPU jobs stand in for GPU ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINYARD_")}
    zygote = worker_zygote()
    if zygote is not None:  # its workers fork from it (bench/benchlib.py, spawn_python)
        env["TRAINYARD_TEST_ZYGOTE_SOCKET"] = zygote.socket_path
    out = tmp_path / "summary.json"
    proc = _gpu_check(
        "--smoke", "--as-if-gpus", "0,1", "--out", str(out), env={**env, "TMPDIR": str(tmp_path)}
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "all checks passed" in proc.stdout
    import json

    summary = json.loads(out.read_text())
    placed = {
        label: [g["index"] for g in job["placement"]["gpus"]]
        for label, job in summary["jobs"].items()
    }
    assert set(placed) == {"1-gpu-a", "1-gpu-b", "bf16", "script"}
    assert all(len(gpus) == 1 and gpus[0] in (0, 1) for gpus in placed.values()), placed
    # The script job ran its own code on the slot (the GPU checks need real GPUs).
    script = summary["jobs"]["script"]
    assert script["state"] == "succeeded" and script["metrics"]["device"] == "cpu", script


# ----------------------------------------------- where it ran: API, job page, workers


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_api_and_the_job_page_show_the_placement(app, users, db_url: str) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import as_user
    from tests.job_rows import add_jobs

    placement = slots.placement(Slot(1, (FOUR[1],)))
    ran, waiting = add_jobs(
        db_url,
        [
            {"owner": users.alice.id, "state": "running", "placement": placement},
            {"owner": users.alice.id, "state": "queued"},
        ],
    )
    client = as_user(app, users.alice)
    assert client.get(f"/api/v1/jobs/{ran}").get_json()["placement"] == placement
    assert client.get(f"/api/v1/jobs/{waiting}").get_json()["placement"] is None
    browser = session_client(app, db_url, users.alice)
    page = browser.get(f"/jobs/{ran}").get_data(as_text=True)
    assert 'id="job-placement">slot 1 · GPU 1 (NVIDIA H200, 141 GiB)</dd>' in page
    page = browser.get(f"/jobs/{waiting}").get_data(as_text=True)
    assert 'id="job-placement">—</dd>' in page


def test_the_workers_api_lists_each_slots_gpus_and_the_nodes_all(
    app, users, redis_url: str, db_url: str
) -> None:  # type: ignore[no-untyped-def]
    from shared.broker import redis_client
    from shared.worker_registry import SlotInfo, register
    from tests.conftest import as_user

    client = redis_client(redis_url)
    try:
        for pid, gpu in ((11, FOUR[2]), (12, FOUR[0])):
            register(client, SlotInfo(
                name=f"gpu-01:{pid}", node="w@gpu-01", host="gpu-01", pid=pid,
                queues=("gpu",), node_slots=2, gpu_names=(gpu.name,), device="cuda:0",
                slot=pid - 11, gpus=(gpu.to_json(),),
            ))  # fmt: skip
        body = as_user(app, users.alice).get("/api/v1/workers").get_json()
    finally:
        client.close()
    (node,) = body["nodes"]
    # Each pinned slot sees one GPU; the node has both.
    assert (node["gpus"], node["gpu_names"]) == (2, ["NVIDIA H200", "NVIDIA H200"])
    workers = {w["name"]: w for w in node["workers"]}
    assert workers["gpu-01:11"]["slot"] == 0
    assert workers["gpu-01:11"]["gpus"] == [FOUR[2].to_json()]
    page = session_client(app, db_url, users.alice).get("/workers").get_data(as_text=True)
    assert "cuda:0 (GPU 2)" in page and "cuda:0 (GPU 0)" in page


PARENT = textwrap.dedent(
    """
    import torch, torch.cuda
    touched = []
    def spy(name):
        def touch(*args, **kwargs):
            touched.append(name)
            raise AssertionError("the worker's main process touched torch.cuda." + name)
        return touch
    for name in ("_lazy_init", "init", "is_available", "device_count", "current_device",
                 "get_device_name", "set_device", "mem_get_info"):
        setattr(torch.cuda, name, spy(name))
    import worker.celery_worker as cw
    cw._init_main(sender="t@host", options={"concurrency": 2})
    print("slots", [s.describe() for s in cw.slots.layout().slots], "touched", touched)
    """
)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_worker_main_process_never_touches_cuda(settings: Settings) -> None:
    """CUDA initialized in the forking parent breaks every child: the main process plans
    the slots through NVML alone, before the pool forks."""
    from tests.conftest import settings_env

    env = {**settings_env(settings), "TRAINYARD_WORKER_GPUS": "0,1"}
    proc = subprocess.run(
        [sys.executable, "-c", PARENT], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "slots ['slot 0 (GPU 0)', 'slot 1 (GPU 1)'] touched []" in proc.stdout


def test_a_child_without_a_free_slot_puts_the_job_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never run a job without a slot: it could land on another job's GPU."""
    from celery import Celery
    from celery.exceptions import Reject

    from shared.celery_app import TRAIN_TASK
    from worker import tasks

    # take_slot pins this process; monkeypatch puts the variables back afterwards.
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    holder = _holder(tmp_path, "0", "take")
    try:
        assert _first_line(holder) == "0 0"
        settings = Settings(home=tmp_path, worker_gpus="0")
        slots._state["layout"] = slots.Layout(
            plan_gpu_slots("0", 1), True, slots.lock_dir_for(settings), "test"
        )
        monkeypatch.setattr(tasks, "SLOT_WAIT_S", 0.2)
        app = Celery("test", set_as_current=False)
        tasks.register_tasks(app, settings)
        result = app.tasks[TRAIN_TASK].apply(args=[1])
        assert isinstance(result.result, Reject) and result.result.requeue
        assert slots.current_slot() is None
        holder.kill()
        holder.wait()
        assert slots.take_slot(wait_s=10) == Slot(0, (Gpu(0, None, None, None),))
    finally:
        holder.kill()
        holder.wait()
        slots.release_slot()
        slots._state.update(layout=None, slot=None, fds=[])
