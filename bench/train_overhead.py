"""Training overhead of a Trainyard job against a bare PyTorch loop (design.md 5).

Trains the same model on the same data with the same batch size and thread count
twice per round: once as a hand-written loop in this process (the floor), once as
a job submitted over HTTP to a real `celery worker` subprocess on a private Redis
and SQLite. Prints samples/s of both and their ratio (target >= 0.97).

    .venv/bin/python bench/train_overhead.py [--model cnn] [--epochs 10] [--rounds 3]

The job figure is the worker's own `samples_per_s` (whole training loop, per-epoch
validation, metric writes and progress included; process start-up excluded);
the end-to-end figure adds queueing, claim and the final checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
import torch
import torch.nn.functional as F
from werkzeug.serving import make_server

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from server.app import create_app  # noqa: E402
from shared.local_redis import LocalRedis  # noqa: E402
from shared.migrate import upgrade_database  # noqa: E402
from shared.settings import Settings  # noqa: E402
from shared.spec import parse_spec  # noqa: E402
from worker.training.datasets import load_dataset  # noqa: E402
from worker.training.models import build_model  # noqa: E402


def make_spec(model: str, epochs: int, batch_size: int) -> dict:
    return {
        "kind": "train",
        "name": f"bench-{model}",
        "dataset": {"name": "digits"},
        "model": {"name": model},
        "optimizer": {"name": "adam", "lr": 0.001},
        "epochs": epochs,
        "batch_size": batch_size,
        "seed": 0,
    }


def bare_loop(spec_json: dict) -> float:
    """The floor: the plainest loop that does the same work (train + per-epoch val)."""
    spec = parse_spec(spec_json)
    device = torch.device("cpu")
    torch.manual_seed(spec.seed)
    data = load_dataset(spec.dataset.name, spec.dataset.val_fraction, device)
    model = build_model(spec.model, data.info).to(device)
    # Same kernel as the job's optimizer (fused where the device has one), so the
    # ratio measures Trainyard's overhead, not an optimizer choice.
    opt = torch.optim.Adam(model.parameters(), lr=spec.optimizer.lr, fused=True)
    x, y, n = data.train.x, data.train.y, len(data.train)
    start = time.perf_counter()
    for _ in range(spec.epochs):
        model.train()
        perm = torch.randperm(n)
        for i in range(0, n, spec.batch_size):
            idx = perm[i : i + spec.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.inference_mode():
            F.cross_entropy(model(data.val.x), data.val.y).item()
    return spec.epochs * n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn", choices=["cnn", "mlp"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    # Same threads as a one-slot worker child (worker/celery_worker.py).
    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    spec = make_spec(args.model, args.epochs, args.batch_size)

    with tempfile.TemporaryDirectory() as tmp, LocalRedis(Path(tmp) / "redis") as redis:
        settings = Settings(
            home=Path(tmp), database_url=f"sqlite:///{tmp}/bench.db", redis_url=redis.url
        )
        upgrade_database(settings.resolved_database_url)
        env = {**os.environ, "TRAINYARD_HOME": tmp, "TRAINYARD_DATABASE_URL": settings.resolved_database_url,
               "TRAINYARD_REDIS_URL": redis.url}  # fmt: skip
        log = open(Path(tmp) / "worker.log", "wb")  # noqa: SIM115
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_worker:app", "worker", "-Q", "cpu",
             "--concurrency", "1", "--prefetch-multiplier", "1", "--loglevel", "WARNING"],
            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        server = make_server("127.0.0.1", 0, create_app(settings), threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_port}/api/v1"

        def run_job(body: dict) -> dict:
            job = requests.post(f"{url}/jobs", json=body, timeout=10).json()
            while job["state"] not in ("succeeded", "failed", "cancelled"):
                # Slow polling: the server shares the 2 cores with the training worker.
                time.sleep(0.5)
                job = requests.get(f"{url}/jobs/{job['id']}", timeout=10).json()
            if job["state"] != "succeeded":
                raise SystemExit(f"job {job['id']} {job['state']}: {job['error']}")
            return job

        try:
            run_job({**spec, "epochs": 1})  # warm-up: worker child imports, dataset cache
            bare_loop({**spec, "epochs": 1})
            bare, inside, end_to_end = [], [], []
            for r in range(args.rounds):
                bare.append(bare_loop(spec))
                job = run_job(spec)
                metrics = job["result"]["metrics"]
                inside.append(metrics["samples_per_s"])
                end_to_end.append(
                    metrics["epochs_run"] * metrics["num_train_samples"] / metrics["duration_s"]
                )
                print(f"round {r + 1}: bare {bare[-1]:8.0f}  job {inside[-1]:8.0f}  samples/s")
        finally:
            server.shutdown()
            worker.terminate()
            worker.wait(30)
            log.close()

    b, j, e = statistics.median(bare), statistics.median(inside), statistics.median(end_to_end)
    print(f"\nmodel={args.model} dataset=digits epochs={args.epochs} batch={args.batch_size} "
          f"threads={torch.get_num_threads()} rounds={args.rounds} (medians)")  # fmt: skip
    print(f"bare PyTorch loop (floor) : {b:10.0f} samples/s")
    print(f"trainyard job (worker)    : {j:10.0f} samples/s   ratio {j / b:.3f}  (target >= 0.97)")
    print(f"job incl. data load + ckpt: {e:10.0f} samples/s   ratio {e / b:.3f}")


if __name__ == "__main__":
    main()
