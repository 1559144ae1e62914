"""`trainyard serve` under 32 concurrent clients, batching off and on, against the bare
forward pass of the same model measured in this process in the same run.

Trains a digits CNN (one epoch), registers it in a SQLite database of its own, and
starts `trainyard serve` twice (TRAINYARD_SERVE_BATCHING=false, then true) against it.
`--clients` threads (default 32), each with its own keep-alive connection, send
single-row predictions (`{"inputs": [[64 pixels]]}`) as fast as they are answered;
each mode reports p50 and p95 latency and the throughput, and the mean rows per
forward pass it reached (from GET /api/v1/serve/stats). Floors, in this process on the
same model and prepared input: the bare forward pass at batch 1 (latency, and 1/latency
as throughput) for batching off, and at the batch size batching reached (its latency,
and rows/latency) for batching on. No targets: the rows are information.

    .venv/bin/python bench/serve.py [--requests 6400] [--clients 32] [--max-wait-ms 2]
        [--channels 16] [--hidden 64] [--smoke] [--results rows.jsonl]

A wider CNN (`--channels 64 --hidden 1024`) makes the forward pass, not HTTP and JSON,
the larger part of a request: that is where batching pays.

`--smoke`: 96 requests per mode; proves the server starts, answers and batches
(tests/test_benchmarks.py), nothing more.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import benchlib  # before shared/ and worker/: it puts the repository on sys.path


def setup(
    tmp: Path, channels: int = 16, hidden: int = 64
) -> tuple[dict[str, str], str, Path, list[float]]:
    """(the serve processes' environment, a token, the model file, one input row)."""
    import torch

    from shared import accounts, job_files
    from shared import model_registry as registry
    from shared.artifact_store import store_for
    from shared.dataset_catalog import CatalogContext
    from shared.db import session_factory, transaction
    from shared.migrate import upgrade_database
    from shared.orm import Job
    from shared.settings import Settings
    from shared.spec import parse_spec, spec_to_json
    from worker.training import DataPaths, ListSink, train_job

    db_url = f"sqlite:///{tmp / 'bench.db'}"
    upgrade_database(db_url)
    settings = Settings(home=tmp, database_url=db_url, artifacts_dir=tmp / "artifacts")
    spec = parse_spec(
        {"kind": "train", "dataset": {"name": "digits"},
         "model": {"name": "cnn", "params": {"channels": channels, "hidden": hidden}},
         "epochs": 1, "batch_size": 64, "seed": 0},
        CatalogContext(data_dir=tmp),
    )  # fmt: skip
    with transaction(db_url) as s:
        user = accounts.create_user(s, "bench", "member")
        token = accounts.create_token(s, user, "bench").secret
        user_id = user.id
        job = Job(owner_id=user.id, kind="train", name="digits-cnn", state="succeeded",
                  queue="cpu", spec=spec_to_json(spec), model_name="cnn",
                  dataset_name="digits", attempt=1)  # fmt: skip
        s.add(job)
        s.flush()
        job_id = job.id
    directory = job_files.job_dir(settings, job_id) / "attempt-1"
    paths = DataPaths(data_dir=tmp, uploads_dir=tmp)
    train_job(spec, torch.device("cpu"), ListSink(), directory, paths=paths)
    with transaction(db_url) as s:
        s.get(Job, job_id).checkpoint_path = str(directory)
    with session_factory(db_url)() as s:
        registry.promote(s, store_for(settings), registry.Actor(user_id, False), "digits",
                         job_id, stage="production")  # fmt: skip
    from sklearn.datasets import load_digits

    row = load_digits().images[0].reshape(64).astype(float).tolist()
    env = benchlib.bench_env(
        TRAINYARD_HOME=str(tmp), TRAINYARD_DATABASE_URL=db_url,
        TRAINYARD_ARTIFACTS_DIR=str(tmp / "artifacts"),
    )  # fmt: skip
    return env, token, directory / "best.pt", row


def floors(model_file: Path, row: list[float], batch: int, repeat: int) -> dict[str, float]:
    """The bare forward pass in this process: p50/p95 ms at batch 1 and at `batch`."""
    import torch

    from worker.training.data.preprocess import apply_stats
    from worker.training.model_file import load_model_file

    loaded = load_model_file(model_file)
    x1 = apply_stats(torch.tensor([row]).reshape(1, 1, 8, 8), loaded.stats)
    xb = x1.repeat(batch, 1, 1, 1)
    out = {}
    for label, x in (("1", x1), ("b", xb)):
        with torch.inference_mode():
            times, _ = benchlib.timed(lambda x=x: loaded.model(x), repeat)
        out[f"p50_{label}"] = benchlib.percentile(times, 50)
        out[f"p95_{label}"] = benchlib.percentile(times, 95)
    return out


def load(
    port: int, token: str, row: list[float], clients: int, total: int
) -> tuple[list[float], float]:
    """(latencies in ms, wall seconds) of `total` requests from `clients` threads."""
    body = json.dumps({"inputs": [row]}).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    per_client = max(1, total // clients)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        barrier.wait()
        for _ in range(per_client):
            t0 = time.perf_counter()
            conn.request("POST", "/api/v1/models/digits/predict", body, headers)
            resp = conn.getresponse()
            data = resp.read()
            latencies[i].append((time.perf_counter() - t0) * 1000)
            if resp.status != 200:
                errors.append(f"{resp.status} {data[:200]!r}")
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return [ms for one in latencies for ms in one], wall


def run_mode(
    batching: bool,
    env: dict[str, str],
    token: str,
    row: list[float],
    args: argparse.Namespace,
    tmp: Path,
) -> dict[str, Any]:
    from server.cli.local.embedded_redis import free_port

    port = free_port()
    log_path = tmp / f"serve-{'on' if batching else 'off'}.log"
    mode_env = {**env, "TRAINYARD_SERVE_BATCHING": str(batching).lower(),
                "TRAINYARD_SERVE_MAX_WAIT_MS": str(args.max_wait_ms),
                "TRAINYARD_SERVE_MAX_BATCH": str(args.clients),
                "TRAINYARD_SERVE_QUEUE_LIMIT": str(4 * args.clients)}  # fmt: skip
    proc = benchlib.spawn_python(
        "server.cli", ["serve", "--port", str(port), "--threads", str(args.clients)], mode_env,
        log_path,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"serve did not start:\n{log_path.read_text()[-3000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        load(port, token, row, args.clients, args.clients)  # loads the model, warms up
        before = stats(port, token)
        latencies, wall = load(port, token, row, args.clients, args.requests)
        after = stats(port, token)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    passes = after["forward_passes"] - before["forward_passes"]
    rows = after["rows"] - before["rows"]
    return {
        "p50": benchlib.percentile(latencies, 50),
        "p95": benchlib.percentile(latencies, 95),
        "rps": len(latencies) / wall,
        "mean_batch": rows / passes if passes else 1.0,
        "max_batch": after["max_rows"],
        "requests": len(latencies),
    }


def stats(port: int, token: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/api/v1/serve/stats", headers={"Authorization": f"Bearer {token}"})
    body = json.loads(conn.getresponse().read())
    version = body["models"]["digits"]["versions"]["1"]
    sizes = {int(k): v for k, v in version["batches"]["sizes"].items()}
    return {
        "forward_passes": sum(sizes.values()),
        "rows": sum(k * v for k, v in sizes.items()),
        "max_rows": max(sizes) if sizes else 0,
    }


def main() -> None:
    parser = benchlib.parser((__doc__ or "").split("\n")[0])
    parser.add_argument("--requests", type=int, help="per mode; default 6,400 (smoke: 96)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--channels", type=int, default=16, help="the CNN's width")
    parser.add_argument("--hidden", type=int, default=64, help="the CNN's hidden layer")
    parser.add_argument("--max-wait-ms", type=float, default=2.0,
                        help="TRAINYARD_SERVE_MAX_WAIT_MS with batching on")  # fmt: skip
    parser.add_argument(
        "--repeat", type=int, help="bare forward passes timed; default 500 (smoke: 50)"
    )
    args = parser.parse_args()
    results = benchlib.start(
        "serve", args, full={"requests": 6400, "repeat": 500}, smoke={"requests": 96, "repeat": 50}
    )
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        env, token, model_file, row = setup(tmp, args.channels, args.hidden)
        print(f"digits CNN (channels {args.channels}, hidden {args.hidden}), {args.clients} clients, {args.requests:,} single-row requests per mode, "
              f"{os.cpu_count()} CPUs")  # fmt: skip
        off = run_mode(False, env, token, row, args, tmp)
        on = run_mode(True, env, token, row, args, tmp)
        batch = max(1, round(on["mean_batch"]))
        floor = floors(model_file, row, batch, args.repeat)

    def show(name: str, figure: float, unit: str, base: float, note: str) -> None:
        print(
            f"  {name:44} {figure:10.2f} {unit:8} floor {base:10.2f}  x{figure / base:7.2f}  ({note})"
        )
        results.add(name, figure, unit, base, note=note)

    bare1 = "bare forward pass, batch 1, this process"
    bareb = f"bare forward pass, batch {batch}, this process"
    print(
        f"\nbatching off (each request its own forward pass): mean {off['mean_batch']:.2f} rows per pass"
    )
    show("batching off: latency p50", off["p50"], "ms p50", floor["p50_1"], bare1)
    show("batching off: latency p95", off["p95"], "ms p95", floor["p95_1"], bare1)
    show("batching off: throughput", off["rps"], "req/s", 1000.0 / floor["p50_1"],
         "1 / bare batch-1 latency")  # fmt: skip
    print(f"\nbatching on (max wait {args.max_wait_ms:g} ms, max batch {args.clients}): "
          f"mean {on['mean_batch']:.2f} rows per pass, largest {on['max_batch']}")  # fmt: skip
    show("batching on: latency p50", on["p50"], "ms p50", floor["p50_b"], bareb)
    show("batching on: latency p95", on["p95"], "ms p95", floor["p95_b"], bareb)
    show("batching on: throughput", on["rps"], "req/s", batch * 1000.0 / floor["p50_b"],
         f"{batch} rows / bare batch-{batch} latency")  # fmt: skip
    show("batching on vs off: throughput", on["rps"], "req/s", off["rps"], "batching off, same run")


if __name__ == "__main__":
    main()
