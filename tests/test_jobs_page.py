"""The jobs page at "/" and GET /api/v1/jobs: filters, search, tags, sort, keyset pages."""

from __future__ import annotations

import re
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient

from server.job_query import PageCursor
from shared.db import get_engine, transaction
from shared.migrate import upgrade_database
from shared.orm import JobTag
from tests.conftest import as_user
from tests.helpers import train_spec
from tests.job_rows import add_jobs
from tests.test_authorization import session_client

ROW_ID = re.compile(r'<tr id="job-row-(\d+)"')


def page_ids(client: FlaskClient, url: str) -> list[int]:
    resp = client.get(url)
    assert resp.status_code == 200, resp.get_data(as_text=True)[:500]
    return [int(i) for i in ROW_ID.findall(resp.get_data(as_text=True))]


def api_ids(client: FlaskClient, url: str) -> list[int]:
    resp = client.get(url)
    assert resp.status_code == 200, resp.get_json()
    return [j["id"] for j in resp.get_json()["jobs"]]


@pytest.fixture
def alice_page(app: Flask, db_url: str, users: Any) -> FlaskClient:
    return session_client(app, db_url, users.alice)


def test_filters_and_search_escape_like_wildcards(
    app: Flask, db_url: str, users: Any, alice_page: FlaskClient
) -> None:
    a = users.alice.id
    ids = add_jobs(db_url, [
        {"owner": a, "name": "50%_off"},                       # 0
        {"owner": a, "name": "50xyoff"},                       # 1: % and _ as wildcards would match
        {"owner": a, "name": "Plain-MNIST", "state": "failed", "model_name": "mlp",
         "dataset_name": "mnist"},                             # 2
        {"owner": a, "name": "back\\slash", "state": "queued"},  # 3
        {"owner": a, "name": None, "kind": "evaluate"},        # 4
    ])  # fmt: skip
    assert page_ids(alice_page, "/?q=50%25_") == [ids[0]]
    assert page_ids(alice_page, "/?q=%25") == [ids[0]]
    assert page_ids(alice_page, "/?q=plain-mnist") == [ids[2]]  # case-insensitive
    assert page_ids(alice_page, "/?q=k%5Cs") == [ids[3]]  # a backslash is literal too
    assert page_ids(alice_page, "/?state=failed") == [ids[2]]
    assert page_ids(alice_page, "/?kind=evaluate") == [ids[4]]
    assert page_ids(alice_page, "/?model=mlp&dataset=mnist") == [ids[2]]
    assert page_ids(alice_page, "/?model=mlp&dataset=digits") == []
    # Empty form fields are "any": the GET form sends every field.
    assert page_ids(alice_page, "/?q=&state=&kind=&model=&dataset=&tag=&sort=") == ids[::-1]
    # The API answers the same question the same way.
    alice = as_user(app, users.alice)
    assert api_ids(alice, "/api/v1/jobs?q=50%25_") == [ids[0]]
    assert api_ids(alice, "/api/v1/jobs?q=PLAIN&state=failed&kind=train") == [ids[2]]

    # A bad parameter (a hand-edited URL) is left out, said so; the others still apply.
    resp = alice_page.get("/?state=done&model=mlp")
    assert resp.status_code == 400
    assert "This filter was left out" in resp.get_data(as_text=True)
    assert [int(i) for i in ROW_ID.findall(resp.get_data(as_text=True))] == [ids[2]]
    resp = alice_page.get("/?cursor=damaged")
    assert resp.status_code == 400 and "this is the first page" in resp.get_data(as_text=True)
    assert len(ROW_ID.findall(resp.get_data(as_text=True))) == 5


def test_tags_are_rows_written_at_submission_and_filter_the_table(
    app: Flask, db_url: str, users: Any, client: FlaskClient, alice_page: FlaskClient
) -> None:
    tagged = client.post("/api/v1/jobs", json=train_spec(tags=["sweep", "lr", "sweep"]))
    assert tagged.status_code == 201, tagged.get_json()
    other = client.post("/api/v1/jobs", json=train_spec(tags=["baseline"])).get_json()["id"]
    job_id = tagged.get_json()["id"]
    with transaction(db_url) as s:
        rows = s.scalars(sa.select(JobTag).where(JobTag.job_id == job_id)).all()
        assert sorted(r.tag for r in rows) == ["lr", "sweep"]  # the repeat is stored once
    assert page_ids(alice_page, "/?tag=sweep") == [job_id]
    assert page_ids(alice_page, "/?tag=baseline") == [other]
    assert page_ids(alice_page, "/?tag=swee") == []  # exact, not a prefix
    assert api_ids(client, "/api/v1/jobs?tag=lr") == [job_id]
    html = alice_page.get("/").get_data(as_text=True)
    assert 'href="/?tag=sweep"' in html  # each tag chip filters by its tag


def _expected(order: str, jobs: dict[int, str | None]) -> list[int]:
    if order == "newest":
        return sorted(jobs, reverse=True)
    if order == "oldest":
        return sorted(jobs)
    named = sorted((name, i) for i, name in jobs.items() if name is not None)
    return [i for _, i in named] + sorted(i for i, name in jobs.items() if name is None)


def test_keyset_pages_have_no_duplicates_or_gaps_with_ties(
    app: Flask, db_url: str, users: Any
) -> None:
    # Names repeat (ties broken by id) and some jobs have none (placed after the named).
    names = ["beta", "alpha", None, "beta", "gamma", "alpha", None, "beta", "alpha", "delta",
             "beta", None, "alpha"]  # fmt: skip
    ids = add_jobs(db_url, [{"owner": users.alice.id, "name": n} for n in names])
    alice = as_user(app, users.alice)
    for sort in ("newest", "oldest", "name"):
        expected = _expected(sort, dict(zip(ids, names, strict=True)))
        pages, cursor = [], None
        while True:
            url = f"/api/v1/jobs?limit=4&sort={sort}" + (f"&cursor={cursor}" if cursor else "")
            body = alice.get(url).get_json()
            pages.append([j["id"] for j in body["jobs"]])
            assert (body["prev_cursor"] is None) == (len(pages) == 1), sort
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert [i for page in pages for i in page] == expected, sort
        assert [len(p) for p in pages] == [4, 4, 4, 1], sort
        # And back from the last page with prev_cursor: the same pages.
        back = alice.get(f"/api/v1/jobs?limit=4&sort={sort}&cursor={body['prev_cursor']}")
        assert [j["id"] for j in back.get_json()["jobs"]] == pages[-2], sort
    # `next_before` keeps working for the default order.
    first = alice.get("/api/v1/jobs?limit=4").get_json()
    page2 = alice.get(f"/api/v1/jobs?limit=4&before={first['next_before']}").get_json()
    assert [j["id"] for j in page2["jobs"]] == _expected("newest", dict.fromkeys(ids))[4:8]


def test_the_page_follows_its_older_and_newer_links(
    db_url: str, users: Any, alice_page: FlaskClient
) -> None:
    ids = add_jobs(db_url, [{"owner": users.alice.id, "name": f"run-{i % 3}"} for i in range(55)])
    html = alice_page.get("/?sort=name").get_data(as_text=True)
    first = [int(i) for i in ROW_ID.findall(html)]
    assert len(first) == 50 and 'id="jobs-prev"' not in html
    next_url = re.search(r'id="jobs-next"[^>]*href="([^"]+)"', html).group(1).replace("&amp;", "&")
    html2 = alice_page.get(next_url).get_data(as_text=True)
    second = [int(i) for i in ROW_ID.findall(html2)]
    assert len(second) == 5 and 'id="jobs-next"' not in html2
    assert sorted(first + second) == sorted(ids)
    prev_url = re.search(r'id="jobs-prev"[^>]*href="([^"]+)"', html2).group(1).replace("&amp;", "&")
    assert page_ids(alice_page, prev_url) == first  # "Previous" is a full first page


def test_members_see_their_own_jobs_admins_all_with_owners(
    app: Flask, db_url: str, users: Any, alice_page: FlaskClient
) -> None:
    mine = add_jobs(db_url, [{"owner": users.alice.id, "name": "alice-job"}])
    theirs = add_jobs(db_url, [{"owner": users.bob.id, "name": "bob-job"}])
    html = alice_page.get("/").get_data(as_text=True)
    assert [int(i) for i in ROW_ID.findall(html)] == mine
    assert "bob-job" not in html and 'class="col-owner"' not in html
    assert 'id="filter-owner"' not in html
    # A member's owner filter cannot reach another user's jobs.
    assert page_ids(alice_page, "/?owner=bob") == mine
    admin = session_client(app, db_url, users.admin)
    html = admin.get("/").get_data(as_text=True)
    assert [int(i) for i in ROW_ID.findall(html)] == theirs + mine
    assert html.count('class="col-owner" data-label="Owner">alice<') == 1
    assert html.count('class="col-owner" data-label="Owner">bob<') == 1
    assert page_ids(admin, "/?owner=bob") == theirs


def test_empty_states(db_url: str, users: Any, alice_page: FlaskClient) -> None:
    html = alice_page.get("/").get_data(as_text=True)
    assert 'id="jobs-empty"' in html and "No jobs yet" in html and 'href="/submit"' in html
    add_jobs(db_url, [{"owner": users.alice.id, "name": "x"}])
    html = alice_page.get("/?state=running").get_data(as_text=True)
    assert "No jobs match" in html and 'href="/"' in html  # the way back: clear filters


def test_key_metric_progress_and_times(db_url: str, users: Any, alice_page: FlaskClient) -> None:
    a = users.alice.id
    add_jobs(db_url, [
        {"owner": a, "name": "cls", "metrics": {"val_accuracy": 0.9712, "val_loss": 0.1}},
        {"owner": a, "name": "reg", "dataset_name": "synthetic_regression",
         "metrics": {"val_loss": 0.25, "val_mse": 0.25}},
        {"owner": a, "name": "eval", "kind": "evaluate", "metrics": {"accuracy": 0.95}},
        {"owner": a, "name": "live", "state": "running",
         "progress": {"epoch": 3, "epochs": 10, "fraction": 0.25, "eta_s": 65.0}},
    ])  # fmt: skip
    html = alice_page.get("/").get_data(as_text=True)
    cells = re.findall(r'<td class="col-metric" data-label="Key metric">(.*?)</td>', html, re.S)
    text = [re.sub(r"<[^>]+>", "", c).split() for c in cells]
    assert text == [["—"], ["0.95", "accuracy"], ["0.25", "val_loss"], ["0.9712", "val_accuracy"]]
    assert "epoch\u00a03/10 · 25% · ETA\u00a01\u00a0m\u00a005\u00a0s" in html
    assert 'data-poll="1"' in html  # a running job on the page: jobs.js refreshes it
    assert 'title="2026-11-01 12:00:00 UTC"' in html  # exact submit time as a tooltip


def test_list_rejects_bad_cursors_and_sorts(client: FlaskClient) -> None:
    cases = [
        ("cursor=nope", "cursor"),
        ("sort=name&cursor=" + PageCursor("newest", True, 0, (5,)).encode(), "cursor"),
        ("cursor=" + PageCursor("newest", True, 0, (2**63,)).encode(), "cursor"),
        ("cursor=" + PageCursor("name", True, 0, ("a\x00", 1)).encode() + "&sort=name", "cursor"),
        ("sort=name&before=5", "before"),
        ("sort=sideways", "sort"),
        ("q=" + "x" * 201, "q"),
    ]
    for query, field in cases:
        resp = client.get(f"/api/v1/jobs?{query}")
        assert resp.status_code == 400, (query, resp.get_json())
        assert field in resp.get_json()["error"]["fields"], query


def test_migration_backfills_tags_from_specs(tmp_path: Any, db_url: str) -> None:
    # A database at 0005 with jobs, then the upgrade: tags come from each spec.
    if db_url.startswith("sqlite"):
        url = f"sqlite:///{tmp_path / 'old.db'}"
    else:
        url = db_url
        with get_engine(url).begin() as conn:  # the fixture made the schema: start over
            conn.execute(sa.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    upgrade_database(url, "0005")
    jobs = sa.table("jobs", *(sa.column(c) for c in (
        "id", "kind", "state", "queue", "priority", "attempt", "max_attempts",
        "cancel_requested", "created_at", "updated_at")), sa.column("spec", sa.JSON))  # fmt: skip
    specs = [{"tags": ["a", "b", "a"]}, {"tags": []}, {"name": "no tags"}, {"tags": "oops"}]
    now = sa.func.now() if url.startswith("postgresql") else sa.text("CURRENT_TIMESTAMP")
    with get_engine(url).begin() as conn:
        for i, spec in enumerate(specs, start=1):
            conn.execute(jobs.insert().values(
                id=i, kind="train", state="succeeded", queue="cpu", priority=5, attempt=1,
                max_attempts=3, cancel_requested=False, created_at=now, updated_at=now, spec=spec))  # fmt: skip
    upgrade_database(url)
    with get_engine(url).connect() as conn:
        rows = conn.execute(sa.text("SELECT job_id, tag FROM job_tags ORDER BY job_id, tag")).all()
    assert [tuple(r) for r in rows] == [(1, "a"), (1, "b")]
