"""A large CSV upload must not take the web process or the worker to many times its size.

Issue 11: a 95 MB CSV took the web process to 666 MB and the worker to 4.97 GB (52x
the file). The upload goes through a real gunicorn worker here, and the dataset load
through the worker's own code in a fresh process; each process's peak resident size
(VmHWM) is compared with its size just before. The bounds are generous (a multiple of
the file plus fixed room for allocator slack), not timings.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from shared.settings import Settings
from tests.conftest import REPO, TestUsers, settings_env
from tests.helpers import bench_module

MB = 1 << 20
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
# The same files as bench/upload_memory.py measures with.
write_big_csv = bench_module("benchlib").write_big_csv


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def _reset_peak(pid: int) -> None:
    """Start VmHWM again from the current size (Linux: clear_refs 5), so the peak read
    afterwards is this request's, not one from start-up."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
@SQLITE_ONLY
def test_web_upload_memory_is_bounded_by_the_file(
    settings: Settings, users: TestUsers, tmp_path: Path
) -> None:
    path = tmp_path / "big.csv"
    size = write_big_csv(path, 24)
    # 1,000 columns, few rows: almost every cell is a distinct value.
    wide = tmp_path / "wide.csv"
    wide_size = write_big_csv(wide, 5, features=1000)
    port = _free_port()
    env = settings_env(settings) | {"TRAINYARD_MAX_UPLOAD_BYTES": str(200 * MB)}
    cmd = [sys.executable, "-m", "gunicorn", "-w", "1", "--threads", "1", "-t", "300",
           "-b", f"127.0.0.1:{port}", "server.wsgi:app"]  # fmt: skip
    master = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        # The master listens before its worker has imported the app, so on a loaded
        # machine the first probe may connect and then wait: a read timeout is "not
        # yet", like a refused connection.
        deadline = time.monotonic() + 120
        while True:
            try:
                requests.get(f"{base}/healthz", timeout=10)
                break
            except (requests.ConnectionError, requests.Timeout):
                assert master.poll() is None, "gunicorn died"
                assert time.monotonic() < deadline, "gunicorn did not answer in 120 s"
                time.sleep(0.2)
        children = Path(f"/proc/{master.pid}/task/{master.pid}/children").read_text().split()
        (worker,) = (int(c) for c in children)
        # Warm up: the first upload imports and caches what every later one uses.
        small = requests.post(
            f"{base}/api/v1/uploads?filename=small.csv",
            data=b"a,b\n1,x\n2,y\n",
            headers={**users.alice.headers, "Content-Type": "text/csv"},
            timeout=60,
        )
        assert small.status_code == 201, small.text
        grew = {}
        files = {"long": (path, size), "wide": (wide, wide_size)}
        for name, (upload_path, upload_size) in files.items():
            _reset_peak(worker)
            before = _status_kb(worker, "VmRSS") * 1024
            with upload_path.open("rb") as body:
                resp = requests.post(
                    f"{base}/api/v1/uploads?filename={name}.csv",
                    data=body,
                    headers={**users.alice.headers, "Content-Type": "text/csv"},
                    timeout=300,
                )
            assert resp.status_code == 201, resp.text
            assert resp.json()["size_bytes"] == upload_size
            grew[name] = _status_kb(worker, "VmHWM") * 1024 - before
    finally:
        master.terminate()
        master.wait(timeout=30)
    # Before: the body, its decoded text and a StringIO copy of it were all held at
    # once (several times the file), and a wide file with few rows kept nearly every
    # cell as a string. Now the body streams to disk, rows are parsed a bounded number
    # at a time, and distinct values are counted as 8-byte hashes.
    for name, (_path, size_of) in files.items():
        assert grew[name] < 2 * size_of + 32 * MB, (
            f"{name}: web grew {grew[name] / MB:.0f} MB for a {size_of / MB:.0f} MB file"
        )


_LOAD = """
import json, sys
from pathlib import Path
import torch
from shared.dataset_catalog import CsvParams
from worker.training.datasets import DataPaths, load_dataset

def kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

uploads, upload_id = Path(sys.argv[1]), int(sys.argv[2])
paths = DataPaths(data_dir=uploads, uploads_dir=uploads)
Path("/proc/self/clear_refs").write_text("5")
before = kb("VmRSS")
splits = load_dataset("csv", CsvParams(upload_id=upload_id, target="label"), 0.1, "standardize",
                      torch.device("cpu"), paths=paths)
print(json.dumps({"before": before, "peak": kb("VmHWM"), "train": len(splits.train)}))
"""


def measure_load(uploads_dir: Path, upload_id: int) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _LOAD, str(uploads_dir), str(upload_id)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
@pytest.mark.parametrize("stored", ["columns", "csv"])
def test_worker_dataset_load_memory_is_bounded_by_the_file(tmp_path: Path, stored: str) -> None:
    """Both storage forms: the compact one, and a raw CSV kept by an older version."""
    pytest.importorskip("torch")
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    source = uploads / "5.csv"
    size = write_big_csv(source, 16)
    if stored == "columns":
        from shared.csv_profile import profile_lines
        from shared.job_files import store_upload_columns

        with source.open(newline="", encoding="utf-8") as f:
            store_upload_columns(uploads, 5, source, profile_lines(f))
        source.unlink()
    found = measure_load(uploads, 5)
    grew = found["peak"] - found["before"]
    assert found["train"] > 100_000
    # Before: every cell became a Python string in a list of rows (52x the file).
    assert grew < 3 * size + 64 * MB, f"worker grew {grew / MB:.0f} MB for {size / MB:.0f} MB"
