"""The job page when its live stream is refused (issue 11: open streams are capped per
user): it says live updates are paused, keeps working, and retries slowly instead of
hammering the server."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db import get_engine
from shared.orm import User
from shared.settings import Settings
from tests.browser.conftest import Ui
from tests.job_rows import add_jobs


@pytest.fixture
def settings(db_url: str, redis_url: str, tmp_path: Path) -> Settings:
    # One open stream per user: the second tab is over the cap.
    return Settings(
        home=tmp_path / "home",
        database_url=db_url,
        redis_url=redis_url,
        artifacts_dir=tmp_path / "artifacts",
        max_streams_per_user=1,
    )


def test_a_refused_stream_pauses_live_updates_and_retries_slowly(ui: Ui, db_url: str) -> None:
    with Session(get_engine(db_url)) as s:
        owner = s.scalar(select(User.id).where(User.username == ui.username))
    [job_id] = add_jobs(db_url, [{"owner": owner, "state": "running", "name": "watched"}])
    ui.goto(f"/jobs/{job_id}")
    ui.page.locator('#live-status[data-status="live"]').wait_for()  # type: ignore[attr-defined]

    # A second tab of the same user: its stream gets 429.
    second = ui.page.context.new_page()  # type: ignore[attr-defined]
    second.on("console", lambda msg: _console(ui, msg.type, msg.text))
    streams: list[float] = []
    second.on(
        "request",
        lambda req: streams.append(time.monotonic()) if req.url.split("?")[0].endswith(
            f"/jobs/{job_id}/stream") else None,
    )  # fmt: skip
    second.goto(ui.base + f"/jobs/{job_id}")
    second.locator("#live-status", has_text="Live updates paused").wait_for()
    # The page still works without live updates: its job, timeline and actions are there.
    assert second.locator("#job-page").get_attribute("data-state") == "running"
    assert second.get_by_role("button", name="Cancel").count() == 1
    # It tries again, but slowly (seconds apart, growing), not in a storm.
    deadline = time.monotonic() + 12
    while time.monotonic() < deadline:
        second.wait_for_timeout(500)
    assert 2 <= len(streams) <= 4, streams
    second.close()


def _console(ui: Ui, kind: str, text: str) -> None:
    # Chromium reports the refused stream itself; anything else is a bug.
    if kind == "error" and "429" not in text:
        ui.errors.append(text)
