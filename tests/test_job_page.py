"""The job page (/jobs/<id>), its actions, its live stream (/jobs/<id>/stream), the
timeline API, and the downsampled series the charts start from.

Jobs are made through the API and then put into the wanted state directly in the
database (with metric points, timeline events, a log and checkpoints), so nothing here
trains. The browser side (charts drawing, live updates in a real page) is covered by
the Playwright tests.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import insert, select

from server.job_stream import StreamCursor, sse_message
from server.metric_series import load_key, points_after
from shared import job_files
from shared.db import transaction, utcnow
from shared.job_events import add_event
from shared.orm import Job, MetricPoint
from shared.settings import Settings
from tests.conftest import as_user
from tests.helpers import train_spec, without_csrf_token
from tests.test_authorization import page_csrf_token, session_client

# For tests of the page's own logic, whose SQL is the same on both databases; the
# stream, the series and the actions run on both (keeps this file under ~15 s).
sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)

LOG_LINES = [
    f"2026-11-28T15:04:0{i}.000Z [attempt 1] epoch {i}/3: train_loss=0.{9 - i}" for i in (1, 2, 3)
]
ARTIFACT = "attempt-1/best.pt"
RESULT = {
    "metrics": {"train_loss": 0.12, "val_loss": 0.2, "val_accuracy": 0.9531, "best_metric": "val_loss",
                "best_metric_value": 0.19, "best_epoch": 2, "epochs_run": 3, "duration_s": 42.0}
}  # fmt: skip


def new_job(app: Flask, user: Any, name: str) -> int:
    resp = as_user(app, user).post("/api/v1/jobs", json=train_spec(name=name))
    assert resp.status_code == 201, resp.get_json()
    return int(resp.get_json()["id"])


def points(job_id: int, key: str, steps: range, attempt: int = 1) -> list[dict[str, Any]]:
    return [
        {"job_id": job_id, "attempt": attempt, "key": key, "step": s, "epoch": max(1, s // 100),
         "value": 1.0 / s, "wall_time": 0.0}
        for s in steps
    ]  # fmt: skip


def make_finished(app: Flask, settings: Settings, db_url: str, user: Any, name: str) -> int:
    """A succeeded train job with a checkpoint, metrics, a timeline, a log and files."""
    job_id = new_job(app, user, name)
    with transaction(db_url) as s:
        job = s.get(Job, job_id)
        job.state, job.attempt, job.worker = "succeeded", 2, None
        job.started_at = job.finished_at = utcnow()
        job.result = RESULT
        job.progress = {"epoch": 3, "epochs": 3, "step": 300, "steps_total": 300,
                        "samples_per_s": 7000.0, "eta_s": 0.0, "fraction": 1.0}  # fmt: skip
        job.checkpoint_path = str(job_files.job_dir(settings, job_id) / "attempt-2")
        add_event(s, job_id, "claimed", attempt=1, worker="host-a:101")
        add_event(s, job_id, "requeued", attempt=1, message="lease expired")
        add_event(s, job_id, "claimed", attempt=2, worker="host-b:202")
        add_event(s, job_id, "resumed", attempt=2, message="attempt-1/last.pt")
        add_event(s, job_id, "succeeded", attempt=2)
        rows = points(job_id, "step_loss", range(20, 301, 20))
        for key in ("train_loss", "val_loss", "val_accuracy"):
            rows += points(job_id, key, range(1, 4))
        s.execute(insert(MetricPoint), rows)
    path = job_files.job_dir(settings, job_id) / ARTIFACT
    path.parent.mkdir(parents=True)
    path.write_bytes(b"checkpoint")
    job_files.log_path(settings, job_id).write_text("\n".join(LOG_LINES) + "\n")
    return job_id


def set_state(db_url: str, job_id: int, **values: Any) -> None:
    with transaction(db_url) as s:
        job = s.get(Job, job_id)
        for key, value in values.items():
            setattr(job, key, value)


def html(resp: Any) -> str:
    return str(resp.get_data(as_text=True))


def post_form(
    client: FlaskClient, url: str, data: dict[str, str] | None = None, csrf: bool = True
) -> Any:
    form = dict(data or {})
    if csrf:
        token = page_csrf_token(client)
        form = {"csrf_token": token, **form}
    return client.post(url, data=form)


# ---------------------------------------------------------------- the page


def test_job_page_shows_spec_timeline_progress_results_artifacts_and_log(
    app: Flask, settings: Settings, db_url: str, users: Any
) -> None:
    job_id = make_finished(app, settings, db_url, users.alice, "alice-<run>")
    for user in (users.alice, users.admin):
        t0 = time.perf_counter()
        resp = session_client(app, db_url, user).get(f"/jobs/{job_id}")
        elapsed_ms = (time.perf_counter() - t0) * 1000
        assert resp.status_code == 200, html(resp)[:300]
        page = html(resp)
        # Escaped, never markup: the name is user input.
        assert "alice-&lt;run&gt;" in page and "alice-<run>" not in page
        assert 'id="job-state" class="badge state-succeeded">succeeded<' in page
        for label in ("claimed by a worker", "requeued", "resumed from a checkpoint", "succeeded"):
            assert f'<span class="tl-label">{label}</span>' in page
        assert "host-b:202" in page and "attempt-1/last.pt" in page and "lease expired" in page
        assert 'id="job-progress-bar" max="1" value="1.0"' in page
        assert 'id="progress-epoch">3 / 3<' in page
        assert 'id="result-metrics"' in page and "0.9531" in page and "42 s" in page
        assert f'href="/api/v1/jobs/{job_id}/artifacts/{ARTIFACT}"' in page
        assert all(line in page for line in LOG_LINES)
        assert "&#34;kind&#34;: &#34;train&#34;" in page  # the pretty spec JSON, escaped
        for element in ("action-retry", "action-clone", "action-evaluate", "job-charts", "job-log"):
            assert f'id="{element}"' in page
        assert 'id="action-cancel"' not in page  # finished: nothing to cancel
        cursor = re.search(r'data-stream-cursor="([^"]+)"', page)
        assert cursor and StreamCursor.parse(cursor.group(1).replace("&#34;", '"')) is not None
        # Strict CSP: no inline script or style anywhere on the page.
        assert "<script>" not in page and "style=" not in page and "<style" not in page
        assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
        print(f"job page for {user.username}: {elapsed_ms:.1f} ms")


@sqlite_only
def test_running_and_queued_jobs_offer_cancel_and_a_live_progress_bar(
    app: Flask, settings: Settings, db_url: str, users: Any
) -> None:
    queued = new_job(app, users.alice, "waiting")
    running = new_job(app, users.alice, "busy")
    progress = {"epoch": 2, "epochs": 3, "step": 150, "steps_total": 300, "samples_per_s": 7300.0,
                "eta_s": 65.0, "fraction": 0.5}  # fmt: skip
    set_state(db_url, running, state="running", attempt=1, worker="gpu-1:77", progress=progress,
              started_at=utcnow())  # fmt: skip
    client = session_client(app, db_url, users.alice)
    page = html(client.get(f"/jobs/{queued}"))
    assert 'id="action-cancel"' in page and "Waiting in the cpu queue" in page
    assert 'id="job-progress-bar"' not in page  # nothing to measure yet
    page = html(client.get(f"/jobs/{running}"))
    assert 'value="0.5"' in page and 'id="progress-percent">50%<' in page
    assert 'id="progress-speed">7,300<' in page and 'id="progress-eta">1 m 05 s<' in page
    assert "Running on gpu-1:77" in page and "Waiting for the first epoch" in page


@sqlite_only
def test_another_users_job_is_the_same_404_page_as_a_missing_one(
    app: Flask, settings: Settings, db_url: str, users: Any
) -> None:
    job_id = make_finished(app, settings, db_url, users.alice, "alice-secret")
    bob = session_client(app, db_url, users.bob)
    missing = 10**9
    for path in ("/jobs/{}", "/jobs/{}/stream"):
        theirs, nothing = bob.get(path.format(job_id)), bob.get(path.format(missing))
        assert theirs.status_code == nothing.status_code == 404
        assert without_csrf_token(html(theirs)).replace(f"#{job_id}", "#N") == without_csrf_token(
            html(nothing)
        ).replace(f"#{missing}", "#N")
        assert "alice-secret" not in html(theirs)
    for action in ("cancel", "retry", "evaluate"):
        assert post_form(bob, f"/jobs/{job_id}/{action}").status_code == 404
    assert bob.get(f"/jobs/{2**64}").status_code == 404  # past BIGINT: no database error
    with transaction(db_url) as s:
        assert s.scalar(select(Job.id).where(Job.owner_id == users.bob.id)) is None


# ---------------------------------------------------------------- actions


def test_cancel_and_retry_need_csrf_and_say_what_happened(
    app: Flask, settings: Settings, db_url: str, users: Any
) -> None:
    client = session_client(app, db_url, users.alice)
    queued = new_job(app, users.alice, "to-cancel")
    resp = post_form(client, f"/jobs/{queued}/cancel", csrf=False)
    assert resp.status_code == 400 and "form had expired" in html(resp)
    with transaction(db_url) as s:
        assert s.get(Job, queued).state == "queued"
    resp = post_form(client, f"/jobs/{queued}/cancel")
    assert resp.status_code == 303 and resp.headers["Location"] == f"/jobs/{queued}"
    assert f"Job #{queued} cancelled." in html(client.get(resp.headers["Location"]))
    with transaction(db_url) as s:
        assert s.get(Job, queued).state == "cancelled"

    finished = make_finished(app, settings, db_url, users.alice, "to-retry")
    resp = post_form(client, f"/jobs/{finished}/cancel")  # already succeeded: a 409 in words
    assert "already succeeded" in html(client.get(resp.headers["Location"]))
    assert post_form(client, f"/jobs/{finished}/retry", csrf=False).status_code == 400
    resp = post_form(client, f"/jobs/{finished}/retry")
    assert resp.status_code == 303
    new_id = int(resp.headers["Location"].rsplit("/", 1)[1])
    assert f"queued as job #{new_id}" in html(client.get(resp.headers["Location"]))
    with transaction(db_url) as s:
        new = s.get(Job, new_id)
        assert new.state == "queued" and new.owner_id == users.alice.id
        assert new.spec == s.get(Job, finished).spec

    # Over the queued-jobs limit: the 429 is said on the page, and nothing is created.
    limits = app.extensions["trainyard_submit_limits"]
    limits.max_queued, allowed = 0, limits.max_queued
    resp = post_form(client, f"/jobs/{finished}/retry")
    assert resp.headers["Location"] == f"/jobs/{finished}"
    assert f"Could not retry job #{finished}" in html(client.get(resp.headers["Location"]))
    limits.max_queued = allowed

    running = new_job(app, users.alice, "still-running")
    set_state(db_url, running, state="running", attempt=1)
    resp = post_form(client, f"/jobs/{running}/retry")
    assert resp.headers["Location"] == f"/jobs/{running}"
    assert "only finished jobs can be retried" in html(client.get(resp.headers["Location"]))
    resp = post_form(client, f"/jobs/{running}/cancel")
    assert "Cancel requested" in html(client.get(resp.headers["Location"]))
    with transaction(db_url) as s:
        assert s.get(Job, running).cancel_requested


@sqlite_only
def test_evaluate_form_queues_an_evaluation_or_shows_why_not(
    app: Flask, settings: Settings, db_url: str, users: Any
) -> None:
    client = session_client(app, db_url, users.alice)
    source = make_finished(app, settings, db_url, users.alice, "to-evaluate")
    page = html(client.get(f"/jobs/{source}"))
    assert 'id="evaluate-form"' in page and '<select id="evaluate-split" name="split">' in page
    data = {"split": "val", "checkpoint": "last", "dataset": ""}
    assert post_form(client, f"/jobs/{source}/evaluate", data, csrf=False).status_code == 400
    resp = post_form(client, f"/jobs/{source}/evaluate", data)
    assert resp.status_code == 303, html(resp)[:500]
    new_id = int(resp.headers["Location"].rsplit("/", 1)[1])
    with transaction(db_url) as s:
        new = s.get(Job, new_id)
        assert (new.kind, new.source_job_id, new.owner_id) == ("evaluate", source, users.alice.id)
        assert new.spec["dataset"]["split"] == "val" and new.spec["checkpoint"] == "last"

    # A choice the form does not offer (a tabular dataset for an image model): inline.
    bad = {**data, "dataset": "iris"}
    resp = post_form(client, f"/jobs/{source}/evaluate", bad)
    assert resp.status_code == 422
    page = html(resp)
    assert (
        'id="evaluate-dataset-error"' in page
        and '<details id="action-evaluate" class="evaluate-menu" open>' in page
    )
    assert '<option selected value="val">' in page  # the user's choices are kept

    # The submission's own check (here: the source has not succeeded) comes back as a 422.
    set_state(db_url, source, state="failed")
    resp = post_form(client, f"/jobs/{source}/evaluate", data)
    assert resp.status_code == 422
    assert "only succeeded train jobs can be evaluated" in html(resp)


@sqlite_only
def test_evaluate_job_page_shows_metrics_and_a_confusion_matrix(
    app: Flask, settings: Settings, db_url: str, users: Any
) -> None:
    source = make_finished(app, settings, db_url, users.alice, "scored")
    resp = as_user(app, users.alice).post(
        "/api/v1/jobs", json={"kind": "evaluate", "source_job_id": source}
    )
    assert resp.status_code == 201, resp.get_json()
    job_id = resp.get_json()["id"]
    matrix = [[50, 2, 0], [3, 40, 7], [0, 0, 48]]
    per_class = [{"class": c, "precision": 0.9, "recall": 0.8, "f1": 0.85, "support": sum(r)}
                 for c, r in enumerate(matrix)]  # fmt: skip
    metrics = {"accuracy": 0.92, "precision": 0.91, "recall": 0.9, "f1": 0.905, "loss": 0.31,
               "per_class": per_class, "confusion_matrix": matrix, "num_samples": 150,
               "split": "test", "dataset": "digits", "checkpoint": "best"}  # fmt: skip
    set_state(db_url, job_id, state="succeeded", attempt=1, started_at=utcnow(),
              finished_at=utcnow(), result={"metrics": metrics})  # fmt: skip
    page = html(session_client(app, db_url, users.alice).get(f"/jobs/{job_id}"))
    assert 'id="confusion-matrix"' in page and 'id="per-class"' in page
    cells = re.findall(r'<td class="heat heat-(\d)( diag)?" title="[^"]*">(\d+)</td>', page)
    assert [int(c[2]) for c in cells] == [n for row in matrix for n in row]
    assert {int(c[0]) for c in cells if c[1]} == {9, 8}  # the diagonal, shaded by its row share
    assert [c[0] for c in cells if c[2] == "0"] == ["0"] * 3  # an empty cell is unshaded
    for figure in ("accuracy", "precision", "recall", "f1", "loss"):
        assert f'data-metric="{figure}"' in page
    assert f'id="source-job-link" href="/jobs/{source}"' in page
    assert 'id="job-charts"' not in page  # an evaluation has no curves


# ---------------------------------------------------------------- the live stream


def sse(body: str) -> list[dict[str, str]]:
    """Parse a text/event-stream body into its messages (comments dropped)."""
    messages = []
    for block in body.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            fields[name] = fields[name] + "\n" + value if name in fields else value
        if fields:
            messages.append(fields)
    return messages


def stream(client: FlaskClient, job_id: int, cursor: dict[str, Any] | None = None,
           last_id: str | None = None) -> list[dict[str, str]]:  # fmt: skip
    url = f"/jobs/{job_id}/stream"
    if cursor is not None:
        url += "?cursor=" + json.dumps(cursor)
    headers = {"Last-Event-ID": last_id} if last_id else {}
    resp = client.get(url, headers=headers)
    assert resp.status_code == 200, html(resp)[:300]
    assert resp.mimetype == "text/event-stream" and resp.headers["Cache-Control"] == "no-store"
    return sse(html(resp))


def test_stream_sends_state_metrics_log_and_timeline_then_ends(
    app: Flask, settings: Settings, db_url: str, users: Any
) -> None:
    job_id = make_finished(app, settings, db_url, users.alice, "streamed")
    client = session_client(app, db_url, users.alice)
    # A client with the page's cursor (log end, no events) that has val_loss up to epoch 2.
    size = job_files.log_path(settings, job_id).stat().st_size
    messages = stream(client, job_id, {"log": size - len(LOG_LINES[-1]) - 1, "event": 0,
                                       "metrics": {"val_loss": 2}})  # fmt: skip
    assert messages[0] == {"retry": "1000"}
    kinds = [m["event"] for m in messages[1:]]
    assert kinds == ["job", "timeline", "metrics", "log", "end"]
    data = {m["event"]: json.loads(m["data"]) for m in messages[1:]}
    assert data["job"]["state"] == "succeeded" and data["job"]["result"]["val_accuracy"] == 0.9531
    assert [e["kind"] for e in data["timeline"]["events"]] == [
        "claimed", "requeued", "claimed", "resumed", "succeeded"]  # fmt: skip
    assert data["timeline"]["events"][2]["worker"] == "host-b:202"
    assert data["metrics"]["append"] == {"val_loss": {"step": [3], "epoch": [1], "value": [1 / 3]}}
    assert set(data["metrics"]["reset"]) == {"step_loss", "train_loss", "val_accuracy"}
    assert data["metrics"]["reset"]["step_loss"]["step"] == list(range(20, 301, 20))
    assert data["log"] == {"lines": [LOG_LINES[-1]]}
    assert data["end"] == {"state": "succeeded"}
    # Every message names the cursor after it; the last one is where a reconnect resumes.
    final = StreamCursor.parse(messages[-1]["id"])
    assert final is not None and final.log == size and final.metrics["step_loss"] == 300

    # Resuming from that id repeats nothing: the state, and the end.
    again = stream(client, job_id, {"log": 0}, last_id=messages[-1]["id"])
    assert [m.get("event") for m in again[1:]] == ["job", "end"]


def test_stream_of_a_running_job_resumes_with_last_event_id(
    app: Flask, settings: Settings, db_url: str, users: Any
) -> None:
    app.config.update(JOB_STREAM_SECONDS=0.3, JOB_STREAM_POLL_SECONDS=0.05)
    job_id = new_job(app, users.alice, "live")
    set_state(db_url, job_id, state="running", attempt=1, worker="w:1",
              progress={"epoch": 1, "epochs": 3, "step": 10, "fraction": 0.1})  # fmt: skip
    with transaction(db_url) as s:
        add_event(s, job_id, "claimed", attempt=1, worker="w:1")
        s.execute(insert(MetricPoint), points(job_id, "step_loss", range(1, 11)))
    log = job_files.log_path(settings, job_id)
    log.parent.mkdir(parents=True)
    log.write_text("line 1\npartial")
    client = session_client(app, db_url, users.alice)
    t0 = time.perf_counter()
    first = stream(client, job_id, {})
    assert time.perf_counter() - t0 >= 0.3  # it kept polling until its time was up
    kinds = [m.get("event") for m in first[1:]]
    assert kinds == ["job", "timeline", "metrics", "log"]  # no end: still running
    assert json.loads(first[4]["data"]) == {"lines": ["line 1"]}  # not the unfinished line
    last_id = first[-1]["id"]

    # Meanwhile: progress, new points and events, the line completed.
    set_state(db_url, job_id, progress={"epoch": 2, "epochs": 3, "step": 20, "fraction": 0.2})
    with transaction(db_url) as s:
        add_event(s, job_id, "cancel_requested")
        s.execute(insert(MetricPoint), points(job_id, "step_loss", range(11, 14)))
    with log.open("a") as f:
        f.write(" now done\nline 3\n")
    second = stream(client, job_id, {"log": 0}, last_id=last_id)  # the header wins
    data = {m["event"]: json.loads(m["data"]) for m in second[1:]}
    assert data["job"]["progress"]["step"] == 20
    assert [e["kind"] for e in data["timeline"]["events"]] == ["cancel_requested"]
    assert data["metrics"] == {"append": {"step_loss": {"step": [11, 12, 13], "epoch": [1, 1, 1],
                               "value": [1 / 11, 1 / 12, 1 / 13]}}, "reset": {}}  # fmt: skip
    assert data["log"] == {"lines": ["partial now done", "line 3"]}

    assert client.get(f"/jobs/{job_id}/stream?cursor=not-json").status_code == 400
    # A garbled Last-Event-ID is ignored in favour of the page's cursor.
    resp = client.get(f"/jobs/{job_id}/stream?cursor=%7B%7D", headers={"Last-Event-ID": "x"})
    assert resp.status_code == 200


# ---------------------------------------------------------------- series and timeline API


def test_initial_series_stay_small_for_a_long_run(
    app: Flask, settings: Settings, db_url: str, users: Any
) -> None:
    job_id = new_job(app, users.alice, "long")
    n = 50_000
    with transaction(db_url) as s:
        # Every 20th step, as the training loop logs step_loss, plus a resumed attempt
        # that logged the last 100 points again.
        s.execute(insert(MetricPoint), points(job_id, "step_loss", range(20, 20 * n + 1, 20)))
        s.execute(
            insert(MetricPoint),
            points(job_id, "step_loss", range(20 * (n - 99), 20 * n + 1, 20), 2),
        )
        s.execute(insert(MetricPoint), points(job_id, "val_loss", range(1, 51)))
    client = session_client(app, db_url, users.alice)
    page = html(client.get(f"/jobs/{job_id}"))
    url = re.search(r'data-metrics-url="([^"]+)"', page)
    assert url and url.group(1) == f"/api/v1/jobs/{job_id}/metrics?max_points=2000"
    t0 = time.perf_counter()
    body = client.get(url.group(1)).get_json()
    elapsed_ms = (time.perf_counter() - t0) * 1000
    steps = body["series"]["step_loss"]["step"]
    assert 1900 <= len(steps) <= 2000 and steps[0] == 20 and steps[-1] == 20 * n
    assert steps == sorted(set(steps))  # evenly spread, no repeats
    assert max(b - a for a, b in zip(steps, steps[1:], strict=False)) <= 2 * 20 * n / 2000
    assert body["series"]["val_loss"]["step"] == list(range(1, 51))
    print(f"initial series of a {n:,}-point run: {len(steps)} points in {elapsed_ms:.1f} ms")

    with transaction(db_url) as s:
        # A client far behind gets the series again, downsampled, not 50k points.
        lagging = points_after(s, job_id, {"step_loss": 20, "val_loss": 50}, limit=500)
        assert set(lagging.reset) == {"step_loss"} and not lagging.appended
        assert len(lagging.reset["step_loss"]) <= 2000
        series = load_key(s, job_id, "step_loss", 2)
        assert series.step == [20, 20 * n]


@sqlite_only
def test_timeline_api_pages_through_events(
    app: Flask, settings: Settings, db_url: str, users: Any
) -> None:
    job_id = make_finished(app, settings, db_url, users.alice, "timeline")
    alice = as_user(app, users.alice)
    body = alice.get(f"/api/v1/jobs/{job_id}/events?limit=3").get_json()
    assert [e["kind"] for e in body["events"]] == ["claimed", "requeued", "claimed"]
    assert body["events"][0]["label"] == "claimed by a worker"
    rest = alice.get(f"/api/v1/jobs/{job_id}/events?after={body['next_after']}").get_json()
    assert [e["kind"] for e in rest["events"]] == ["resumed", "succeeded"]
    assert rest["next_after"] is None
    missing = as_user(app, users.bob).get(f"/api/v1/jobs/{job_id}/events")
    assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "not_found"
    assert alice.get(f"/api/v1/jobs/{job_id}/events?limit=0").status_code == 400


def test_sse_messages_are_strict_json() -> None:
    # A diverged loss (NaN, inf) must not make a message the browser cannot parse.
    message = sse_message(
        "metrics", {"value": [1.0, float("nan"), float("inf")]}, StreamCursor(log=3)
    )
    lines = message.split("\n")
    assert message.endswith("\n\n") and lines[1] == "event: metrics"
    assert StreamCursor.parse(lines[0].removeprefix("id: ")) == StreamCursor(log=3)
    assert json.loads(lines[2].removeprefix("data: ")) == {"value": [1.0, None, None]}


def test_cursor_refuses_anything_but_a_cursor() -> None:
    assert StreamCursor.parse('{"log": 5, "event": 2, "metrics": {"a": 3}}') == StreamCursor(
        log=5, event=2, metrics={"a": 3}
    )
    for junk in (None, "", "[]", '{"log": -1}', '{"log": 1e3}', '{"extra": 1}', "{" * 10_000,
                 '{"metrics": {"": 1}}', f'{{"event": {2**64}}}'):  # fmt: skip
        assert StreamCursor.parse(junk) is None, junk


@sqlite_only
def test_script_job_page_shows_its_code_arguments_custom_charts_and_results(
    app: Flask, settings: Settings, db_url: str, users: Any
) -> None:
    from tests.test_script_submission import add_bundle, grant

    grant(db_url, "alice")
    bundle = add_bundle(db_url, users.alice.id)
    spec = {"kind": "script", "bundle_id": bundle, "entry": "train.py",
            "args": ["--lr", "0.01", "two words"], "params": {"width": 64}}  # fmt: skip
    resp = as_user(app, users.alice).post("/api/v1/jobs", json=spec)
    assert resp.status_code == 201, resp.get_json()
    job_id = resp.get_json()["id"]
    metrics = {"val_accuracy": 0.875, "precision": 0.86, "recall": 0.85, "my_score": 3.5}
    set_state(db_url, job_id, state="succeeded", attempt=1, started_at=utcnow(),
              finished_at=utcnow(), result={"metrics": metrics})  # fmt: skip
    with transaction(db_url) as s:
        s.execute(insert(MetricPoint), points(job_id, "my_loss", range(1, 6)))
    page = html(session_client(app, db_url, users.alice).get(f"/jobs/{job_id}"))
    assert f"bundle {bundle}, entry train.py" in page
    assert "--lr 0.01 &#39;two words&#39;" in page  # as a shell would take it
    assert "{&#34;width&#34;: 64}" in page
    for figure in ("val_accuracy", "precision", "recall"):
        assert f'data-metric="{figure}"' in page
    # A name that says no better direction is a result all the same, in the table.
    assert 'data-metric="my_score"' not in page and "my_score" in page
    # Its own series come from the API like any job's, to be charted by key.
    got = as_user(app, users.alice).get(f"/api/v1/jobs/{job_id}/metrics").get_json()
    assert "my_loss" in json.dumps(got)
    assert 'id="job-charts"' in page  # its series are charted (by key) like any job's
