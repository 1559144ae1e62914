"""`trainyard serve` (worker/serving/) as a real process over real HTTP: tiny models
trained here (an MLP on iris, a CNN on digits, an export of the MLP), registered in a
SQLite database, served by `trainyard serve` subprocesses against the same database,
artifacts and Redis.

Checked: predictions equal the model's own forward pass on the same inputs through the
training normalization (arrays, named rows, PNG images, an exported state_dict); bad
shapes, types, a missing field, a bad PNG are 4xx naming the field; no token 401,
another user's model 404; a version moved to production is served without a restart;
concurrent requests share forward passes (stats and the Models page show batches over
one row); a full queue answers 503 with Retry-After.
"""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from server.cli.local.embedded_redis import free_port
from shared import accounts, job_files
from shared import model_registry as registry
from shared.artifact_store import store_for
from shared.db import get_engine, session_factory, transaction
from shared.orm import Base, Job
from shared.settings import Settings
from tests.conftest import settings_env
from tests.derive_helpers import CNN, CPU, DIGITS, PATHS, train_spec
from tests.job_rows import add_jobs
from worker.training import ListSink, train_job
from worker.training.data.preprocess import apply_stats
from worker.training.export import export_model, model_card
from worker.training.model_file import load_model_file
from worker.training.models import build_model

REPO = Path(__file__).resolve().parents[1]
IRIS = {"name": "iris"}
MLP = {"name": "mlp", "params": {"hidden": 16, "layers": 1}}
IRIS_FEATURES = ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"]
IRIS_ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5], [4.4, 2.9, 1.4, 0.2]]


@dataclass
class World:
    settings: Settings
    url: str  # the main serve process
    tight_url: str  # a second one: queue of 1, long batching wait
    alice: str
    bob: str
    admin: str
    alice_id: int
    iris_v1: Path  # best.pt files, to compute the expected outputs here
    iris_v2: Path
    digits: Path
    iris_v2_job: int


def _train(
    directory: Path, model: dict[str, Any], dataset: dict[str, Any], epochs: int, seed: int
) -> Path:
    spec = train_spec(model, dataset, epochs).model_copy(update={"seed": seed})
    train_job(spec, CPU, ListSink(), directory, paths=PATHS)
    return directory / "best.pt"


def _job(settings: Settings, owner: int, kind: str = "train") -> tuple[int, Path]:
    spec = None if kind == "train" else {"kind": kind, "tags": [], "source_job_id": 1}
    [job_id] = add_jobs(settings.resolved_database_url,
                        [{"owner": owner, "kind": kind, "state": "succeeded", "spec": spec}])  # fmt: skip
    directory = job_files.job_dir(settings, job_id) / "attempt-1"
    directory.mkdir(parents=True)
    with transaction(settings.resolved_database_url) as s:
        s.get(Job, job_id).checkpoint_path = str(directory)
    return job_id, directory


def _export(best: Path, directory: Path) -> None:
    """An export job's files (state_dict.pt + model_card.json) of the model in `best`."""
    loaded = load_model_file(best)
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    x = apply_stats(torch.tensor(IRIS_ROWS, dtype=torch.float32), loaded.stats)
    card = model_card(ckpt["spec"], loaded.info, loaded.stats, {})
    export_model(loaded.model, x, directory, card, ["state_dict"], 1e-4,
                 rebuild=lambda: build_model(loaded.train_spec.model, loaded.info))  # fmt: skip


def _promote(settings: Settings, user_id: int, name: str, job_id: int, stage: str) -> None:
    with session_factory(settings.resolved_database_url)() as s:
        registry.promote(s, store_for(settings), registry.Actor(user_id, False), name, job_id,
                         stage=stage)  # fmt: skip


def _start(settings: Settings, log: Path, **env: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    full = {**settings_env(settings), **env}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--threads", "16"],
            env=full, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    return proc, f"http://127.0.0.1:{port}"


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):
            pass
        time.sleep(0.1)
    raise AssertionError(f"serve did not start:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, redis_server: str) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("serving")
    db_url = f"sqlite:///{tmp / 'trainyard.db'}"
    Base.metadata.create_all(get_engine(db_url))
    settings = Settings(home=tmp / "home", database_url=db_url, redis_url=redis_server,
                        artifacts_dir=tmp / "artifacts", torch_threads=1)  # fmt: skip
    tokens, ids = {}, {}
    with transaction(db_url) as s:
        for name, role in (("alice", "member"), ("bob", "member"), ("root", "admin")):
            user = accounts.create_user(s, name, role)
            tokens[name] = accounts.create_token(s, user, "tests").secret
            ids[name] = user.id
    alice = ids["alice"]

    iris1, d1 = _job(settings, alice)
    iris2, d2 = _job(settings, alice)
    digits, d3 = _job(settings, alice)
    export, d4 = _job(settings, alice, "export")
    v1 = _train(d1, MLP, IRIS, epochs=2, seed=0)
    v2 = _train(d2, MLP, IRIS, epochs=4, seed=1)
    cnn = _train(d3, CNN, DIGITS, epochs=1, seed=0)
    _export(v1, d4)
    _promote(settings, alice, "iris", iris1, "production")
    _promote(settings, alice, "digits", digits, "production")
    _promote(settings, alice, "iris-export", export, "production")

    common = {"TRAINYARD_SERVE_RESOLVE_SECONDS": "0.5", "TRAINYARD_SERVE_STATS_SECONDS": "0.5"}
    main_log, tight_log = tmp / "serve.log", tmp / "serve-tight.log"
    main, url = _start(settings, main_log, TRAINYARD_SERVE_MAX_WAIT_MS="30", **common)
    tight, tight_url = _start(settings, tight_log, TRAINYARD_SERVE_QUEUE_LIMIT="1",
                              TRAINYARD_SERVE_MAX_WAIT_MS="1500", **common)  # fmt: skip
    try:
        _wait_healthy(main, url, main_log)
        _wait_healthy(tight, tight_url, tight_log)
        yield World(settings, url, tight_url, tokens["alice"], tokens["bob"], tokens["root"],
                    alice, v1, v2, cnn, iris2)  # fmt: skip
    finally:
        for proc in (main, tight):
            proc.terminate()
        for proc in (main, tight):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def post(
    world: World, path: str, body: Any, token: str | None = "alice", base: str | None = None
) -> requests.Response:
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {getattr(world, token, token)}"
    return requests.post(f"{base or world.url}{path}", json=body, headers=headers, timeout=30)


def expected_probabilities(best: Path, raw: np.ndarray) -> np.ndarray:
    loaded = load_model_file(best)
    x = apply_stats(torch.tensor(raw, dtype=torch.float32), loaded.stats)
    with torch.inference_mode():
        return torch.softmax(loaded.model(x), dim=1).numpy()


def png(pixels: np.ndarray, mode: str = "L") -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode=mode).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def probabilities(resp: requests.Response) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    return np.array([p["probabilities"] for p in resp.json()["predictions"]])


# ---------------------------------------------------------------- predictions


def test_predictions_equal_the_models_own_forward_pass(world: World) -> None:
    want = expected_probabilities(world.iris_v1, np.array(IRIS_ROWS))
    resp = post(world, "/api/v1/models/iris/predict", {"inputs": IRIS_ROWS})
    body = resp.json()
    assert (body["model"], body["version"]) == ("iris", 1), body
    np.testing.assert_allclose(probabilities(resp), want, atol=1e-5)
    assert [p["class"] for p in body["predictions"]] == want.argmax(1).tolist()
    # Named rows (the feature names of sklearn's iris), any key order.
    rows = [dict(reversed(list(zip(IRIS_FEATURES, r, strict=True)))) for r in IRIS_ROWS]
    np.testing.assert_allclose(
        probabilities(post(world, "/api/v1/models/iris/predict", {"rows": rows})), want, atol=1e-5
    )
    # The same version by number; an export's state_dict.pt + model_card.json.
    by_number = post(world, "/api/v1/models/iris/versions/1/predict", {"inputs": IRIS_ROWS})
    np.testing.assert_allclose(probabilities(by_number), want, atol=1e-5)
    exported = post(world, "/api/v1/models/iris-export/predict", {"inputs": IRIS_ROWS})
    np.testing.assert_allclose(probabilities(exported), want, atol=1e-5)

    # Digits: flat and nested arrays of the raw pixels (0..16), and PNG images whose
    # 0..255 map onto that range.
    from sklearn.datasets import load_digits

    raw = load_digits().images[:5].astype(np.float32)  # (5, 8, 8), 0..16
    want = expected_probabilities(world.digits, raw[:, None])
    flat = post(world, "/api/v1/models/digits/predict", {"inputs": raw.reshape(5, 64).tolist()})
    nested = post(world, "/api/v1/models/digits/predict", {"inputs": raw[:, None].tolist()})
    np.testing.assert_allclose(probabilities(flat), want, atol=1e-5)
    np.testing.assert_allclose(probabilities(nested), want, atol=1e-5)
    pixels = np.round(raw * 255 / 16)
    want_png = expected_probabilities(world.digits, (pixels * np.float32(16 / 255))[:, None])
    images = post(world, "/api/v1/models/digits/predict", {"images": [png(p) for p in pixels]})
    np.testing.assert_allclose(probabilities(images), want_png, atol=1e-5)


@pytest.mark.parametrize(
    ("model", "body", "status", "field", "words"),
    [
        ("iris", {"inputs": [[1, 2, 3, 4], [1, 2, 3]]}, 422, "inputs.1", "expected 4 numbers, got 3"),
        ("iris", {"inputs": [[1, 2, "x", 4]]}, 422, "inputs.0.2", "expected a number, got a string"),
        ("iris", {"inputs": [[1, 2, True, 4]]}, 422, "inputs.0.2", "got a boolean"),
        ("iris", {"inputs": []}, 422, "inputs", "at least one row"),
        ("iris", {"inputs": 5}, 422, "inputs", "expected an array of rows"),
        ("iris", {}, 422, "inputs", "required: send one of inputs, rows"),
        ("iris", {"input": [[1, 2, 3, 4]]}, 422, "input", "unknown field"),
        ("iris", {"images": ["x"]}, 422, "images", "not images"),
        ("iris", {"rows": [{"sepal length (cm)": 1}]}, 422, "rows.0.sepal width (cm)", "missing"),
        ("iris", {"rows": [dict.fromkeys([*IRIS_FEATURES, "x"], 1.0)]}, 422, "rows.0.x", "unknown feature"),
        ("iris", [1, 2], 400, "body", "expected an object"),
        ("digits", {"inputs": [list(range(63))]}, 422, "inputs.0", "expected 64 numbers, got 63"),
        ("digits", {"inputs": [[[[0] * 8] * 7]]}, 422, "inputs.0.0", "expected 8 arrays, got 7"),
        ("digits", {"images": ["not base64!"]}, 422, "images.0", "not base64"),
        ("digits", {"images": [base64.b64encode(b"GIF89a....").decode()]}, 422, "images.0", "not a readable PNG"),
        ("digits", {"images": [png(np.zeros((9, 8)))]}, 422, "images.0", "8x9 pixels; the model takes 8x8"),
        ("digits", {"images": [png(np.zeros((8, 8, 3)), "RGB")]}, 422, "images.0", "grayscale"),
    ],
)  # fmt: skip
def test_bad_inputs_are_4xx_naming_the_field(
    world: World, model: str, body: Any, status: int, field: str, words: str
) -> None:
    resp = post(world, f"/api/v1/models/{model}/predict", body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert words in error["fields"][field], error


def test_not_json_and_tokens_and_ownership(world: World) -> None:
    path = "/api/v1/models/iris/predict"
    raw = requests.post(f"{world.url}{path}", data=b"{nope",
                        headers={"Authorization": f"Bearer {world.alice}"}, timeout=10)  # fmt: skip
    assert raw.status_code == 400 and "body" in raw.json()["error"]["fields"]
    anonymous = post(world, path, {"inputs": IRIS_ROWS}, token=None)
    assert anonymous.status_code == 401 and "Authorization" in anonymous.json()["error"]["fields"]
    assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
    assert post(world, path, {"inputs": IRIS_ROWS}, token="ty_not-a-token").status_code == 401
    # Bob's view of alice's model is the same as of a missing one.
    theirs = post(world, path, {"inputs": IRIS_ROWS}, token="bob")
    missing = post(world, "/api/v1/models/nope/predict", {"inputs": IRIS_ROWS}, token="bob")
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["error"]["fields"] == {"name": "no model named 'iris'"}
    assert post(world, path, {"inputs": IRIS_ROWS}, token="admin").status_code == 200
    staging = post(world, f"{path}?stage=staging", {"inputs": IRIS_ROWS})
    assert staging.status_code == 404 and "stage" in staging.json()["error"]["fields"]
    assert post(world, f"{path}?stage=archived", {"inputs": IRIS_ROWS}).status_code == 422
    assert (
        post(world, "/api/v1/models/iris/versions/9/predict", {"inputs": IRIS_ROWS}).status_code
        == 404
    )
    assert requests.get(f"{world.url}/api/v1/serve/stats", timeout=10).status_code == 401


# ---------------------------------------------------------------- hot swap


def test_a_version_moved_to_production_is_served_without_a_restart(world: World) -> None:
    path = "/api/v1/models/iris/predict"
    assert post(world, path, {"inputs": IRIS_ROWS}).json()["version"] == 1
    _promote(world.settings, world.alice_id, "iris", world.iris_v2_job, "production")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        resp = post(world, path, {"inputs": IRIS_ROWS})
        if resp.json()["version"] == 2:
            break
        time.sleep(0.2)
    assert resp.json()["version"] == 2, "the new production version was not picked up"
    want = expected_probabilities(world.iris_v2, np.array(IRIS_ROWS))
    np.testing.assert_allclose(probabilities(resp), want, atol=1e-5)
    # The archived version still answers by number.
    assert (
        post(world, "/api/v1/models/iris/versions/1/predict", {"inputs": IRIS_ROWS}).status_code
        == 200
    )


# ---------------------------------------------------------------- batching


def test_concurrent_requests_share_forward_passes(world: World) -> None:
    from sklearn.datasets import load_digits

    raw = load_digits().images[:32].astype(np.float32).reshape(32, 64)
    want = expected_probabilities(world.digits, raw.reshape(32, 1, 8, 8))
    barrier = threading.Barrier(32)

    def one(i: int) -> np.ndarray:
        barrier.wait()
        return probabilities(
            post(world, "/api/v1/models/digits/predict", {"inputs": [raw[i].tolist()]})
        )[0]

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, range(32)))
    # Each request got its own row back, however it was batched.
    np.testing.assert_allclose(np.array(got), want, atol=1e-5)

    stats = requests.get(f"{world.url}/api/v1/serve/stats",
                         headers={"Authorization": f"Bearer {world.alice}"}, timeout=10).json()  # fmt: skip
    batches = stats["models"]["digits"]["versions"]["1"]["batches"]
    assert batches["max_rows"] > 1, batches
    assert stats["models"]["digits"]["versions"]["1"]["requests"] >= 32
    # Bob sees nothing of alice's models.
    theirs = requests.get(f"{world.url}/api/v1/serve/stats",
                          headers={"Authorization": f"Bearer {world.bob}"}, timeout=10).json()  # fmt: skip
    assert theirs["models"] == {} and theirs["loaded"] == []

    # The same figures for Prometheus (admins and the scrape token only).
    from prometheus_client.parser import text_string_to_metric_families

    scraped = requests.get(f"{world.url}/metrics", headers={"Authorization": f"Bearer {world.admin}"}, timeout=10)  # fmt: skip
    assert scraped.status_code == 200, scraped.text
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(scraped.text) for s in f.samples}  # fmt: skip
    v1 = (("model", "digits"), ("version", "1"))
    assert got[("trainyard_serve_requests_total", (*v1[:1], ("status", "200"), v1[1]))] >= 32
    assert got[("trainyard_serve_batch_size_count", v1)] >= batches["forward_passes"]
    assert got[("trainyard_serve_request_duration_seconds_count", v1)] >= 32
    member = requests.get(f"{world.url}/metrics", headers={"Authorization": f"Bearer {world.bob}"}, timeout=10)  # fmt: skip
    assert member.status_code == 403

    # Published to Redis, and shown on the model's page in the web UI.
    from server.app import create_app
    from tests.test_authorization import session_client

    app = create_app(world.settings, {"TESTING": True})
    alice = SimpleNamespace(id=world.alice_id)
    browser = session_client(app, world.settings.resolved_database_url, alice)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        page = browser.get("/registry/digits").get_data(as_text=True)
        if 'id="serving-table"' in page and 'class="serving-row" data-version="1"' in page:
            break
        time.sleep(0.3)
    assert 'id="serving-table"' in page, page[-2000:]


def test_a_full_queue_answers_503_with_retry_after(world: World) -> None:
    path = "/api/v1/models/iris/versions/1/predict"
    body = {"inputs": IRIS_ROWS[:1]}
    # The first request loads the model, then waits 1.5 s in the queue for company.
    assert post(world, path, body, base=world.tight_url).status_code == 200
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, world, path, body, "alice", world.tight_url)
        time.sleep(0.5)  # the first one is waiting in the queue (a limit of 1)
        second = post(world, path, body, base=world.tight_url)
        assert first.result().status_code == 200
    assert second.status_code == 503, second.text
    assert second.headers["Retry-After"] == "1"
    assert second.json()["error"]["code"] == "overloaded"
