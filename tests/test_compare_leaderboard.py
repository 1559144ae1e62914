"""The compare page (/compare) and the leaderboard (/leaderboard)."""

from __future__ import annotations

import re
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from server.web.compare import flatten
from shared.db import transaction
from shared.orm import JobMetric
from shared.state_machine import JobState, finish_job
from tests.job_rows import add_jobs, job_spec
from tests.test_authorization import session_client


def section(html: str, element_id: str) -> str:
    """The HTML of the element with this id, up to its closing tag (tables, details)."""
    start = html.index(f'id="{element_id}"')
    tag = html[html.rindex("<", 0, start) + 1 :].split()[0]
    return html[start : html.index(f"</{tag}>", start)]


def row_keys(table_html: str) -> list[str]:
    return re.findall(r'<tr data-key="([^"]+)"', table_html)


def test_compare_shows_what_differs_and_the_best_final_metrics(
    app: Flask, db_url: str, users: Any
) -> None:
    a = users.alice.id
    ids = add_jobs(db_url, [
        {"owner": a, "name": "small-lr", "spec": job_spec("small-lr", lr=0.001),
         "metrics": {"val_accuracy": 0.95, "val_loss": 0.20, "epochs_run": 10},
         "points": {"val_accuracy": [0.5, 0.9, 0.95]}},
        {"owner": a, "name": "big-lr", "spec": job_spec("big-lr", lr=0.01, batch_size=64),
         "metrics": {"val_accuracy": 0.97, "val_loss": 0.25, "epochs_run": 10},
         "points": {"val_accuracy": [0.6, 0.97], "val_loss": [0.9, 0.25]}},
        {"owner": a, "name": "same-as-first", "spec": job_spec("same-as-first", lr=0.001),
         "metrics": {"val_accuracy": 0.97, "val_loss": 0.31}},
    ])  # fmt: skip
    client = session_client(app, db_url, users.alice)
    resp = client.get(f"/compare?ids={ids[0]},{ids[1]},{ids[2]}")
    assert resp.status_code == 200
    html = resp.get_data(as_text=True)

    # Only what differs by default (the name heads each column and is not a setting)...
    assert row_keys(section(html, "compare-params")) == ["batch_size", "optimizer.lr"]
    # ...and everything else behind the "show all" toggle.
    same = row_keys(section(html, "compare-same"))
    assert "epochs" in same and "model.name" in same and "optimizer.lr" not in same
    assert "<summary>" in section(html, "compare-same")

    metrics = section(html, "compare-metrics")
    assert row_keys(metrics)[:2] == ["val_accuracy", "val_loss"]
    acc = metrics[metrics.index('data-key="val_accuracy"') : metrics.index('data-key="val_loss"')]
    # A tie for the best accuracy marks both; the text says it, not only the colour.
    assert acc.count("★ best") == 2 and "0.95<" in acc
    loss = metrics[metrics.index('data-key="val_loss"') : metrics.index('data-key="epochs_run"')]
    assert loss.count("★ best") == 1 and re.search(r"0\.2 <span class=\"best-mark\">", loss)
    assert "★ best" not in metrics[metrics.index('data-key="epochs_run"') :]  # no direction

    # The chart's metric: the keys the jobs logged, val_accuracy by default.
    assert 'data-metric="val_accuracy"' in html
    options = re.findall(r'<option value="([^"]+)"', section(html, "compare-metric"))
    assert options == ["val_accuracy", "val_loss"]
    assert 'data-metric="val_loss"' in client.get(
        f"/compare?ids={ids[0]},{ids[1]}&metric=val_loss"
    ).get_data(as_text=True)
    assert html.count('class="compare-job"') == 3


def test_compare_urls_from_checkboxes_and_the_add_form(app: Flask, db_url: str, users: Any) -> None:
    ids = add_jobs(db_url, [{"owner": users.alice.id} for _ in range(3)])
    client = session_client(app, db_url, users.alice)
    resp = client.get(f"/compare?ids={ids[0]}&ids={ids[1]}")
    assert resp.status_code == 302 and resp.headers["Location"].endswith(
        f"/compare?ids={ids[0]},{ids[1]}"
    )
    resp = client.get(f"/compare?ids={ids[0]},{ids[1]}&add=%23{ids[2]}, {ids[0]}")
    assert resp.status_code == 302
    assert f"ids={ids[0]},{ids[1]},{ids[2]}" in resp.headers["Location"]
    html = client.get("/compare").get_data(as_text=True)
    assert 'id="compare-empty"' in html and 'id="compare-add-id"' in html
    assert client.get("/compare?ids=1,x").status_code == 400
    assert client.get("/compare?ids=" + ",".join(str(i) for i in range(1, 12))).status_code == 400


def test_compare_with_another_users_job_is_a_404_like_a_missing_one(
    app: Flask, db_url: str, users: Any
) -> None:
    mine = add_jobs(db_url, [{"owner": users.alice.id, "name": "alice-secret-run"}])[0]
    bobs = add_jobs(db_url, [{"owner": users.bob.id, "name": "bob-secret-run"}])[0]
    bob = session_client(app, db_url, users.bob)
    theirs = bob.get(f"/compare?ids={bobs},{mine}")
    missing = bob.get(f"/compare?ids={bobs},999999")
    assert theirs.status_code == missing.status_code == 404
    html = theirs.get_data(as_text=True)
    assert "alice-secret-run" not in html and "bob-secret-run" not in html
    # The same words either way (the rest of the page carries a fresh CSRF token).
    said = re.sub(rf"\b{mine}\b", "N", section(html, "compare-error"))
    assert said == section(missing.get_data(as_text=True), "compare-error").replace("999999", "N")
    assert "Job N does not exist." in said
    admin = session_client(app, db_url, users.admin)
    assert admin.get(f"/compare?ids={bobs},{mine}").status_code == 200


def test_flatten_makes_dotted_keys() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {
        "a.b": 1,
        "a.c.d": [1, 2],
        "e": {},
    }


def ranking(client: FlaskClient, query: str) -> list[str]:
    resp = client.get(f"/leaderboard?{query}")
    assert resp.status_code == 200
    html = resp.get_data(as_text=True)
    if 'id="leaderboard-table"' not in html:
        return []
    return re.findall(
        r'class="job-link" href="/jobs/\d+">([^<]+)<', section(html, "leaderboard-table")
    )


def test_leaderboard_order_direction_and_visibility(app: Flask, db_url: str, users: Any) -> None:
    a, b = users.alice.id, users.bob.id
    add_jobs(db_url, [
        {"owner": a, "name": "a-good", "metrics": {"val_accuracy": 0.97, "val_loss": 0.10}},
        {"owner": a, "name": "a-tie-first", "metrics": {"val_accuracy": 0.95, "val_loss": 0.30}},
        {"owner": a, "name": "a-tie-second", "metrics": {"val_accuracy": 0.95, "val_loss": 0.20}},
        {"owner": a, "name": "a-no-metrics"},
        {"owner": a, "name": "a-failed", "state": "failed", "metrics": {"val_accuracy": 0.99}},
        {"owner": a, "name": "a-eval", "kind": "evaluate", "metrics": {"accuracy": 0.96}},
        {"owner": b, "name": "b-best", "metrics": {"val_accuracy": 0.99, "val_loss": 0.05}},
        {"owner": a, "name": "a-wine", "dataset_name": "wine", "model_name": "mlp",
         "metrics": {"val_accuracy": 0.9}},
    ])  # fmt: skip
    alice = session_client(app, db_url, users.alice)
    # Default: the dataset with the most succeeded runs, by its first metric.
    html = alice.get("/leaderboard").get_data(as_text=True)
    assert re.search(r'<option value="digits" selected>digits \(5 runs\)', html)
    assert "higher is better" in html
    assert ranking(alice, "") == ["a-good", "a-tie-first", "a-tie-second"]
    # Loss: lower is better.
    assert ranking(alice, "dataset=digits&metric=val_loss") == [
        "a-good",
        "a-tie-second",
        "a-tie-first",
    ]
    # Evaluation metrics rank evaluation jobs.
    assert ranking(alice, "dataset=digits&metric=accuracy") == ["a-eval"]
    assert ranking(alice, "dataset=wine") == ["a-wine"]
    admin = session_client(app, db_url, users.admin)
    assert ranking(admin, "dataset=digits") == ["b-best", "a-good", "a-tie-first", "a-tie-second"]
    admin_html = admin.get("/leaderboard?dataset=digits").get_data(as_text=True)
    assert ">0.003<" in admin_html and ">32<" in admin_html  # lr and batch size columns
    bob = session_client(app, db_url, users.bob)
    assert ranking(bob, "dataset=digits") == ["b-best"]
    assert ranking(bob, "dataset=wine") == []  # alice's runs, invisible to bob
    # A run that succeeds later takes its place at once (the cached ranking is stale).
    add_jobs(db_url, [{"owner": a, "name": "a-newer-best", "metrics": {"val_accuracy": 0.999}}])
    assert ranking(alice, "")[:2] == ["a-newer-best", "a-good"]
    # An unknown metric falls back to the dataset's default, and says so.
    html = alice.get("/leaderboard?dataset=digits&metric=bogus").get_data(as_text=True)
    assert "not ranked by" in html and 'id="leaderboard-table"' in html


def test_leaderboard_with_nothing_to_rank(app: Flask, db_url: str, users: Any) -> None:
    html = session_client(app, db_url, users.alice).get("/leaderboard").get_data(as_text=True)
    assert 'id="leaderboard-empty"' in html and "Nothing to rank yet" in html


def test_leaderboard_ranks_what_finish_job_writes(app: Flask, db_url: str, users: Any) -> None:
    """finish_job writes the final-metric rows with the state change; the page reads them."""
    a = users.alice.id
    add_jobs(db_url, [{"owner": a, "name": "a-old", "metrics": {"val_accuracy": 0.9}}])
    (running,) = add_jobs(db_url, [{"owner": a, "name": "a-just-done", "state": "running"}])
    metrics = {"val_accuracy": 0.95, "val_loss": 0.2, "epochs_run": 3, "early_stopped": True,
               "best_metric": "val_loss"}  # fmt: skip
    if db_url.startswith("sqlite"):  # PostgreSQL's JSON has no NaN; SQLite stores Python's
        metrics["val_f1"] = float("nan")
    with transaction(db_url) as s:
        # A stale attempt (a zombie) writes nothing.
        assert not finish_job(s, running, 0, JobState.SUCCEEDED, result={"metrics": metrics})
        assert finish_job(s, running, 1, JobState.SUCCEEDED, result={"metrics": metrics})
    with transaction(db_url) as s:
        rows = s.execute(
            select(JobMetric.key, JobMetric.value, JobMetric.dataset_name, JobMetric.kind)
            .where(JobMetric.job_id == running)
            .order_by(JobMetric.key)
        ).all()
    assert [tuple(r) for r in rows] == [
        ("epochs_run", 3.0, "digits", "train"),
        ("val_accuracy", 0.95, "digits", "train"),
        ("val_loss", 0.2, "digits", "train"),
    ]
    alice = session_client(app, db_url, users.alice)
    assert ranking(alice, "dataset=digits") == ["a-just-done", "a-old"]
