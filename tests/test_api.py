"""The HTTP API without a worker: validation, storage, enqueue, listing, cancel, metrics."""

from __future__ import annotations

import json

import pytest
import redis
from sqlalchemy import insert

from shared.column_store import read_column_file
from shared.db import transaction
from shared.orm import Job, MetricPoint
from shared.settings import Settings
from tests.helpers import evaluate_spec, train_spec


def error_fields(resp) -> dict[str, str]:  # type: ignore[no-untyped-def]
    body = resp.get_json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "fields"}, body
    return body["error"]["fields"]


def queued_messages(redis_url: str, queue: str = "cpu") -> list[dict]:
    client = redis.Redis.from_url(redis_url)
    return [json.loads(m) for m in client.lrange(queue, 0, -1)]


def test_submit_commits_and_enqueues(client, redis_url: str, db_url: str) -> None:  # type: ignore[no-untyped-def]
    resp = client.post("/api/v1/jobs", json=train_spec())
    assert resp.status_code == 201, resp.get_json()
    job = resp.get_json()
    assert job["state"] == "queued" and job["queue"] == "cpu" and job["attempt"] == 0
    assert job["model"] == "cnn" and job["dataset"] == "digits" and job["tags"] == ["test"]
    assert resp.headers["Location"] == f"/api/v1/jobs/{job['id']}"
    with transaction(db_url) as s:
        assert s.get(Job, job["id"]).spec["epochs"] == 3
    [message] = queued_messages(redis_url)
    assert message["headers"]["task"] == "trainyard.train"
    assert message["headers"]["id"] == f"trainyard-job-{job['id']}"


def test_gpu_job_goes_to_gpu_queue(client, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    resp = client.post("/api/v1/jobs", json=train_spec(resources={"gpus": 1}))
    assert resp.get_json()["queue"] == "gpu"
    assert len(queued_messages(redis_url, "gpu")) == 1 and not queued_messages(redis_url, "cpu")


def test_job_is_kept_when_the_broker_is_down(settings: Settings, auth_headers) -> None:  # type: ignore[no-untyped-def]
    from server.app import create_app

    dead = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    client = create_app(dead).test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = auth_headers["Authorization"]
    resp = client.post("/api/v1/jobs", json=train_spec())
    assert resp.status_code == 201
    job_id = resp.get_json()["id"]
    assert client.get(f"/api/v1/jobs/{job_id}").get_json()["state"] == "queued"


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (train_spec(learning_rate=0.1), "learning_rate"),
        (train_spec(model={"name": "vgg16"}), "model.name"),
        (train_spec(dataset={"name": "imagenet"}), "dataset.name"),
        (train_spec(optimizer={"name": "lamb", "lr": 0.1}), "optimizer.name"),
        (train_spec(epochs=0), "epochs"),
        (train_spec(optimizer={"name": "adam", "lr": -1}), "optimizer.lr"),
        (train_spec(optimizer={"name": "sgd", "lr": 0}), "optimizer.lr"),
        (
            train_spec(model={"name": "cnn", "params": {"activation": "swish"}}),
            "model.params.activation",
        ),
    ],
)
def test_bad_specs_are_422_naming_the_field(client, redis_url: str, spec: dict, field: str) -> None:  # type: ignore[no-untyped-def]
    resp = client.post("/api/v1/jobs", json=spec)
    assert resp.status_code == 422
    assert field in error_fields(resp)
    assert not queued_messages(redis_url)
    assert client.get("/api/v1/jobs").get_json()["jobs"] == []


def test_non_json_body(client) -> None:  # type: ignore[no-untyped-def]
    resp = client.post(
        "/api/v1/jobs", data="epochs=3", content_type="application/x-www-form-urlencoded"
    )
    assert resp.status_code == 415 and "Content-Type" in error_fields(resp)
    resp = client.post("/api/v1/jobs", data='{"kind": "train"}')  # no Content-Type at all
    assert resp.status_code == 415 and "Content-Type" in error_fields(resp)
    resp = client.post("/api/v1/jobs", data="{not json", content_type="application/json")
    assert resp.status_code == 400 and "body" in error_fields(resp)
    resp = client.post("/api/v1/jobs", json=[1, 2, 3])
    assert resp.status_code == 422 and "body" in error_fields(resp)


def test_body_over_the_size_limit(client, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    big = train_spec(name="x" * (settings.max_body_bytes + 10))
    resp = client.post("/api/v1/jobs", json=big)
    assert resp.status_code == 413 and "body" in error_fields(resp)


def test_evaluate_needs_an_existing_succeeded_train_job(client, db_url: str) -> None:  # type: ignore[no-untyped-def]
    resp = client.post("/api/v1/jobs", json=evaluate_spec(424242))
    assert resp.status_code == 422
    assert "does not exist" in error_fields(resp)["source_job_id"]

    queued = client.post("/api/v1/jobs", json=train_spec()).get_json()
    resp = client.post("/api/v1/jobs", json=evaluate_spec(queued["id"]))
    assert resp.status_code == 422
    assert "queued" in error_fields(resp)["source_job_id"]

    with transaction(db_url) as s:
        s.get(Job, queued["id"]).state = "succeeded"
        s.get(Job, queued["id"]).checkpoint_path = "/tmp/model.pt"
    ok = client.post("/api/v1/jobs", json=evaluate_spec(queued["id"]))
    assert ok.status_code == 201
    evaluation = ok.get_json()
    assert evaluation["kind"] == "evaluate" and evaluation["source_job_id"] == queued["id"]
    assert evaluation["model"] == "cnn" and evaluation["dataset"] == "digits"

    resp = client.post("/api/v1/jobs", json=evaluate_spec(evaluation["id"]))
    assert resp.status_code == 422 and "not a train job" in error_fields(resp)["source_job_id"]


def test_get_unknown_job_is_404(client) -> None:  # type: ignore[no-untyped-def]
    resp = client.get("/api/v1/jobs/999")
    assert resp.status_code == 404 and resp.get_json()["error"]["code"] == "not_found"
    assert client.post("/api/v1/jobs/999/cancel").status_code == 404
    assert client.get("/api/v1/nope").status_code == 404
    assert client.delete("/api/v1/jobs").status_code == 405


def test_list_filters_and_keyset_pagination(client) -> None:  # type: ignore[no-untyped-def]
    ids = [
        client.post("/api/v1/jobs", json=train_spec(name=f"j{i}")).get_json()["id"]
        for i in range(5)
    ]
    client.post(f"/api/v1/jobs/{ids[0]}/cancel")
    page1 = client.get("/api/v1/jobs?limit=2").get_json()
    assert [j["id"] for j in page1["jobs"]] == ids[::-1][:2]
    page2 = client.get(f"/api/v1/jobs?limit=2&before={page1['next_before']}").get_json()
    assert [j["id"] for j in page2["jobs"]] == ids[::-1][2:4]
    page3 = client.get(f"/api/v1/jobs?limit=2&before={page2['next_before']}").get_json()
    assert [j["id"] for j in page3["jobs"]] == [ids[0]] and page3["next_before"] is None
    cancelled = client.get("/api/v1/jobs?state=cancelled").get_json()["jobs"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    assert len(client.get("/api/v1/jobs?kind=train&state=queued").get_json()["jobs"]) == 4
    assert client.get("/api/v1/jobs?kind=evaluate").get_json()["jobs"] == []


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("state=done", "state"),
        ("kind=deploy", "kind"),
        ("limit=0", "limit"),
        ("limit=abc", "limit"),
        ("before=x", "before"),
    ],
)
def test_list_rejects_bad_parameters(client, query: str, field: str) -> None:  # type: ignore[no-untyped-def]
    resp = client.get(f"/api/v1/jobs?{query}")
    assert resp.status_code == 400 and field in error_fields(resp)


def test_cancel_queued_job_ends_it_at_once(client) -> None:  # type: ignore[no-untyped-def]
    job = client.post("/api/v1/jobs", json=train_spec()).get_json()
    resp = client.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert resp.status_code == 200 and resp.get_json()["state"] == "cancelled"
    again = client.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 200 and again.get_json()["state"] == "cancelled"


def test_cancel_finished_job_is_409(client, db_url: str) -> None:  # type: ignore[no-untyped-def]
    job = client.post("/api/v1/jobs", json=train_spec()).get_json()
    with transaction(db_url) as s:
        s.get(Job, job["id"]).state = "succeeded"
    resp = client.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert resp.status_code == 409 and resp.get_json()["error"]["code"] == "already_finished"


def test_metrics_series_and_downsampling(client, db_url: str) -> None:  # type: ignore[no-untyped-def]
    job = client.post("/api/v1/jobs", json=train_spec()).get_json()
    rows = [
        {
            "job_id": job["id"],
            "attempt": 1,
            "key": "step_loss",
            "step": i,
            "epoch": i // 100,
            "value": 1.0 / (i + 1),
            "wall_time": 0.0,
        }
        for i in range(1000)
    ] + [
        {
            "job_id": job["id"],
            "attempt": 1,
            "key": "val_loss",
            "step": e,
            "epoch": e,
            "value": 0.5,
            "wall_time": 0.0,
        }
        for e in (1, 2, 3)
    ]
    with transaction(db_url) as s:
        s.execute(insert(MetricPoint), rows)
    body = client.get(f"/api/v1/jobs/{job['id']}/metrics").get_json()
    assert set(body["series"]) == {"step_loss", "val_loss"}
    assert body["series"]["val_loss"]["step"] == [1, 2, 3]
    small = client.get(f"/api/v1/jobs/{job['id']}/metrics?keys=step_loss&max_points=100").get_json()
    series = small["series"]["step_loss"]
    assert set(small["series"]) == {"step_loss"}
    assert len(series["step"]) <= 100 and series["step"][0] == 0 and series["step"][-1] == 999
    assert series["step"] == sorted(series["step"])
    assert client.get(f"/api/v1/jobs/{job['id']}/metrics?max_points=1").status_code == 400

    assert client.get("/api/v1/jobs/999/metrics").status_code == 404


def test_metrics_of_a_diverged_run_are_valid_json(client, db_url: str) -> None:  # type: ignore[no-untyped-def]
    """A NaN point is not stored (SQLite cannot: it would fail every later batch), and a
    stored infinity goes out as null: the series stays valid JSON."""
    from shared.state_machine import claim_job
    from worker.metric_sink import MetricSink

    job = client.post("/api/v1/jobs", json=train_spec()).get_json()
    with transaction(db_url) as s:
        assert claim_job(s, job["id"], "w:1", 60)
    sink = MetricSink(db_url, job["id"], attempt=1)
    for step, value in enumerate([0.5, float("nan"), 2.0]):
        sink.log("val_loss", value, step=step, epoch=step)
    assert sink.flush() == 2
    with transaction(db_url) as s:
        s.execute(
            insert(MetricPoint),
            [{"job_id": job["id"], "attempt": 1, "key": "val_loss", "step": 3, "epoch": 3,
              "value": float("inf"), "wall_time": 0.0}],
        )  # fmt: skip
    resp = client.get(f"/api/v1/jobs/{job['id']}/metrics")
    text = resp.get_data(as_text=True)
    assert "NaN" not in text and "Infinity" not in text
    series = json.loads(text)["series"]["val_loss"]
    assert (series["step"], series["value"]) == ([0, 2, 3], [0.5, 2.0, None])


def test_registries(client) -> None:  # type: ignore[no-untyped-def]
    models = client.get("/api/v1/models").get_json()
    names = {m["name"] for m in models["models"]}
    assert names == {"mlp", "cnn", "resnet", "lstm", "gru", "transformer"}
    cnn = next(m for m in models["models"] if m["name"] == "cnn")
    assert cnn["params_schema"]["properties"]["hidden"]["minimum"] == 1 and cnn["inputs"] == [
        "image"
    ]
    recipe = models["train_spec_schema"]
    assert {"optimizer", "schedule", "loss", "early_stopping", "precision"} <= set(
        recipe["properties"]
    )
    datasets = {d["name"]: d for d in client.get("/api/v1/datasets").get_json()["datasets"]}
    assert {
        "digits",
        "iris",
        "wine",
        "breast_cancer",
        "mnist",
        "fashion_mnist",
        "cifar10",
        "csv",
    } <= set(datasets)
    digits = datasets["digits"]
    assert (
        digits["num_classes"] == 10
        and digits["input_shape"] == [1, 8, 8]
        and digits["splits"]["test"] == 360
    )
    assert datasets["synthetic_images"]["input_shape"] == [3, 32, 32]
    assert (
        datasets["mnist"]["available"] is False
        and "missing" in datasets["mnist"]["unavailable_reason"]
    )
    assert datasets["csv"]["params_schema"]["required"] == ["upload_id", "target"]


def test_file_datasets_are_checked_at_submission(client, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    from tests.data_files import write_cifar10, write_mnist

    spec = train_spec(dataset={"name": "mnist"}, model={"name": "mlp"})
    resp = client.post("/api/v1/jobs", json=spec)
    assert resp.status_code == 422 and "missing" in error_fields(resp)["dataset.name"]
    write_mnist(settings.resolved_data_dir / "mnist", n_train=30, n_test=12, gz=True)
    assert client.post("/api/v1/jobs", json=spec).status_code == 201
    mnist = next(
        d for d in client.get("/api/v1/datasets").get_json()["datasets"] if d["name"] == "mnist"
    )
    assert (
        mnist["available"] and mnist["input_shape"] == [1, 28, 28] and mnist["splits"]["test"] == 12
    )

    cifar = train_spec(
        dataset={"name": "cifar10"}, model={"name": "resnet", "params": {"depth": 8}}
    )
    assert client.post("/api/v1/jobs", json=cifar).status_code == 422
    write_cifar10(settings.resolved_data_dir, n_per_batch=4)
    assert client.post("/api/v1/jobs", json=cifar).status_code == 201


CSV = "area,rooms,city,price\n" + "".join(
    f"{50 + i},{1 + i % 4},{'ab'[i % 2]},{100 + 3 * i}\n" for i in range(40)
)


def test_csv_upload_then_train_spec(client, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    import io

    resp = client.post("/api/v1/uploads", data={"file": (io.BytesIO(CSV.encode()), "houses.csv")})
    assert resp.status_code == 201, resp.get_json()
    upload = resp.get_json()
    assert upload["rows"] == 40 and upload["filename"] == "houses.csv"
    assert [(c["name"], c["numeric"]) for c in upload["columns"]] == [
        ("area", True), ("rooms", True), ("city", False), ("price", True)
    ]  # fmt: skip
    # Kept in the compact typed form (shared/column_store.py), not as text.
    assert not (settings.uploads_dir / f"{upload['id']}.csv").exists()
    stored = read_column_file(settings.uploads_dir / f"{upload['id']}.cols")
    assert stored.rows == 40 and sorted(stored.labels("city")) == ["a", "b"]
    assert client.get(f"/api/v1/uploads/{upload['id']}").get_json() == upload

    regression = train_spec(
        model={"name": "mlp"},
        dataset={
            "name": "csv",
            "params": {"upload_id": upload["id"], "target": "price", "task": "regression"},
        },
    )
    job = client.post("/api/v1/jobs", json=regression)
    assert job.status_code == 201 and job.get_json()["spec"]["loss"]["name"] == "mse"
    classify = train_spec(
        model={"name": "mlp"},
        dataset={"name": "csv", "params": {"upload_id": upload["id"], "target": "city"}},
    )
    assert client.post("/api/v1/jobs", json=classify).status_code == 201
    bad = train_spec(
        model={"name": "mlp"},
        dataset={
            "name": "csv",
            "params": {"upload_id": upload["id"], "target": "city", "task": "regression"},
        },
    )
    resp = client.post("/api/v1/jobs", json=bad)
    assert resp.status_code == 422 and "not numeric" in error_fields(resp)["dataset.params.target"]

    raw = client.post("/api/v1/uploads?filename=raw.csv", data=CSV, content_type="text/csv")
    assert raw.status_code == 201 and raw.get_json()["filename"] == "raw.csv"


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"", "text/csv", 422),
        (b"a,b\n1,2,3\n", "text/csv", 422),
        (b"a,a\n1,2\n", "text/csv", 422),
        (b"a,b\n", "text/csv", 422),
        (b"\xff\xfe\x00bad", "text/csv", 422),
        (b"a,b\n1,2\n", "application/json", 415),
    ],
)
def test_bad_uploads_name_the_file_field(
    client, body: bytes, content_type: str, status: int
) -> None:  # type: ignore[no-untyped-def]
    resp = client.post("/api/v1/uploads", data=body, content_type=content_type)
    # A refused Content-Type (415) names the header; a bad file (422) names `file`.
    field = "Content-Type" if status == 415 else "file"
    assert resp.status_code == status and field in error_fields(resp)


def test_upload_size_limit(settings: Settings, auth_headers) -> None:  # type: ignore[no-untyped-def]
    from server.app import create_app

    client = create_app(settings.model_copy(update={"max_upload_bytes": 2048})).test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = auth_headers["Authorization"]
    resp = client.post("/api/v1/uploads", data=CSV * 20, content_type="text/csv")
    assert resp.status_code == 413 and "2048" in error_fields(resp)["body"]
    assert client.get("/api/v1/uploads/1").status_code == 404


def test_evaluate_dataset_must_be_compatible(client, db_url: str) -> None:  # type: ignore[no-untyped-def]
    source = client.post("/api/v1/jobs", json=train_spec()).get_json()
    with transaction(db_url) as s:
        s.get(Job, source["id"]).state = "succeeded"
        s.get(Job, source["id"]).checkpoint_path = "/tmp/ckpt"
    other = evaluate_spec(
        source["id"],
        dataset={
            "name": "synthetic_images",
            "params": {"channels": 1, "height": 8, "width": 8, "num_classes": 3},
        },
    )
    resp = client.post("/api/v1/jobs", json=other)
    assert resp.status_code == 422 and "classes" in error_fields(resp)["dataset.name"]
    shape = evaluate_spec(source["id"], dataset={"name": "synthetic_images"})
    resp = client.post("/api/v1/jobs", json=shape)
    assert resp.status_code == 422 and "shape" in error_fields(resp)["dataset.name"]
    ok = evaluate_spec(
        source["id"],
        dataset={"name": "synthetic_images", "params": {"channels": 1, "height": 8, "width": 8}},
    )
    assert client.post("/api/v1/jobs", json=ok).status_code == 201
    bad_params = evaluate_spec(
        source["id"], dataset={"name": "synthetic_images", "params": {"channels": 99}}
    )
    resp = client.post("/api/v1/jobs", json=bad_params)
    assert resp.status_code == 422 and "dataset.params.channels" in error_fields(resp)


def test_healthz(client) -> None:  # type: ignore[no-untyped-def]
    body = client.get("/healthz").get_json()
    assert body == {"status": "ok", "database": "ok", "broker": "ok"}


def test_healthz_reports_a_dead_broker(settings: Settings) -> None:
    from server.app import create_app

    client = create_app(
        settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    ).test_client()
    resp = client.get("/healthz")
    assert resp.status_code == 503 and resp.get_json()["broker"].startswith("error")
