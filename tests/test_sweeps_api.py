"""The sweeps API: creating a sweep validates every point of its space before anything
runs (422 naming the parameter), ownership like jobs, cancel and resume; the
controller's pass creates its trials, which the sweep then lists."""

from __future__ import annotations

from typing import Any

from flask import Flask

from shared.settings import Settings
from shared.sweep_controller import tick
from tests.conftest import TestUsers, as_user
from tests.helpers import train_spec


def grid(**overrides: Any) -> dict[str, Any]:
    return {
        "name": "lr x batch",
        "base": train_spec(epochs=3),
        "space": {"optimizer.lr": "choice([0.001, 0.01])", "batch_size": "choice([16, 32])"},
        "method": "grid",
        "metric": "val_accuracy",
        "parallelism": 2,
        **overrides,
    }


def test_create_read_list_cancel_resume(app: Flask, users: TestUsers, settings: Settings) -> None:
    alice = as_user(app, users.alice)
    got = alice.post("/api/v1/sweeps", json=grid())
    assert got.status_code == 201, got.json
    sweep = got.json
    assert (sweep["state"], sweep["max_trials"], sweep["direction"]) == ("running", 4, "max")
    assert sweep["trials"] == [] and sweep["best"] is None
    assert got.headers["Location"] == f"/api/v1/sweeps/{sweep['id']}"
    report = tick(settings, sweep["id"], "test", lambda job: None)
    assert report.created == [0, 1]
    detail = alice.get(f"/api/v1/sweeps/{sweep['id']}").json
    assert [t["number"] for t in detail["trials"]] == [0, 1]
    assert detail["counts"]["queued"] == 2
    listed = alice.get("/api/v1/sweeps").json["sweeps"]
    assert [s["id"] for s in listed] == [sweep["id"]]
    # Trials are the owner's jobs, tagged with their sweep.
    jobs = alice.get(f"/api/v1/jobs?tag=sweep-{sweep['id']}").json["jobs"]
    assert len(jobs) == 2
    bob = as_user(app, users.bob)
    assert bob.get(f"/api/v1/sweeps/{sweep['id']}").status_code == 404
    assert bob.post(f"/api/v1/sweeps/{sweep['id']}/cancel").status_code == 404
    assert bob.get("/api/v1/sweeps").json["sweeps"] == []
    cancelled = alice.post(f"/api/v1/sweeps/{sweep['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json["state"] == "cancelled"
    assert cancelled.json["counts"]["cancelled"] == 2
    assert alice.post(f"/api/v1/sweeps/{sweep['id']}/cancel").status_code == 409
    resumed = alice.post(f"/api/v1/sweeps/{sweep['id']}/resume")
    assert resumed.status_code == 200 and resumed.json["state"] == "running"
    assert alice.post(f"/api/v1/sweeps/{sweep['id']}/resume").status_code == 409
    admin = as_user(app, users.admin)
    assert [s["id"] for s in admin.get("/api/v1/sweeps?all=true").json["sweeps"]] == [sweep["id"]]
    assert alice.get("/api/v1/sweeps?all=true").status_code == 403


def test_an_invalid_space_is_refused_naming_the_parameter(app: Flask, users: TestUsers) -> None:
    alice = as_user(app, users.alice)
    cases = [
        ({"space": {"optimizer.lr": "loguniform(1e-4, 100)"}, "method": "random",
          "max_trials": 4}, "space.optimizer.lr"),
        ({"space": {"model.params.layers": "int(0, 3)"}, "method": "random", "max_trials": 4,
          "base": train_spec(model={"name": "mlp"})}, "space.model.params.layers"),
        ({"space": {"optimizer.lr": "uniform(0.1, 0.2)"}}, "space.optimizer.lr"),  # grid
        ({"metric": "nonsense"}, "direction"),  # no known better direction
        ({"metric": "nonsense", "direction": "max"}, "metric"),  # not what train jobs report
        ({"base": {"kind": "evaluate", "source_job_id": 1}}, "base.kind"),
    ]  # fmt: skip
    for overrides, field in cases:
        got = alice.post("/api/v1/sweeps", json=grid(**overrides))
        assert got.status_code == 422, (overrides, got.json)
        assert field in got.json["error"]["fields"], (field, got.json)
    assert alice.get("/api/v1/sweeps").json["sweeps"] == []


def test_trials_are_held_to_the_owners_limits(app: Flask, users: TestUsers) -> None:
    admin = as_user(app, users.admin)
    admin.patch("/api/v1/users/alice/limits", json={"max_epochs": 5})
    alice = as_user(app, users.alice)
    got = alice.post("/api/v1/sweeps", json=grid(space={"epochs": "choice([2, 50])"}))
    assert got.status_code == 422 and got.json["error"]["code"] == "over_limit", got.json
    assert "base.epochs" in got.json["error"]["fields"]


def test_a_sweep_of_script_jobs_needs_the_permission(app: Flask, users: TestUsers) -> None:
    alice = as_user(app, users.alice)
    base = {"kind": "script", "bundle_id": 1, "entry": "train.py"}
    got = alice.post("/api/v1/sweeps", json=grid(base=base, space={"params.lr": "choice([1, 2])"}))
    assert got.status_code in (403, 422), got.json
