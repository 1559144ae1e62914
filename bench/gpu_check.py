"""GPU check: a real worker started with `--gpus all` on a machine with NVIDIA GPUs.

Not a benchmark of the CPU suite (bench/benchlib.py leaves it out of `make bench`); it is
run by hand, or on a lent GPU machine, whenever one is available. It:

1. lists the GPUs through NVML (worker/gpu_inventory.py), as the worker will;
2. starts a private Redis, a SQLite database and a real `trainyard worker --gpus all`
   (one job slot per GPU, worker/slots.py);
3. submits two 1-GPU jobs at once (they run side by side when the host has two GPUs,
   one after the other on a one-GPU host), a bf16 autocast job (`precision: bf16`), and,
   on a host with two GPUs or more, a 2-GPU data-parallel job on a worker of its own
   with `--gpus-per-slot 2`: beside the others where the host has 4 GPUs and 2-GPU jobs
   have a queue of their own, else after them;
4. prints, from each job's placement (jobs.placement), which GPUs it ran on, its
   samples/s, and its GPU utilization from the telemetry metrics (`gpu_util`) where the
   worker records them; then checks that no two jobs that ran at the same time shared a
   GPU, that every job succeeded, and that the bf16 job learned (finite loss, accuracy
   well above chance);
5. runs a script job (a team's own code, worker/script_job.py) asking for one GPU and
   checks, from what the script itself reports, that it trained on CUDA seeing exactly
   one GPU, the slot's (CUDA_VISIBLE_DEVICES handed down by the runner).
Exit 0 when every check passed, 1 otherwise.

    python bench/gpu_check.py [--epochs 5] [--out summary.json] [--redis-url URL]
    python bench/gpu_check.py --smoke     # 1 epoch; on a host without GPUs: says so, exit 0

Needs: the worker's dependencies (torch, numpy, scikit-learn, nvidia-ml-py, Celery, ...)
and a `redis-server` on PATH (or `--redis-server PATH`, or `--redis-url` of a running
one). On a bare GPU machine that has only torch and the scientific stack,
bench/gpu_check_bundle.sh gathers the rest beforehand, on a machine with pip and apt:
it downloads the missing wheels and a redis-server into `.gpucheck/` and prints the one
command to run on the GPU machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FINAL = {"succeeded", "failed", "cancelled"}
# Digits has 10 classes: chance is 0.1. A model that learned anything is far above it
# (after the one epoch of --smoke, less far).
LEARNED_ACCURACY = 0.5
LEARNED_ACCURACY_SMOKE = 0.2


def _job_spec(name: str, epochs: int, gpus: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "train",
        "name": name,
        "tags": ["gpu-check"],
        "dataset": {"name": "digits"},
        "model": {"name": "cnn", "params": {"dropout": 0.25}},
        "optimizer": {"name": "adam", "lr": 0.003},
        "epochs": epochs,
        "batch_size": 64,
        "seed": 0,
        "resources": {"gpus": gpus},
        **extra,
    }


# The script job's code: trains a few steps on the device the runner hands it and says
# what it saw.
GPU_SCRIPT = b"""
import os
import torch
from worker import sdk

device = torch.device(sdk.device)
x = torch.randn(256, 64, device=device)
w = torch.randn(64, 10, device=device, requires_grad=True)
opt = torch.optim.SGD([w], lr=0.1)
for step in range(20):
    loss = (x @ w).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sdk.log("train_loss", loss.item(), step=step)
sdk.finish({
    "device": sdk.device,
    "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
    "train_loss": loss.item(),
})
"""


def _script_bundle() -> bytes:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("train.py")
        info.size = len(GPU_SCRIPT)
        tar.addfile(info, io.BytesIO(GPU_SCRIPT))
    return buffer.getvalue()


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="1 epoch; no GPU here: say so, exit 0")
    p.add_argument("--epochs", type=int, default=None, help="epochs per job (default 5)")
    p.add_argument("--timeout", type=float, default=420.0, help="seconds for all jobs")
    p.add_argument("--redis-url", default=None, help="use this Redis instead of starting one")
    p.add_argument("--redis-server", default=None, help="the redis-server binary to start")
    p.add_argument("--out", type=Path, default=None, help="write the summary here as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temporary home (logs)")
    p.add_argument(
        "--as-if-gpus",
        metavar="0,1",
        default=None,
        help="check this script itself on a host without GPUs: the worker runs with "
        "--gpus 0,1 as if it had them, and the jobs are CPU jobs (no CUDA here)",
    )
    return p.parse_args()


def _say(text: str = "") -> None:
    print(text, flush=True)


class Check:
    def __init__(self) -> None:
        self.failed: list[str] = []

    def __call__(self, ok: bool, what: str) -> bool:
        _say(f"  [{'PASS' if ok else 'FAIL'}] {what}")
        if not ok:
            self.failed.append(what)
        return ok


def _multi_gpu_routing() -> tuple[str | None, bool]:
    """(the queue of a 2-GPU job, whether it differs from a 1-GPU job's); (None, False)
    when 2-GPU jobs are not accepted. Only with a route of their own can a 2-GPU job run
    beside 1-GPU ones: otherwise a 1-GPU slot could take it (and refuse it)."""
    from shared.spec import parse_spec

    try:
        spec = parse_spec(_job_spec("probe", 1, gpus=2))
    except Exception:  # noqa: BLE001 - 2-GPU jobs not accepted at all
        return None, False
    one = parse_spec(_job_spec("probe", 1, gpus=1))
    return spec.queue, spec.queue != one.queue


class Worker:
    """A real `trainyard worker` (the CLI execs Celery), in a session of its own."""

    def __init__(self, env: dict[str, str], log: Path, queues: str, *gpu_args: str) -> None:
        import benchlib  # bench/, beside this file

        self.log = log
        args = ["worker", "-Q", queues, *gpu_args, "-n", f"gpucheck-{os.getpid()}-{log.stem}@%h"]
        self.proc = benchlib.spawn_python("server.cli", args, env, log)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the worker exited early:\n{self.tail()}")
            if b" ready." in self.log.read_bytes():
                return
            time.sleep(0.2)
        raise SystemExit(f"the worker was not ready in {timeout:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 3000) -> str:
        return self.log.read_bytes()[-n:].decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _gpu_util(url: str, job_id: int) -> float | None:
    """Mean of the job's `gpu_util` telemetry points (worker/telemetry.py), if any."""
    from sqlalchemy import func, select

    from shared.db import transaction
    from shared.orm import MetricPoint

    with transaction(url) as s:
        mean = s.execute(
            select(func.avg(MetricPoint.value)).where(
                MetricPoint.job_id == job_id, MetricPoint.key == "gpu_util"
            )
        ).scalar()
    return None if mean is None else float(mean)


def _describe_gpus(placement: dict[str, Any] | None) -> str:
    if not placement or not placement.get("gpus"):
        return "no GPU (placement: " + json.dumps(placement) + ")"
    return ", ".join(
        f"GPU {g['index']} {g.get('name') or '?'} {(g.get('uuid') or '?')[:12]}"
        for g in placement["gpus"]
    )


def _overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["started"] < b["finished"] and b["started"] < a["finished"]


def main() -> int:
    args = _parse()
    epochs = args.epochs or (1 if args.smoke else 5)
    from worker.gpu_inventory import Gpu, list_gpus

    as_if = args.as_if_gpus
    gpus = [Gpu(int(i), None, None, None) for i in as_if.split(",")] if as_if else list_gpus()
    job_gpus = 0 if as_if else 1
    if not gpus:
        _say("gpu_check: no GPU found (NVML lists none on this host): nothing to check here.")
        _say("Run it on a machine with NVIDIA GPUs and their driver.")
        return 0
    _say(f"gpu_check: {len(gpus)} GPU(s) {'as if (--as-if-gpus)' if as_if else 'by NVML'}:")
    for gpu in gpus:
        memory = (gpu.memory_total_bytes or 0) / (1 << 30)
        _say(f"  GPU {gpu.index}: {gpu.name}, {memory:.0f} GiB, {gpu.uuid}")

    from shared import accounts
    from shared.db import transaction
    from shared.migrate import upgrade_database

    home = Path(tempfile.mkdtemp(prefix="trainyard-gpucheck-"))
    redis = None
    workers: list[Worker] = []
    check = Check()
    summary: dict[str, Any] = {"gpus": [g.to_json() for g in gpus], "jobs": {}}
    try:
        url = f"sqlite:///{home / 'trainyard.db'}"
        redis_url = args.redis_url
        if redis_url is None:
            from server.cli.local.embedded_redis import LocalRedis

            binary = args.redis_server or shutil.which("redis-server")
            redis = LocalRedis(home / "redis", binary=binary).start()
            redis_url = redis.url
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINYARD_")}
        env.update(
            TRAINYARD_HOME=str(home), TRAINYARD_DATABASE_URL=url,
            TRAINYARD_REDIS_URL=redis_url, PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
        )  # fmt: skip
        os.environ.update({k: v for k, v in env.items() if k.startswith("TRAINYARD_")})
        upgrade_database(url)
        with transaction(url) as s:
            admin = accounts.create_user(s, "gpucheck", "admin")
            token = accounts.create_token(s, admin, "gpu check").secret

        pair_queue, routed = _multi_gpu_routing() if len(gpus) >= 2 and not as_if else (None, False)
        # A 2-GPU job beside the 1-GPU ones: only with 4 GPUs and a route of its own.
        beside = bool(pair_queue) and routed and len(gpus) >= 4
        singles = gpus[:-2] if beside else gpus
        main_gpus = ",".join(str(g.index) for g in singles)
        all_gpus = "all" if len(singles) == len(gpus) and not as_if else main_gpus
        _say(f"\nstarting a worker with --gpus {all_gpus} ...")
        worker = Worker(env, home / "worker-1.log", "gpu,cpu", "--gpus", all_gpus)
        workers.append(worker)
        pair_worker: Worker | None = None
        if beside:
            pair = ",".join(str(g.index) for g in gpus[-2:])
            pair_worker = Worker(env, home / "worker-2.log", pair_queue, "--gpus", pair,
                                 "--gpus-per-slot", "2")  # fmt: skip
            workers.append(pair_worker)
        for w in workers:
            w.wait_ready()
        _say("worker ready: " + next(
            (line for line in worker.tail(100_000).splitlines() if "slot(s):" in line), "?"))  # fmt: skip

        from server.app import create_app
        from shared.settings import load_settings

        client = create_app(load_settings(), {"TESTING": True}).test_client()
        headers = {"Authorization": f"Bearer {token}"}

        def submit(spec: dict[str, Any]) -> int:
            resp = client.post("/api/v1/jobs", json=spec, headers=headers)
            if resp.status_code != 201:
                raise SystemExit(f"submitting {spec['name']}: {resp.status_code} {resp.get_json()}")
            return int(resp.get_json()["id"])

        bundle = client.post(
            "/api/v1/bundles?filename=gpu-check.tar.gz", data=_script_bundle(),
            headers={**headers, "Content-Type": "application/gzip"},
        )  # fmt: skip
        if bundle.status_code not in (200, 201):
            raise SystemExit(
                f"uploading the script bundle: {bundle.status_code} {bundle.get_json()}"
            )
        jobs = {
            "1-gpu-a": submit(_job_spec("gpu-check 1-GPU a", epochs, job_gpus)),
            "1-gpu-b": submit(_job_spec("gpu-check 1-GPU b", epochs, job_gpus)),
            "bf16": submit(_job_spec("gpu-check bf16", epochs, job_gpus, precision="bf16")),
            "script": submit(
                {
                    "kind": "script",
                    "name": "gpu-check script",
                    "tags": ["gpu-check"],
                    "bundle_id": bundle.get_json()["id"],
                    "entry": "train.py",
                    "resources": {"gpus": job_gpus},
                }
            ),  # fmt: skip
        }
        if beside:
            jobs["2-gpu"] = submit(_job_spec("gpu-check 2-GPU", epochs, gpus=2))
        elif len(gpus) < 2:
            _say("2-GPU job: skipped, this host has one GPU")
        elif pair_queue is None and not as_if:
            _say("2-GPU job: skipped, this Trainyard does not accept resources.gpus: 2")
        elif pair_queue:
            _say(
                "2-GPU job: after the others, alone on a --gpus-per-slot 2 worker ("
                + ("fewer than 4 GPUs" if routed else "it shares the 1-GPU jobs' queue")
                + ")"
            )
        seen: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            for label, job_id in jobs.items():
                job = client.get(f"/api/v1/jobs/{job_id}", headers=headers).get_json()
                seen[label] = job
            if all(j["state"] in FINAL for j in seen.values()):
                break
            time.sleep(1.0)
        if pair_queue and not beside:
            # The 2-GPU job after the others, on a 2-GPU slot of a worker of its own.
            worker.stop()
            pair_worker = Worker(env, home / "worker-2.log", pair_queue, "--gpus",
                                 ",".join(str(g.index) for g in gpus[:2]), "--gpus-per-slot", "2")  # fmt: skip
            workers.append(pair_worker)
            pair_worker.wait_ready()
            jobs["2-gpu"] = submit(_job_spec("gpu-check 2-GPU", epochs, gpus=2))
            while time.monotonic() < deadline:
                seen["2-gpu"] = client.get(
                    f"/api/v1/jobs/{jobs['2-gpu']}", headers=headers
                ).get_json()
                if seen["2-gpu"]["state"] in FINAL:
                    break
                time.sleep(1.0)

        _say(
            "\njob            state      GPUs                                   samples/s  GPU util"
        )
        rows: dict[str, dict[str, Any]] = {}
        for label, job in seen.items():
            metrics = (job.get("result") or {}).get("metrics") or {}
            util = _gpu_util(url, job["id"])
            rows[label] = {
                "id": job["id"], "state": job["state"], "placement": job.get("placement"),
                "samples_per_s": metrics.get("samples_per_s"), "gpu_util_mean": util,
                "metrics": metrics, "error": job.get("error"),
                "started": job.get("started_at") or "", "finished": job.get("finished_at") or "~",
            }  # fmt: skip
            sps = metrics.get("samples_per_s")
            _say(
                f"{label:<14} {job['state']:<10} {_describe_gpus(job.get('placement')):<38} "
                f"{'-' if sps is None else f'{sps:,.0f}':>9}  "
                f"{'no telemetry' if util is None else f'{util:.0f} %'}"
            )
            if job["state"] != "succeeded":
                _say(f"    error: {job.get('error')}")
        summary["jobs"] = rows

        _say("\nchecks:")
        for label, row in rows.items():
            check(row["state"] == "succeeded", f"{label} succeeded")
            placed = (row["placement"] or {}).get("gpus") or []
            wanted = 2 if label == "2-gpu" else 1
            check(
                len(placed) == wanted, f"{label} ran on {wanted} GPU(s) of its own: {len(placed)}"
            )
        finished = [r for r in rows.values() if r["state"] == "succeeded"]
        shared_gpu = [
            (a["id"], b["id"])
            for i, a in enumerate(finished) for b in finished[i + 1 :]
            if _overlap(a, b) and {g["index"] for g in (a["placement"] or {}).get("gpus") or []}
            & {g["index"] for g in (b["placement"] or {}).get("gpus") or []}
        ]  # fmt: skip
        check(not shared_gpu, f"no two jobs that overlapped shared a GPU {shared_gpu or ''}")
        if len(gpus) >= 2:
            side_by_side = _overlap(rows["1-gpu-a"], rows["1-gpu-b"])
            if args.smoke:  # one epoch may end before the other job starts: informative
                _say(f"  the two 1-GPU jobs ran at the same time: {side_by_side}")
            else:
                check(side_by_side, "the two 1-GPU jobs ran at the same time")
        bf16 = rows["bf16"]["metrics"]
        loss = bf16.get("train_loss")
        check(
            isinstance(loss, (int, float)) and math.isfinite(loss),
            f"bf16: finite train loss ({loss})",
        )
        accuracy = bf16.get("val_accuracy")
        learned = LEARNED_ACCURACY_SMOKE if args.smoke else LEARNED_ACCURACY
        check(
            isinstance(accuracy, (int, float)) and accuracy >= learned,
            f"bf16: val_accuracy {accuracy} >= {learned} (chance is 0.1)",
        )
        script = rows["script"]["metrics"]
        if as_if:
            _say(f"  script job: ran on {script.get('device')} (as-if GPUs: no CUDA to check)")
        else:
            check(
                script.get("device") == "cuda",
                f"script job: trained on cuda ({script.get('device')})",
            )
            check(
                script.get("cuda_devices") == 1,
                f"script job: saw exactly one GPU ({script.get('cuda_devices')}, "
                f"CUDA_VISIBLE_DEVICES={script.get('visible')!r})",
            )
        util_seen = [r["gpu_util_mean"] for r in rows.values() if r["gpu_util_mean"] is not None]
        _say(
            "  GPU utilization: "
            + (f"telemetry recorded for {len(util_seen)} job(s)" if util_seen
               else "no gpu_util metrics (telemetry not recorded by this worker)")
        )  # fmt: skip
    finally:
        for w in workers:
            w.stop()
        if redis is not None:
            redis.stop()
        summary["failed_checks"] = check.failed
        if args.out:
            args.out.write_text(json.dumps(summary, indent=2, default=str))
        if check.failed:
            for w in workers:
                _say(f"\n--- {w.log.name} (tail)\n{w.tail()}")
        if args.keep:
            _say(f"home kept: {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)
    _say(
        "\ngpu_check: "
        + ("all checks passed" if not check.failed else f"{len(check.failed)} check(s) failed")
    )
    return 0 if not check.failed else 1


if __name__ == "__main__":
    sys.exit(main())
