"""Hostile dataset files (issue 11, "Dataset files"): a gzip bomb and IDX headers whose
dimensions overflow int64 are refused from the header, read with bounded memory, fail a
job as a DatasetError without retries, and make the catalogue mark the dataset unusable.
"""

from __future__ import annotations

import gzip
import json
import re
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from shared.dataset_catalog import (
    DATASETS,
    IDX_FILES,
    CatalogContext,
    read_idx_header,
    resolve_dataset,
)
from shared.db import transaction
from shared.orm import Job
from shared.schema_base import CatalogError
from shared.settings import Settings
from tests.data_files import idx_bytes, write_mnist
from tests.helpers import train_spec
from tests.test_authorization import session_client
from worker.runner import run_job
from worker.training.data.readers import read_idx
from worker.training.datasets import clear_cache
from worker.training.errors import DatasetError

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def idx_header(*dims: int) -> bytes:
    return bytes([0, 0, 0x08, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


def write_gzip_bomb(path: Path, header: bytes, inflated_bytes: int) -> Path:
    """`header` followed by `inflated_bytes` zeros, gzipped: about 1,000 to 1 at level 9."""
    zeros = bytes(MiB)
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(header)
        for _ in range(inflated_bytes // MiB):
            f.write(zeros)
    return path


def mnist_mlp_spec() -> dict:
    return train_spec(
        dataset={"name": "mnist"},
        model={"name": "mlp", "params": {"hidden": 16, "layers": 1}},
        epochs=1,
    )


# ---------------------------------------------------------------- overflowing dimensions


def test_idx_dims_whose_product_overflows_int64_are_refused_from_the_header(
    tmp_path: Path,
) -> None:
    # 65536**4 == 2**64: as an int64 product that wraps to 0, which matched the empty
    # data and ended in numpy's raw "cannot reshape" ValueError.
    path = tmp_path / "mnist" / "wrapped-idx4-ubyte"
    path.parent.mkdir()
    path.write_bytes(idx_header(65536, 65536, 65536, 65536))
    with pytest.raises(DatasetError, match=r"mnist/wrapped-idx4-ubyte: header says .* more than"):
        read_idx(path)
    with pytest.raises(ValueError, match="more than the limit"):
        read_idx_header(path)
    # Three dims of 2**32 - 1 (7.9e28 bytes) with a few bytes of data.
    path.write_bytes(idx_header(2**32 - 1, 2**32 - 1, 2**32 - 1) + bytes(100))
    with pytest.raises(DatasetError, match="more than the limit"):
        read_idx(path)


def test_the_catalogue_marks_a_dataset_with_overflowing_dims_unusable(
    app, client, settings: Settings, db_url: str, users
) -> None:  # type: ignore[no-untyped-def]
    directory = settings.resolved_data_dir / "mnist"
    files = write_mnist(directory, 30, 10)
    files["train_images"].write_bytes(idx_header(30, 2**32 - 1, 2**32 - 1) + bytes(784 * 30))
    mnist = next(d for d in client.get("/api/v1/datasets").get_json()["datasets"]
                 if d["name"] == "mnist")  # fmt: skip
    # Before: input_shape [1, 4294967295, 4294967295] was advertised.
    assert mnist["usable"] is False and "input_shape" not in mnist
    assert "train-images-idx3-ubyte" in mnist["problem"]
    assert "more than the limit" in mnist["problem"]
    assert str(settings.resolved_data_dir) not in mnist["problem"]

    resp = client.post("/api/v1/jobs", json=mnist_mlp_spec())
    assert resp.status_code == 422
    assert "more than the limit" in resp.get_json()["error"]["fields"]["dataset.name"]

    page = session_client(app, db_url, users.alice).get("/submit").get_data(as_text=True)
    option = re.search(r'<option value="mnist"[^>]*>', page)
    assert option is not None and " disabled" in option.group(0)


# ---------------------------------------------------------------- gzip bombs


def test_a_gzip_bomb_behind_a_plausible_header_is_refused_without_inflating_it(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "data" / "mnist"
    write_mnist(directory, 20, 10, gz=True)
    stem = IDX_FILES["train_images"]
    (directory / f"{stem}.gz").unlink()
    # The header promises 20 images of 28x28 (15,680 bytes); the stream inflates to 64 MiB.
    bomb = write_gzip_bomb(directory / f"{stem}.gz", idx_header(20, 28, 28), 64 * MiB)
    assert bomb.stat().st_size < MiB
    ctx = CatalogContext(data_dir=tmp_path / "data")
    # The catalogue reads the header and the gzip trailer (the inflated size), never the data.
    with pytest.raises(CatalogError, match=r"inflates to .* the header says 15,696") as caught:
        resolve_dataset("mnist", DATASETS["mnist"].params(), ctx)
    assert caught.value.field == "dataset.name"
    # The reader stops one byte past what the header promised.
    with pytest.raises(DatasetError, match="holds more data than its header"):
        read_idx(bomb)


def test_a_gzip_bomb_header_over_the_configured_maximum_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "data" / "mnist"
    write_mnist(directory, 20, 10, gz=True)
    stem = IDX_FILES["train_images"]
    (directory / f"{stem}.gz").unlink()
    bomb = write_gzip_bomb(directory / f"{stem}.gz", idx_header(64, 1024, 1024), 64 * MiB)
    ctx = CatalogContext(data_dir=tmp_path / "data", max_file_bytes=16 * MiB)
    with pytest.raises(CatalogError, match="more than the limit of 16,777,216"):
        resolve_dataset("mnist", DATASETS["mnist"].params(), ctx)
    with pytest.raises(DatasetError, match="more than the limit of 16,777,216"):
        read_idx(bomb, 16 * MiB)
    # Under the default maximum the header is fine, and the read is exact.
    assert read_idx(bomb).shape == (64, 1024, 1024)


_MEASURE = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    from worker.training.data.readers import read_idx
    from worker.training.errors import DatasetError

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        read_idx(Path(sys.argv[1]), int(sys.argv[2]))
        outcome = "read"
    except DatasetError as exc:
        outcome = "DatasetError: " + str(exc)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"outcome": outcome, "grew_kib": after - before}))
    """
)


def peak_growth(path: Path, max_bytes: int) -> dict:
    """Read `path` in a fresh process; how much its peak RSS grew over the read (KiB)."""
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path), str(max_bytes)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_reading_a_gzip_bomb_keeps_peak_memory_bounded(tmp_path: Path) -> None:
    # 256 MiB of zeros behind a header that promises 15,680 bytes: the old reader
    # inflated all of it (and more, copying) before comparing sizes.
    (tmp_path / "mnist").mkdir()
    bomb = write_gzip_bomb(
        tmp_path / "mnist" / "train-images-idx3-ubyte.gz", idx_header(20, 28, 28), 256 * MiB
    )
    measured = peak_growth(bomb, 1 << 30)
    assert measured["outcome"].startswith("DatasetError: mnist/train-images-idx3-ubyte.gz")
    # Generous: the read itself needs a megabyte chunk and the header's 15 KB.
    assert measured["grew_kib"] < 64 * 1024, measured

    # A header that claims more than the configured maximum is refused before reading.
    big = write_gzip_bomb(tmp_path / "mnist" / "big-idx3-ubyte.gz", idx_header(256, 1024, 1024),
                          256 * MiB)  # fmt: skip
    measured = peak_growth(big, 32 * MiB)
    assert "more than the limit" in measured["outcome"]
    assert measured["grew_kib"] < 64 * 1024, measured


def test_a_job_on_a_bad_dataset_file_fails_once_as_a_dataset_error(
    client, settings: Settings, db_url: str
) -> None:  # type: ignore[no-untyped-def]
    clear_cache()
    directory = settings.resolved_data_dir / "mnist"
    write_mnist(directory, 30, 10, gz=True)
    resp = client.post("/api/v1/jobs", json=mnist_mlp_spec())
    assert resp.status_code == 201, resp.get_json()
    job_id = resp.get_json()["id"]
    # Replaced between submission and training: the worker's own checks catch it.
    stem = IDX_FILES["train_images"]
    write_gzip_bomb(directory / f"{stem}.gz", idx_header(30, 28, 28), 32 * MiB)
    assert run_job(job_id, settings) == "failed"
    job = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert job["state"] == "failed" and job["attempt"] == 1
    assert job["error"]["type"] == "DatasetError"
    assert f"mnist/{stem}.gz" in job["error"]["message"]
    assert str(settings.resolved_data_dir) not in json.dumps(job)
    with transaction(db_url) as s:
        assert s.get(Job, job_id).attempt == 1  # not retried


def test_a_plain_idx_file_with_extra_or_missing_data_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "mnist"
    directory.mkdir()
    path = directory / "labels-idx1-ubyte"
    path.write_bytes(idx_bytes(np.zeros(10, dtype=np.uint8)) + bytes(5))
    with pytest.raises(DatasetError, match="the file holds 15 "):
        read_idx(path)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx_header(path)
    path.write_bytes(idx_bytes(np.zeros(10, dtype=np.uint8)))
    assert read_idx(path).shape == (10,)
