"""Peak memory of a CSV upload: the web request that stores it, and the worker's load.

Issue 11 measured a 95 MB CSV taking the web process to 666 MB and the worker to
4.97 GB. This writes a CSV of `--mb` megabytes (float columns and a three-class label),
then, each in a fresh process (so one peak does not hide another):

    web      POST /api/v1/uploads through the app (Flask test client, a raw text/csv
             body streamed from the file, SQLite in a temporary directory, no Redis)
    worker   load_dataset("csv", ...) on the stored upload, as a training job does

and reports each process's peak growth (VmHWM after, its size before; the peak is reset
first through /proc/self/clear_refs) in MB per MB of file. Floors, from the same run:
for the web, one copy of the file (what reading the body whole would cost); for the
worker, the arrays training needs (features as float32 and labels), per MB of file.

    .venv/bin/python bench/upload_memory.py [--mb 95] [--features 10] [--smoke]
        [--results rows.jsonl]

`--smoke`: a 2 MB file, proving the bench still runs (tests/test_benchmarks.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import benchlib  # before shared/ and server/: it puts the repository on sys.path

MB = 1 << 20
WEB_TARGET = benchlib.Target("figure", "<=", 1.0, "<= 1 MB per MB of file")
WORKER_TARGET = benchlib.Target("figure", "<=", 3.0, "<= 3 MB per MB of file")

_PROBE = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])

def kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

def reset():
    Path("/proc/self/clear_refs").write_text("5")
    return kb("VmRSS")

mode, work, csv_path = sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
if mode == "web":
    from shared import accounts
    from shared.db import get_engine, transaction
    from shared.orm import Base
    from shared.settings import Settings
    from server.app import create_app
    url = f"sqlite:///{work / 'bench.db'}"
    Base.metadata.create_all(get_engine(url))
    with transaction(url) as s:
        user = accounts.create_user(s, "bench", "admin")
        token = accounts.create_token(s, user, "bench").secret
    settings = Settings(home=work / "home", database_url=url, artifacts_dir=work / "artifacts",
                        max_upload_bytes=1 << 40, max_upload_bytes_per_user=1 << 40)
    client = create_app(settings, {"TESTING": True}).test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    warm = client.post("/api/v1/uploads", data=b"a,b\n1,x\n", content_type="text/csv")
    assert warm.status_code == 201, warm.get_json()
    size = csv_path.stat().st_size
    before = reset()
    with csv_path.open("rb") as body:
        resp = client.post("/api/v1/uploads", input_stream=body, content_type="text/csv",
                           headers={"Content-Length": str(size)})
    assert resp.status_code == 201, resp.get_json()
    print(json.dumps({"grew": kb("VmHWM") - before, "upload_id": resp.get_json()["id"],
                      "uploads_dir": str(settings.uploads_dir)}))
else:
    import torch
    from shared.dataset_catalog import CsvParams
    from worker.training.datasets import DataPaths, _numpy_splits, load_dataset
    uploads, upload_id = Path(sys.argv[5]), int(sys.argv[6])
    paths = DataPaths(data_dir=work, uploads_dir=uploads)
    before = reset()
    splits = load_dataset("csv", CsvParams(upload_id=upload_id, target="label"), 0.1,
                          "standardize", torch.device("cpu"), paths=paths)
    grew = kb("VmHWM") - before
    needed = sum(len(s) for s in (splits.train, splits.val, splits.test))
    width = splits.train.x.shape[1]
    print(json.dumps({"grew": grew, "needed": needed * (4 * width + 8)}))
"""


def probe(*args: str) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(benchlib.REPO), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"probe {args[0]} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = benchlib.parser(__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=None, help="size of the CSV in MB (95)")
    p.add_argument("--features", type=int, default=10, help="float columns besides the label")
    args = p.parse_args()
    results = benchlib.start("upload_memory", args, {"mb": 95.0}, {"mb": 2.0})
    if not Path("/proc/self/clear_refs").exists():
        raise SystemExit("needs Linux /proc (VmHWM and clear_refs)")
    with tempfile.TemporaryDirectory(prefix="bench-upload-") as tmp:
        work = Path(tmp)
        csv_path = work / "big.csv"
        size = benchlib.write_big_csv(csv_path, args.mb, args.features)
        file_mb = size / MB
        web = probe("web", str(work), str(csv_path))
        web_per_mb = web["grew"] / MB / file_mb
        print(f"file {file_mb:.1f} MB")
        print(f"web request  peak growth {web['grew'] / MB:7.1f} MB = {web_per_mb:.2f} MB/MB")
        results.add("web upload peak", web_per_mb, "MB per MB of file", 1.0, WEB_TARGET,
                    note="floor: one copy of the file")  # fmt: skip
        worker = probe(
            "worker", str(work), str(csv_path), web["uploads_dir"], str(web["upload_id"])
        )
        worker_per_mb = worker["grew"] / MB / file_mb
        floor = worker["needed"] / MB / file_mb
        print(
            f"worker load  peak growth {worker['grew'] / MB:7.1f} MB = {worker_per_mb:.2f} MB/MB "
            f"(arrays training needs: {floor:.2f} MB/MB)"
        )
        results.add("worker dataset load peak", worker_per_mb, "MB per MB of file", floor,
                    WORKER_TARGET, note="floor: float32 features + labels")  # fmt: skip


if __name__ == "__main__":
    main()
