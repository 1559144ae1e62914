"""Property-based fuzzing of the whole API with schemathesis, from its own OpenAPI document.

The app runs on a real socket (`live_server`) with real Redis and a real database
(PostgreSQL when the suite has it: it is the strict one about NUL bytes and BIGINT
range; else SQLite). The fuzzer is authenticated as alice, a member, and the main
endpoints are pointed at objects she owns (a succeeded job with metrics, a log and a
checkpoint; an upload; a spare token), so their 200 paths run, not only the 404s.

Every response must: not be a 5xx; have a documented status, Content-Type and headers;
and match its documented schema. A request that breaks the schema must be refused
(except a job spec: see test_api_fuzz). The budget is fixed (examples per operation,
derandomized generation, no shrinking, no stateful phase), so the run is reproducible
and takes well under a minute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from schemathesis.config import CoveragePhaseConfig, OperationConfig, PhasesConfig
from schemathesis.filters import FilterSet
from schemathesis.specs.openapi.checks import negative_data_rejection

from server.params import MAX_ID
from shared import accounts, job_files
from shared.db import transaction, utcnow
from shared.orm import Job, MetricPoint, User
from shared.settings import Settings
from tests.conftest import DB_PARAMS
from tests.helpers import train_spec

if TYPE_CHECKING:
    from tests.conftest import TestUsers

FUZZ_DB = "postgresql" if "postgresql" in DB_PARAMS else "sqlite"
# Random cases per operation, on top of the deterministic coverage phase (every
# operation's boundary and negative cases): the suite's 15-minute budget sets it.
EXAMPLES_PER_OPERATION = 15
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "negative_data_rejection",
]
ARTIFACT = "attempt-1/best.pt"
CSV = "x1,x2,label\n" + "".join(f"{i / 10},{i % 3},{'ab'[i % 2]}\n" for i in range(12))

# Raw CSV bodies: mostly real tables (the 201 path), sometimes anything at all.
_cell = st.one_of(st.integers(-1000, 1000).map(str), st.sampled_from(["a", "b", ""]))
_csv_table = st.integers(min_value=1, max_value=4).flatmap(
    lambda width: st.lists(
        st.lists(_cell, min_size=width, max_size=width), min_size=0, max_size=15
    ).map(
        lambda rows: (
            ",".join(f"c{i}" for i in range(width))
            + "\n"
            + "".join(",".join(r) + "\n" for r in rows)
        ).encode()
    )
)
schemathesis.openapi.media_type(
    "text/csv", st.one_of(_csv_table, st.binary(max_size=200)), aliases=["text/plain"]
)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # The fuzzer submits hundreds of jobs in a minute; the per-user limits (still
    # documented as 429s) would otherwise end the 201 paths after the first 120.
    return settings.model_copy(
        update={"submit_rate_limit": "100000/minute", "max_queued_per_user": 100_000}
    )


@dataclass(frozen=True)
class Seeded:
    job_id: int  # alice's succeeded train job: metrics, a log, a checkpoint
    upload_id: int
    token_id: int  # a spare token of alice's, for DELETE
    own_token_id: int  # the token the fuzzer authenticates with: never to be revoked


@pytest.fixture
def seeded(live_server: str, users: TestUsers, settings: Settings, db_url: str) -> Seeded:
    api = f"{live_server}/api/v1"
    headers = users.alice.headers
    upload = requests.post(
        f"{api}/uploads?filename=seed.csv",
        data=CSV,
        headers={**headers, "Content-Type": "text/csv"},
        timeout=10,
    )
    assert upload.status_code == 201, upload.text
    job = requests.post(f"{api}/jobs", json=train_spec(), headers=headers, timeout=10)
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]

    checkpoint = job_files.job_dir(settings, job_id) / ARTIFACT
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"not really a checkpoint")
    job_files.log_path(settings, job_id).write_text("epoch 1 train_loss=0.5\nepoch 2 done\n")
    with transaction(db_url) as session:
        row = session.get(Job, job_id)
        assert row is not None
        row.state, row.attempt = "succeeded", 1
        row.started_at = row.finished_at = utcnow()
        row.checkpoint_path = str(checkpoint)
        row.progress = {"epoch": 3, "step": 30}
        row.result = {"metrics": {"val_accuracy": 0.9, "val_loss": 0.3}}
        session.add_all(
            MetricPoint(job_id=job_id, attempt=1, key=key, step=step, epoch=step // 10,
                        value=1.0 / (step + 1), wall_time=float(step))
            for key in ("val_loss", "train_loss")
            for step in range(30)
        )  # fmt: skip
        alice = session.get(User, users.alice.id)
        assert alice is not None
        spare = accounts.create_token(session, alice, "spare").token
        session.flush()
        token_id = spare.id
    tokens = requests.get(f"{api}/tokens", headers=headers, timeout=10).json()["tokens"]
    [own_token_id] = [
        t["id"]
        for t in tokens
        if t["name"] == "tests" and users.alice.token.startswith(t["prefix"])
    ]
    return Seeded(
        job_id=job_id, upload_id=upload.json()["id"], token_id=token_id, own_token_id=own_token_id
    )


@pytest.fixture
def api_schema(live_server: str, users: TestUsers, seeded: Seeded) -> Any:
    loaded = schemathesis.openapi.from_url(f"{live_server}/api/v1/openapi.json", timeout=10)
    config = loaded.config
    config.update(base_url=live_server, headers=users.alice.headers, request_timeout=10)
    config.generation.update(
        max_examples=EXAMPLES_PER_OPERATION,
        deterministic=True,  # the same cases every run
        no_shrink=True,  # a failure is reported as found; shrinking costs minutes
        with_security_parameters=False,  # the bearer token above, not generated ones
        allow_x00=True,  # NUL bytes in strings: PostgreSQL refuses them in text
    )
    config.phases.update(phases=["examples", "coverage", "fuzzing"])
    # The estimate takes POST /api/v1/jobs's body schema and checks it with the same
    # code (server/submission.py): the coverage phase's ~2,700 cases for that schema
    # run once, on POST /api/v1/jobs; the estimate keeps the examples and fuzzing.
    estimate = FilterSet()
    estimate.include(name="POST /api/v1/jobs/estimate")
    config.operations.operations.append(
        OperationConfig(filter_set=estimate,
                        phases=PhasesConfig(coverage=CoveragePhaseConfig(enabled=False)))
    )  # fmt: skip
    config.checks.update(included_check_names=CHECKS)
    return loaded


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    # schemathesis 4.32's lazy schemas read and relabel `Item._nodeid`, which pytest 9.2
    # no longer has (the id lives in `_id`); give it one to read. Labels are cosmetic.
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


def _point_at_seeded(case: Any, seeded: Seeded) -> None:
    """Aim most ids at alice's objects so the 200 paths run; some stay random (404s).

    Only a generated id that is itself valid is replaced: a negative case whose id was
    the mutation must stay negative.
    """
    targets = {"job_id": seeded.job_id, "upload_id": seeded.upload_id,
               "token_id": seeded.token_id}  # fmt: skip
    params = case.path_parameters or {}
    generated = dict(params)
    for name, target in targets.items():
        value = generated.get(name)
        if isinstance(value, int) and 1 <= value <= MAX_ID and value % 4 != 0:
            params[name] = target
    if str(generated.get("token_id", "")).strip().lstrip("0") == str(seeded.own_token_id):
        # Revoking the fuzzer's own token would turn the rest of the run into 401s.
        params["token_id"] = seeded.token_id
    job_id = generated.get("job_id")
    if "name" in params and isinstance(job_id, int) and job_id % 2:
        params["name"] = ARTIFACT
    body = case.body
    if isinstance(body, dict) and body.get("kind") == "evaluate":
        source = body.get("source_job_id")
        if isinstance(source, int) and 1 <= source <= MAX_ID and source % 2:
            body["source_job_id"] = seeded.job_id


@pytest.mark.parametrize("db_url", [FUZZ_DB], indirect=True)
@schema.parametrize()
@hypothesis_settings(
    max_examples=EXAMPLES_PER_OPERATION,
    derandomize=True,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_api_fuzz(case: Any, seeded: Seeded) -> None:
    _point_at_seeded(case, seeded)
    excluded: list[Any] = []
    if case.operation.label in ("POST /api/v1/jobs", "POST /api/v1/jobs/estimate"):
        # The JobSpec models validate in pydantic's lax mode, which converts what the
        # schema's types do not allow (`"gpus": false` is taken as 0), so a negative case
        # is sometimes accepted. Every other operation must refuse its negative cases.
        excluded.append(negative_data_rejection)
    case.call_and_validate(excluded_checks=excluded)


# ---------------------------------------------------------------- inputs found by hand

# What the fuzzer reaches only by luck (a NUL inside an otherwise valid spec) or not
# at all (a 100,000-deep body); each was a 500 on PostgreSQL before params.py refused it.
NESTED = '{"a":' * 40 + "1" + "}" * 40
EDGE_INPUTS: list[tuple[str, str, dict[str, Any], int, str]] = [
    ("GET", "/api/v1/jobs?model=a%00b", {}, 400, "model"),
    ("GET", "/api/v1/jobs?owner=%00", {}, 400, "owner"),
    ("GET", "/api/v1/jobs/1/metrics?keys=a%00b", {}, 400, "keys"),
    ("POST", "/api/v1/uploads?filename=a%00.csv", {"data": CSV, "content_type": "text/csv"}, 400,
     "filename"),
    ("GET", "/api/v1/jobs/99999999999999999999", {}, 404, "job_id"),
    ("GET", f"/api/v1/jobs/{2**63}/logs", {}, 404, "job_id"),
    ("DELETE", "/api/v1/tokens/99999999999999999999", {}, 404, "token_id"),
    ("GET", "/api/v1/uploads/99999999999999999999", {}, 404, "upload_id"),
    ("POST", "/api/v1/jobs", {"json": train_spec(name="a\x00b")}, 422, "name"),
    ("POST", "/api/v1/jobs", {"json": train_spec(tags=["ok", "\x00"])}, 422, "tags.1"),
    ("POST", "/api/v1/jobs", {"data": '{"kind": "train", "name": "\\ud800"}'}, 422, "name"),
    ("POST", "/api/v1/jobs", {"json": {"kind": "evaluate", "source_job_id": 10**20}}, 422,
     "source_job_id"),
    ("POST", "/api/v1/jobs", {"json": train_spec(dataset={"name": "csv", "params": {
        "upload_id": 10**20, "target": "y"}})}, 422, "dataset.params.upload_id"),
    ("POST", "/api/v1/jobs", {"data": '{"kind": "train", "early_stopping": {"min_delta": 1e999}}'},
     422, "early_stopping.min_delta"),
    ("POST", "/api/v1/jobs", {"data": '{"kind": "train", "epochs": NaN}'}, 400, "body"),
    ("POST", "/api/v1/jobs", {"data": "[" * 100_000}, 400, "body"),
    ("POST", "/api/v1/jobs", {"data": '{"kind": "evaluate", "source_job_id": 1, "dataset": '
     '{"params": ' + NESTED + "}}"}, 422, "dataset.params" + ".a" * 31),
    ("POST", "/api/v1/tokens", {"json": {"name": "\x00"}}, 422, "name"),
    ("POST", "/api/v1/tokens", {"json": []}, 422, "body"),
    ("POST", "/api/v1/tokens", {"data": "name=x", "content_type": "application/x-www-form-urlencoded"},
     415, "Content-Type"),
    ("POST", "/api/v1/uploads", {"data": CSV, "content_type": "application/json"}, 415,
     "Content-Type"),
]  # fmt: skip


@pytest.mark.parametrize("db_url", [FUZZ_DB], indirect=True)
@pytest.mark.parametrize(("method", "url", "kwargs", "status", "field"), EDGE_INPUTS)
def test_edge_inputs_are_4xx_naming_the_field(  # type: ignore[no-untyped-def]
    client, method: str, url: str, kwargs: dict[str, Any], status: int, field: str
) -> None:
    if "data" in kwargs and "content_type" not in kwargs:
        kwargs = {**kwargs, "content_type": "application/json"}
    resp = client.open(url, method=method, **kwargs)
    assert resp.status_code == status, resp.get_data(as_text=True)[:500]
    error = resp.get_json()["error"]
    assert set(error) == {"code", "message", "fields"}
    assert field in error["fields"], error
