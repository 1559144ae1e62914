"""A job failing while its page is open, in Chromium (issue 11, "Leaks"): the member
who owns it sees the message without server paths and the log without the traceback,
as the live stream delivers them and after the page refreshes its sections; an admin
sees the traceback and the paths."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db import get_engine, transaction
from shared.job_files import log_path
from shared.orm import User
from shared.redaction import ERROR_DETAIL, HIDDEN_NOTICE
from shared.settings import Settings
from shared.state_machine import JobState, finish_job
from tests.browser.conftest import DESKTOP, Ui, log_in, make_user
from tests.job_rows import add_jobs

PREFIX = "2026-11-28T15:04:05.123Z [attempt 1] "


def fail_with_a_leaky_error(settings: Settings, db_url: str, job_id: int) -> list[str]:
    """What the worker writes for a code error (worker/runner.py): the log's final line
    and the traceback as detail lines, the row's message redacted, the detail in result."""
    secret = str(settings.resolved_artifacts_dir / "jobs" / str(job_id) / "weights.bin")
    site = "/opt/venv/lib/python3.11/site-packages/torch/serialization.py"
    lines = [
        f"failed: RuntimeError: shape mismatch loading {secret}",
        "| Traceback (most recent call last):",
        f'|   File "{site}", line 1025, in load',
        "|     raise RuntimeError(message)",
        f"| RuntimeError: shape mismatch loading {secret}",
    ]
    with open(log_path(settings, job_id), "a") as f:
        f.write("".join(f"{PREFIX}{line}\n" for line in lines))
    detail = "\n".join(line.removeprefix("| ") for line in lines)
    with transaction(db_url) as session:
        assert finish_job(
            session, job_id, 1, JobState.FAILED, error_type="RuntimeError",
            error_message=f"shape mismatch loading <artifacts>/jobs/{job_id}/weights.bin",
            result={ERROR_DETAIL: detail},
        )  # fmt: skip
    return [secret, site, "Traceback", "site-packages", str(settings.resolved_artifacts_dir)]


def page_text(page) -> str:  # type: ignore[no-untyped-def]
    return page.locator("body").inner_text()


def test_a_member_watching_a_job_fail_sees_no_paths_or_traceback(
    ui: Ui, db_url: str, settings: Settings, browser, live_server: str
) -> None:  # type: ignore[no-untyped-def]
    with Session(get_engine(db_url)) as s:
        owner = s.scalar(select(User.id).where(User.username == ui.username))
    [job_id] = add_jobs(db_url, [{"owner": owner, "state": "running", "name": "leaky"}])
    path = log_path(settings, job_id)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{PREFIX}claimed by host:1 on cpu\n")
    ui.goto(f"/jobs/{job_id}")
    ui.page.locator('#live-status[data-status="live"]').wait_for()  # type: ignore[attr-defined]

    secrets = fail_with_a_leaky_error(settings, db_url, job_id)
    page = ui.page
    # The stream delivers the log lines, then the end; the page refreshes its sections.
    page.locator("#job-log", has_text=HIDDEN_NOTICE).wait_for()  # type: ignore[attr-defined]
    page.locator("#job-error").wait_for()  # type: ignore[attr-defined]
    text = page_text(page)
    assert f"shape mismatch loading <artifacts>/jobs/{job_id}/weights.bin" in text
    for secret in secrets:
        assert secret not in text, secret
    ui.shot("job-failed-member")
    # A fresh load of the page reads the same.
    ui.goto(f"/jobs/{job_id}")
    text = page_text(page)
    assert HIDDEN_NOTICE in text and all(secret not in text for secret in secrets)

    # An admin sees the traceback and the paths, on the page and in the log.
    make_user(db_url, "root", "admin")
    context = browser.new_context(viewport=DESKTOP)
    admin = context.new_page()
    admin.set_default_timeout(15_000)
    log_in(admin, live_server, "root")
    admin.goto(f"{live_server}/jobs/{job_id}")
    admin.locator("#job-error details summary").click()
    text = page_text(admin)
    assert "Traceback (most recent call last):" in text and secrets[0] in text
    assert HIDDEN_NOTICE not in text
    context.close()
