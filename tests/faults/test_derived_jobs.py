"""Prune, quantize and export jobs on real `celery worker` processes (issue 16): a tiny
model is trained, then each post-training job reads its checkpoint, writes its model
files, and reports before/after measures that are present and plausible. The model
code itself is tested in tests/test_compression.py, tests/test_export.py and
tests/test_derive.py."""

from __future__ import annotations

from typing import Any

import pytest

from tests.faults.conftest import Cluster, wait_for
from tests.helpers import train_spec

pytestmark = pytest.mark.integration

TERMINAL = {"succeeded", "failed", "cancelled"}


def finished(cluster: Cluster, job_id: int, timeout: float = 180) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = cluster.http.get(f"{cluster.url}/api/v1/jobs/{job_id}", timeout=30).json()
        return job if job["state"] in TERMINAL else None

    job = wait_for(done, timeout, f"job {job_id} to finish", interval=0.3)
    assert job["state"] == "succeeded", job
    return job


def files(cluster: Cluster, job_id: int) -> set[str]:
    listing = cluster.http.get(f"{cluster.url}/api/v1/jobs/{job_id}/artifacts", timeout=30).json()
    return {a["path"].rsplit("/", 1)[-1] for a in listing["artifacts"]}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_prune_quantize_and_export_a_trained_model(cluster: Cluster) -> None:
    cluster.start_workers(1)
    model = {"name": "mlp", "params": {"hidden": 64, "layers": 2}}
    source = cluster.submit(train_spec(model=model, epochs=4, batch_size=64, name="base"))
    finished(cluster, source)

    pruned = cluster.submit({"kind": "prune", "source_job_id": source, "sparsity": 0.6,
                             "fine_tune_epochs": 1})  # fmt: skip
    quantized = cluster.submit({"kind": "quantize", "source_job_id": source})
    exported = cluster.submit({"kind": "export", "source_job_id": source})

    m = finished(cluster, pruned)["result"]["metrics"]
    assert abs(m["sparsity_achieved"] - 0.6) <= 0.01, m
    assert m["after_nonzero_fraction"] < m["before_nonzero_fraction"]
    assert m["before_accuracy"] > 0.5 and m["after_accuracy"] > 0.3, m  # fine-tuned, not wrecked
    assert m["before_latency_ms"] > 0 and m["after_latency_ms"] > 0
    assert "best.pt" in files(cluster, pruned)

    m = finished(cluster, quantized)["result"]["metrics"]
    assert m["after_size_bytes"] < m["before_size_bytes"], m
    assert m["quantized_layers"] >= 2
    assert abs(m["after_accuracy"] - m["before_accuracy"]) < 0.05, m
    assert "model.pt" in files(cluster, quantized)

    job = finished(cluster, exported)
    m = job["result"]["metrics"]
    for fmt in ("state_dict", "torch_export", "onnx"):
        assert m[f"{fmt}_max_abs_diff"] <= 1e-4, (fmt, m)
    assert {"model_card.json", "state_dict.pt", "model.pt2", "model.onnx"} <= files(
        cluster, exported
    )

    # A pruned model can itself be quantized: the chain leads back to the train job.
    again = cluster.submit({"kind": "quantize", "source_job_id": pruned})
    m = finished(cluster, again)["result"]["metrics"]
    assert m["after_size_bytes"] < m["before_size_bytes"]
    # Lineage in the API: each derived job names its source.
    assert job["source_job_id"] == source
