"""Training overhead of a Trainyard job against a bare PyTorch loop.

Two cases (issue 3): the seed-style CNN on sklearn's digits, and a CIFAR-style
ResNet-20 on synthetic 3x32x32 images. For each, every round trains the same model
(build_model, same seed) on the same data tensors (load_dataset) with the same batch
size, the same fused Adam kernel, per-epoch validation and the same thread count
twice: once as a hand-written loop in this process (the floor), once as a job.
Prints samples/s of both and their ratio (target >= 0.97: docs/architecture.md,
"Performance targets").

    .venv/bin/python bench/train_overhead.py [--case cnn-digits|resnet-synthetic|all]
        [--rounds 3] [--epochs N] [--in-process] [--smoke] [--results rows.jsonl]

By default the job is submitted over HTTP (with an API token of a user made in the
bench's own database) to a real `celery worker` subprocess on a private Redis and
SQLite, and the job figure is the worker's own `samples_per_s`
(whole training loop, per-epoch validation, metric writes, progress and checkpoints
included; process start-up and data loading excluded); the end-to-end figure adds
queueing, claim and data loading. `--in-process` calls train_job directly in this
process instead (a ListSink, checkpoints to a temp dir): the engine's own overhead,
without the worker's database writes.

`--smoke`: both cases, one round of one epoch, no warm-up, 64 synthetic images, faster
polling: it proves the whole path still works (tests/test_benchmarks.py), its numbers
mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# torch, worker/ and server/ are imported where they are used: importing them takes
# seconds, and over HTTP the worker subprocess boots meanwhile instead of after.
import benchlib  # before shared/, server/, worker/: it puts the repository on sys.path

CASES: dict[str, dict[str, Any]] = {
    "cnn-digits": {
        "dataset": {"name": "digits"},
        "model": {"name": "cnn"},
        "epochs": 10,
        "batch_size": 32,
    },
    "resnet-synthetic": {
        "dataset": {
            "name": "synthetic_images",
            "params": {
                "channels": 3,
                "height": 32,
                "width": 32,
                "num_classes": 10,
                "num_samples": 2048,
            },
        },
        "model": {"name": "resnet", "params": {"depth": 20}},
        "epochs": 2,
        "batch_size": 128,
    },
}
EVAL_BATCH = 1024  # what the job's per-epoch validation uses
# Polling the API costs CPU on the cores the worker trains on: poll rarely. The job's
# figure is its own samples_per_s, so the polling interval does not bias it; a smoke
# run polls often because its jobs take a second and its numbers mean nothing anyway.
POLL_S = 2.0
SMOKE_POLL_S = 0.2
SMOKE_SAMPLES = 64  # synthetic images in a smoke run (the case's own count otherwise)
TARGET = benchlib.Target("ratio", ">=", 0.97, "ratio >= 0.97")
NO_FILES = {"data_dir": Path("/nonexistent/data"), "uploads_dir": Path("/nonexistent/uploads")}


def make_spec(case: str, epochs: int | None, smoke: bool = False) -> dict[str, Any]:
    spec = {
        "kind": "train",
        "name": f"bench-{case}",
        "optimizer": {"name": "adam", "lr": 0.001},
        "seed": 0,
        **CASES[case],
    }
    if epochs is not None:
        spec["epochs"] = epochs
    params = spec["dataset"].get("params")
    if smoke and params and "num_samples" in params:
        spec["dataset"] = {**spec["dataset"], "params": {**params, "num_samples": SMOKE_SAMPLES}}
    return spec


def bare_loop(spec_json: dict[str, Any]) -> float:
    """The floor: the plainest loop that does the same work (train + per-epoch val)."""
    import torch
    import torch.nn.functional as F

    from shared.dataset_catalog import DATASETS
    from shared.spec import TrainSpec, parse_spec
    from worker.training import DataPaths
    from worker.training.datasets import load_dataset
    from worker.training.models import build_model

    spec = parse_spec(spec_json)
    assert isinstance(spec, TrainSpec)
    device = torch.device("cpu")
    kind = DATASETS[spec.dataset.name].kind
    data = load_dataset(spec.dataset.name, spec.dataset.params, spec.dataset.val_fraction,
                        spec.dataset.resolved_normalize(kind), device, paths=DataPaths(**NO_FILES))  # fmt: skip
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, data.info).to(device)
    # Same kernel as the job's optimizer (fused where the device has one), so the
    # ratio measures Trainyard's overhead, not an optimizer choice.
    opt = torch.optim.Adam(model.parameters(), lr=spec.optimizer.lr, fused=True)
    x, y, n = data.train.x, data.train.y, len(data.train)
    xv, yv = data.val.x, data.val.y
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
            val_loss = torch.zeros(())
            correct = torch.zeros((), dtype=torch.long)
            for i in range(0, len(yv), EVAL_BATCH):
                out = model(xv[i : i + EVAL_BATCH])
                val_loss += F.cross_entropy(out, yv[i : i + EVAL_BATCH], reduction="sum")
                correct += (out.argmax(1) == yv[i : i + EVAL_BATCH]).sum()
            (val_loss / len(yv)).item(), correct.item()
    return spec.epochs * n / (time.perf_counter() - start)


def job_in_process(spec_json: dict[str, Any]) -> dict[str, Any]:
    import torch

    from shared.spec import TrainSpec, parse_spec
    from worker.training import DataPaths, ListSink, train_job

    spec = parse_spec(spec_json)
    assert isinstance(spec, TrainSpec)
    with tempfile.TemporaryDirectory() as tmp:
        return train_job(
            spec, torch.device("cpu"), ListSink(), Path(tmp), paths=DataPaths(**NO_FILES)
        )


@contextmanager
def job_over_http(poll_s: float) -> Iterator[Callable[[dict[str, Any]], dict[str, Any]]]:
    """A real worker, Redis and SQLite; yields run(spec) -> the job's result metrics."""
    with tempfile.TemporaryDirectory() as tmp, benchlib.small_cluster(Path(tmp)) as c:

        def run(body: dict[str, Any]) -> dict[str, Any]:
            job = benchlib.check(c.http.post(f"{c.url}/jobs", json=body, timeout=10))
            while job["state"] not in ("succeeded", "failed", "cancelled"):
                if (died := c.worker_died()) is not None:
                    raise SystemExit(died)
                time.sleep(poll_s)
                job = benchlib.check(c.http.get(f"{c.url}/jobs/{job['id']}", timeout=10))
            if job["state"] != "succeeded":
                raise SystemExit(f"job {job['id']} {job['state']}: {job['error']}")
            return job["result"]["metrics"]

        yield run


def bench_case(
    case: str,
    run_job: Callable[[dict[str, Any]], dict[str, Any]],
    args: argparse.Namespace,
    results: benchlib.Results,
) -> float:
    import torch

    spec = make_spec(case, args.epochs, args.smoke)
    if not args.smoke:
        run_job({**spec, "epochs": 1})  # warm-up: imports, dataset cache, allocator
        bare_loop({**spec, "epochs": 1})
    bare, inside, end_to_end = [], [], []
    for r in range(args.rounds):
        bare.append(bare_loop(spec))
        metrics = run_job(spec)
        inside.append(metrics["samples_per_s"])
        end_to_end.append(
            metrics["epochs_run"] * metrics["num_train_samples"] / metrics["duration_s"]
        )
        print(
            f"  round {r + 1}: bare {bare[-1]:8.0f}  job {inside[-1]:8.0f}  samples/s", flush=True
        )
    b, j, e = statistics.median(bare), statistics.median(inside), statistics.median(end_to_end)
    print(f"{case}: epochs={spec['epochs']} batch={spec['batch_size']} threads={torch.get_num_threads()} "
          f"rounds={args.rounds} (medians)")  # fmt: skip
    print(f"  bare PyTorch loop (floor) : {b:10.0f} samples/s")
    print(f"  trainyard job             : {j:10.0f} samples/s   ratio {j / b:.3f}  ({TARGET.text})")
    print(f"  job incl. data load + ckpt: {e:10.0f} samples/s   ratio {e / b:.3f}")
    how = "in-process" if args.in_process else "worker"
    results.add(f"{case}: job ({how}) vs bare loop", j, "samples/s", b, TARGET)
    results.add(f"{case}: job ({how}) incl. data load + checkpoints", e, "samples/s", b)
    return j / b


def main() -> None:
    parser = benchlib.parser((__doc__ or "").splitlines()[0])
    parser.add_argument("--case", default="all", choices=[*CASES, "all"])
    parser.add_argument("--epochs", type=int, default=None, help="override the case's epochs")
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (smoke: 1)")
    parser.add_argument(
        "--in-process", action="store_true", help="call train_job here, not through a worker"
    )
    args = parser.parse_args()
    results = benchlib.start(
        "train_overhead", args, full={"rounds": 3}, smoke={"rounds": 1, "epochs": 1}
    )

    cases = list(CASES) if args.case == "all" else [args.case]
    ratios = {}
    with contextlib.ExitStack() as stack:
        run_job = job_in_process
        if not args.in_process:
            run_job = stack.enter_context(job_over_http(SMOKE_POLL_S if args.smoke else POLL_S))
        import torch

        # Same threads as a one-slot worker child (worker/celery_worker.py).
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        for case in cases:
            ratios[case] = bench_case(case, run_job, args, results)
    print("\n" + "  ".join(f"{case}: ratio {r:.3f}" for case, r in ratios.items()))


if __name__ == "__main__":
    main()
