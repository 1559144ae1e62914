"""TensorBoard export: a job's metric points written as event files and read back with
TensorBoard's own reader (EventAccumulator) and its HParams plugin backend; the download
endpoint, the job page's link and `trainyard tensorboard export`.

Jobs are database rows (tests/job_rows.py) with points at known steps, values and wall
times; the API's series (GET /api/v1/jobs/{id}/metrics) is what the files must match.
"""

from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from flask import Flask
from sqlalchemy import select
from tensorboard import context as tb_context
from tensorboard.backend.event_processing import plugin_event_multiplexer
from tensorboard.backend.event_processing.data_provider import MultiplexerDataProvider
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups, metadata

from server.app import create_app
from server.cli import main
from shared.db import transaction
from shared.orm import MetricPoint
from shared.settings import Settings
from shared.tensorboard_export import (
    EXPERIMENT_FILE,
    RunData,
    extract_runs,
    flatten_hparams,
    series_tags,
    tar_run,
    write_run,
)
from tests.conftest import SQLITE_ONLY, TestUsers, as_user
from tests.helpers import train_spec
from tests.job_rows import add_jobs, job_spec
from tests.test_authorization import session_client

T0 = 1_790_000_000.0  # wall time of the first point


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Workers started here write live event files too (the real run below)."""
    return settings.model_copy(update={"tensorboard_live": True})


def add_points(db_url: str, job_id: int, key: str, steps: list[int], attempt: int = 1) -> None:
    """Points of `key` at `steps`: value step/8 + attempt, wall time T0 + 1.5 s a step."""
    with transaction(db_url) as s:
        for step in steps:
            s.add(MetricPoint(job_id=job_id, attempt=attempt, key=key, step=step, epoch=None,
                              value=step / 8 + attempt, wall_time=T0 + 1.5 * step + attempt))  # fmt: skip


def make_job(db_url: str, owner: int, name: str, lr: float = 0.003, accuracy: float = 0.9) -> int:
    (job_id,) = add_jobs(db_url, [{
        "owner": owner, "name": name, "spec": job_spec(name, lr=lr),
        "metrics": {"val_accuracy": accuracy, "val_loss": 0.3, "best_metric": "val_loss"},
    }])  # fmt: skip
    add_points(db_url, job_id, "train_loss", [1, 2, 3, 4])
    add_points(db_url, job_id, "val_accuracy", [1, 2, 3, 4])
    add_points(db_url, job_id, "lr", [1, 2, 3, 4])
    add_points(db_url, job_id, "step_loss", list(range(0, 400, 10)))
    add_points(db_url, job_id, "gpu_util", [5, 10, 15])
    return job_id


def unpack(data: bytes, logdir: Path) -> Path:
    names = extract_runs(io.BytesIO(data), logdir)
    assert len(names) == 1, names
    return logdir / names[0]


def accumulator(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return acc


@SQLITE_ONLY
def test_download_reads_back_as_the_api_serves_it(
    app: Flask, db_url: str, users: TestUsers, tmp_path: Path
) -> None:
    job_id = make_job(db_url, users.alice.id, "digits cnn/1")
    alice = as_user(app, users.alice)

    resp = alice.get(f"/api/v1/jobs/{job_id}/tensorboard")
    assert resp.status_code == 200, resp.get_json()
    assert resp.mimetype == "application/gzip"
    disposition = resp.headers["Content-Disposition"]
    assert (
        disposition.startswith("attachment") and f"job-{job_id}-digits-cnn-1.tar.gz" in disposition
    )
    # Nothing in the archive depends on when or where it was made.
    assert alice.get(f"/api/v1/jobs/{job_id}/tensorboard").data == resp.data
    with tarfile.open(fileobj=io.BytesIO(resp.data)) as tar:
        assert [m.name for m in tar.getmembers()] == [
            f"job-{job_id}-digits-cnn-1",
            f"job-{job_id}-digits-cnn-1/events.out.tfevents.{int(_created(db_url, job_id)):010d}"
            f".trainyard.job-{job_id}",
        ]

    acc = accumulator(unpack(resp.data, tmp_path))
    api = alice.get(f"/api/v1/jobs/{job_id}/metrics").get_json()["series"]
    tags = series_tags(api)
    assert tags == {
        "gpu_util": "system/gpu_util", "lr": "train/lr", "step_loss": "train/step_loss",
        "train_loss": "train/loss", "val_accuracy": "val/accuracy",
    }  # fmt: skip
    assert set(acc.Tags()["scalars"]) == set(tags.values()) | {
        "final/val_accuracy",
        "final/val_loss",
    }
    with transaction(db_url) as s:
        rows = s.execute(select(MetricPoint.key, MetricPoint.step, MetricPoint.wall_time)
                         .where(MetricPoint.job_id == job_id)).all()  # fmt: skip
    wall_times = {(key, step): wall for key, step, wall in rows}
    for key, series in api.items():
        events = acc.Scalars(tags[key])
        assert [e.step for e in events] == series["step"], key
        assert [e.value for e in events] == pytest.approx(series["value"], rel=1e-6), key
        assert [e.wall_time for e in events] == [wall_times[key, s] for s in series["step"]]

    # The final metrics at the last training step (not telemetry's seconds).
    (final,) = acc.Scalars("final/val_accuracy")
    assert (final.step, final.value) == (390, pytest.approx(0.9, rel=1e-6))

    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    hparams = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    assert hparams == flatten_hparams(job_spec("digits cnn/1"))
    assert hparams["optimizer.lr"] == 0.003 and hparams["model.name"] == "cnn"
    assert hparams["batch_size"] == 32 and "name" not in hparams and "tags" not in hparams
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    assert end.status == api_pb2.Status.STATUS_SUCCESS


def _created(db_url: str, job_id: int) -> float:
    from datetime import timezone

    from shared.orm import Job

    with transaction(db_url) as s:
        return s.get(Job, job_id).created_at.replace(tzinfo=timezone.utc).timestamp()


@SQLITE_ONLY
def test_repeated_steps_and_long_series(
    settings: Settings, db_url: str, users: TestUsers, tmp_path: Path
) -> None:
    app = create_app(settings.model_copy(update={"tensorboard_max_points": 10}), {"TESTING": True})
    (job_id,) = add_jobs(db_url, [{"owner": users.alice.id, "state": "running", "name": None}])
    # A resumed attempt logged steps 3 and 4 again: its points are the ones kept.
    add_points(db_url, job_id, "train_loss", [1, 2, 3, 4])
    add_points(db_url, job_id, "train_loss", [3, 4, 5], attempt=2)
    add_points(db_url, job_id, "step_loss", list(range(1, 101)))
    add_points(db_url, job_id, "my/own metric", [1])
    resp = as_user(app, users.alice).get(f"/api/v1/jobs/{job_id}/tensorboard")
    app.extensions["trainyard_celery"] = None
    run_dir = unpack(resp.data, tmp_path)
    assert run_dir.name == f"job-{job_id}"

    acc = accumulator(run_dir)
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert loss == [(1, 1.125), (2, 1.25), (3, 2.375), (4, 2.5), (5, 2.625)]
    steps = [e.step for e in acc.Scalars("train/step_loss")]
    assert len(steps) <= 11 and steps[0] == 1 and steps[-1] == 100
    assert steps == sorted(set(steps))
    assert [e.step for e in acc.Scalars("my/own metric")] == [1]
    # Still running: a session start, no end, no final metrics.
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    assert set(content) == {metadata.SESSION_START_INFO_TAG}
    assert not [t for t in acc.Tags()["scalars"] if t.startswith("final/")]


@SQLITE_ONLY
def test_others_job_reads_as_missing_and_the_page_links_it(
    app: Flask, db_url: str, users: TestUsers
) -> None:
    job_id = make_job(db_url, users.alice.id, "mine")
    bob = as_user(app, users.bob)
    theirs = bob.get(f"/api/v1/jobs/{job_id}/tensorboard")
    missing = bob.get("/api/v1/jobs/999999/tensorboard")
    assert theirs.status_code == missing.status_code == 404
    assert theirs.get_json()["error"]["fields"] == {"job_id": "no such job"}
    assert as_user(app, None).get(f"/api/v1/jobs/{job_id}/tensorboard").status_code == 401
    assert as_user(app, users.admin).get(f"/api/v1/jobs/{job_id}/tensorboard").status_code == 200

    page = session_client(app, db_url, users.alice).get(f"/jobs/{job_id}")
    assert page.status_code == 200
    assert f'href="/api/v1/jobs/{job_id}/tensorboard"' in page.get_data(as_text=True)
    spec = app.test_client().get("/api/v1/openapi.json").get_json()
    operation = spec["paths"]["/api/v1/jobs/{job_id}/tensorboard"]["get"]
    assert "application/gzip" in operation["responses"]["200"]["content"]
    assert {"401", "404"} <= set(operation["responses"])


def session_groups(logdir: Path) -> list[Any]:
    """What TensorBoard's HPARAMS tab lists for `logdir`, from the plugin's own backend."""
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    context = base_plugin.TBContext(
        logdir=str(logdir),
        multiplexer=multiplexer,
        data_provider=MultiplexerDataProvider(multiplexer, str(logdir)),
    )
    statuses = [api_pb2.Status.STATUS_SUCCESS, api_pb2.Status.STATUS_UNKNOWN]
    request = api_pb2.ListSessionGroupsRequest(slice_size=100, allowed_statuses=statuses)
    handler = list_session_groups.Handler(
        tb_context.RequestContext(), backend_context.Context(context), "", request
    )
    return list(handler.run().session_groups)


def experiment_of(logdir: Path) -> api_pb2.Experiment:
    acc = accumulator(logdir)
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.EXPERIMENT_TAG]
    return metadata.parse_experiment_plugin_data(content)


@SQLITE_ONLY
def test_cli_exports_several_jobs_for_the_hparams_tab(
    live_server: str, db_url: str, users: TestUsers, tmp_path: Path
) -> None:
    first = make_job(db_url, users.alice.id, "small lr", lr=0.001, accuracy=0.8)
    second = make_job(db_url, users.alice.id, "big lr", lr=0.1, accuracy=0.95)
    bobs = make_job(db_url, users.bob.id, "bob's")
    env = {"TRAINYARD_URL": live_server, "TRAINYARD_TOKEN": users.alice.token}
    out = tmp_path / "runs"

    result = CliRunner().invoke(
        main, ["tensorboard", "export", str(first), str(second), "--out", str(out)], env=env
    )
    assert result.exit_code == 0, result.output
    assert f"Job {first}: {out / f'job-{first}-small-lr'}" in result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [EXPERIMENT_FILE, f"job-{first}-small-lr", f"job-{second}-big-lr"]
    )
    groups = {g.name: g for g in session_groups(out)}
    assert set(groups) == {f"job-{first}-small-lr", f"job-{second}-big-lr"}
    big = groups[f"job-{second}-big-lr"]
    assert big.hparams["optimizer.lr"].number_value == 0.1
    assert big.hparams["model.name"].string_value == "cnn"
    metrics = {m.name.tag: m.value for m in big.metric_values}
    assert metrics == pytest.approx({"final/val_accuracy": 0.95, "final/val_loss": 0.3}, rel=1e-6)
    assert big.sessions[0].status == api_pb2.Status.STATUS_SUCCESS
    differs = {h.name for h in experiment_of(out).hparam_infos if h.differs}
    assert differs == {"optimizer.lr"}  # the one hyperparameter the two specs differ in

    # Bob's job reads as missing; with it in the list nothing is unpacked, not even
    # the jobs before it.
    elsewhere = tmp_path / "other"
    refused = CliRunner().invoke(
        main, ["tensorboard", "export", str(first), str(bobs), "-o", str(elsewhere)], env=env
    )
    assert refused.exit_code == 1
    assert f"job {bobs} does not exist (not_found, HTTP 404)" in refused.output
    assert not elsewhere.exists() or not any(elsewhere.iterdir())


def test_tags_group_keys_and_never_collide() -> None:
    tags = series_tags(
        ["train_loss", "train/loss", "val_f1", "cpu_percent", "loss", "final/x", "val_"]
    )
    assert tags == {
        "train/loss": "train/loss", "train_loss": "train_loss", "val_f1": "val/f1",
        "cpu_percent": "system/cpu_percent", "loss": "loss", "final/x": "series/final/x",
        "val_": "val_",
    }  # fmt: skip
    assert len(set(tags.values())) == len(tags)


def test_hparams_flatten_the_spec(tmp_path: Path) -> None:
    spec = {"kind": "script", "name": "n", "tags": ["t"], "priority": 3, "args": ["--x", "1"],
            "params": {"depth": 4, "wide": True, "note": None}, "bundle_id": 2}  # fmt: skip
    assert flatten_hparams(spec) == {
        "kind": "script", "args": '["--x","1"]', "params.depth": 4.0, "params.wide": True,
        "bundle_id": 2.0,
    }  # fmt: skip
    # NaN in a series goes in as it was logged (TensorBoard draws a gap).
    run = RunData(job_id=3, name=None, state="failed", spec={}, result=None, created_at=5.0,
                  finished_at=9.0, series={"train_loss": [(1, math.nan, 6.0)]})  # fmt: skip
    out = io.BytesIO()
    tar_run(write_run(run, tmp_path / "a"), out)
    acc = accumulator(unpack(out.getvalue(), tmp_path / "b"))
    assert math.isnan(acc.Scalars("train/loss")[0].value)
    end = acc.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_END_INFO_TAG]
    assert metadata.parse_session_end_info_plugin_data(end).status == api_pb2.STATUS_FAILURE


@SQLITE_ONLY
def test_live_files_hold_what_the_sink_stored(
    client: Any, db_url: str, settings: Settings, tmp_path: Path
) -> None:
    from shared.state_machine import claim_job
    from worker import tensorboard_live
    from worker.metric_sink import MetricSink

    job = client.post("/api/v1/jobs", json=train_spec()).get_json()
    with transaction(db_url) as s:
        claim = claim_job(s, job["id"], "w:1", 60)
    assert claim is not None
    attempt_dir = tmp_path / "attempt-1"
    off = settings.model_copy(update={"tensorboard_live": False})
    assert tensorboard_live.writer(off, claim, attempt_dir) is None
    sink = MetricSink(
        db_url,
        job["id"],
        attempt=1,
        on_written=tensorboard_live.writer(settings, claim, attempt_dir),
    )
    sink.log("train_loss", 0.5, step=1, epoch=1)
    assert sink.flush() == 1
    sink.log("train_loss", 0.25, step=2, epoch=2)
    sink.log("val_accuracy", 0.75, step=2, epoch=2)
    sink.log("gpu_util", 40.0, step=3)
    assert sink.flush() == 3

    acc = accumulator(attempt_dir / tensorboard_live.LIVE_DIR)
    api = client.get(f"/api/v1/jobs/{job['id']}/metrics").get_json()["series"]
    with transaction(db_url) as s:
        rows = s.execute(
            select(MetricPoint.key, MetricPoint.wall_time).order_by(MetricPoint.id)
        ).all()
    tags = series_tags(api)
    assert set(acc.Tags()["scalars"]) == set(tags.values()) == {
        "train/loss", "val/accuracy", "system/gpu_util",
    }  # fmt: skip
    for key, series in api.items():
        events = acc.Scalars(tags[key])
        assert [(e.step, e.value) for e in events] == list(
            zip(series["step"], series["value"], strict=True)
        )
        assert [e.wall_time for e in events] == [w for k, w in rows if k == key]
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    assert start.hparams["optimizer.lr"].number_value == train_spec()["optimizer"]["lr"]


def test_a_long_live_run_goes_on_in_new_files_and_reads_as_one(tmp_path: Path) -> None:
    """Past its size a live file stops growing and the next points start a new part, so
    a sync re-uploads only the newest part (worker/artifact_sync.py); TensorBoard reads
    the parts as one run, with one session start."""
    from shared.tensorboard_export import LiveRun

    spec = train_spec()
    live = LiveRun(tmp_path, 7, 1, spec, 1_700_000_000.0, part_bytes=2_000)
    points = [{"key": "step_loss", "step": i, "value": 1.0 / (i + 1), "wall_time": 1e9 + i}
              for i in range(400)]  # fmt: skip
    stamps: dict[str, tuple[int, int]] = {}
    for start in range(0, len(points), 20):
        before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
        live.write(points[start : start + 20])
        after = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
        changed = {name for name, stamp in after.items() if before.get(name) != stamp}
        assert changed == {live.path.name}, changed  # earlier parts are left alone
        stamps = after
    files = sorted(stamps)
    assert len(files) > 3 and files[1] == f"{files[0]}.part-00001", files
    assert all(size < 2_000 + 20 * 100 for size, _ in stamps.values())

    acc = accumulator(tmp_path)
    read = [(e.step, e.value, e.wall_time) for e in acc.Scalars("train/step_loss")]
    assert read == [(p["step"], pytest.approx(p["value"]), p["wall_time"]) for p in points]
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    start_info = metadata.parse_session_start_info_plugin_data(
        content[metadata.SESSION_START_INFO_TAG]
    )
    assert start_info.hparams["optimizer.lr"].number_value == spec["optimizer"]["lr"]
    starts = [
        name
        for name in files
        for event in EventFileLoader(str(tmp_path / name)).Load()
        for value in event.summary.value
        if value.tag == metadata.SESSION_START_INFO_TAG
    ]
    assert starts == [files[0]]


@SQLITE_ONLY
def test_a_real_run_live_and_downloaded(
    client: Any, start_worker: Any, settings: Settings, tmp_path: Path
) -> None:
    from shared.job_files import job_dir
    from tests.conftest import wait_for_state
    from worker.tensorboard_live import LIVE_DIR

    start_worker()
    job = client.post("/api/v1/jobs", json=train_spec(epochs=1)).get_json()
    done = wait_for_state(lambda path: client.get(path).get_json(), job["id"], {"succeeded"})
    api = client.get(f"/api/v1/jobs/{job['id']}/metrics").get_json()["series"]
    assert {"train_loss", "val_loss", "val_accuracy", "lr", "step_loss"} <= set(api)
    downloaded = accumulator(unpack(client.get(f"/api/v1/jobs/{job['id']}/tensorboard").data,
                                    tmp_path))  # fmt: skip
    live = accumulator(job_dir(settings, job["id"]) / "attempt-1" / LIVE_DIR)
    tags = series_tags(api)
    for key, series in api.items():
        expected = list(zip(series["step"], series["value"], strict=True))
        got = [(e.step, e.value) for e in downloaded.Scalars(tags[key])]
        assert got == [(s, pytest.approx(v, rel=1e-6)) for s, v in expected], key
        # The live file has the same points, at the same wall times.
        assert live.Scalars(tags[key]) == downloaded.Scalars(tags[key]), key
    (final,) = downloaded.Scalars("final/val_accuracy")
    assert final.value == pytest.approx(done["result"]["metrics"]["val_accuracy"], rel=1e-6)


def test_an_archive_reaching_outside_the_log_directory_is_refused(tmp_path: Path) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        tar.addfile(tarfile.TarInfo("../evil"), io.BytesIO(b""))
    out.seek(0)
    with pytest.raises(ValueError, match="not a TensorBoard export"):
        extract_runs(out, tmp_path / "runs")
    assert not (tmp_path / "evil").exists()
