"""The web UI end to end, in Chromium, against a real `celery worker` training real jobs.

One test walks the whole story (a worker takes seconds to start, so it is shared):
submit from the form (first with a bad value), watch the job train live to
`succeeded` with the charts filling in, clone it with another learning rate, compare the
two runs, evaluate one, cancel a running job, and look at every page. Each page is
screenshotted at desktop and phone widths into test-artifacts/screenshots/.
"""

from __future__ import annotations

import re

import pytest

from tests.browser.conftest import Ui

pytestmark = pytest.mark.integration

# Long enough to be caught running, short enough never to matter if it is not.
LONG_EPOCHS = "300"


def job_id_from_url(url: str) -> int:
    match = re.search(r"/jobs/(\d+)$", url)
    assert match, url
    return int(match.group(1))


def wait_for_state(ui: Ui, state: str, timeout_s: float = 120) -> None:
    # The page's own live updates (SSE) must get it there: no reloads.
    ui.page.locator(f'#job-page[data-state="{state}"]').wait_for(timeout=timeout_s * 1000)  # type: ignore[attr-defined]


def submit_train_job(ui: Ui, name: str, epochs: str, lr: str | None = None) -> int:
    page = ui.page
    page.locator("#f-name").fill(name)  # type: ignore[attr-defined]
    page.locator("#f-train-epochs").fill(epochs)  # type: ignore[attr-defined]
    if lr is not None:
        page.locator("#f-train-optimizer-adam-lr").fill(lr)  # type: ignore[attr-defined]
    page.locator("#submit-button").click()  # type: ignore[attr-defined]
    page.wait_for_url(re.compile(r".*/jobs/\d+$"))  # type: ignore[attr-defined]
    return job_id_from_url(page.url)  # type: ignore[attr-defined]


def test_submit_watch_clone_compare_evaluate_cancel(ui: Ui, start_worker) -> None:  # type: ignore[no-untyped-def]
    start_worker("cpu")
    page = ui.page

    # -- submit, with a mistake first: the error sits next to the field, input kept
    ui.goto("/submit")
    ui.shot("submit")
    page.locator("#f-name").fill("baseline")
    page.locator("#f-train-epochs").fill("0")
    page.locator("#submit-button").click()
    error = page.locator("#f-train-epochs-error")
    error.wait_for()
    assert "greater than or equal to 1" in error.inner_text()
    assert page.locator("#f-train-epochs").input_value() == "0"
    assert page.locator("#f-name").input_value() == "baseline"
    assert page.locator("#error-summary").is_visible()
    ui.shot("submit-errors")

    first = submit_train_job(ui, "baseline", "4", lr="0.003")
    # Live: the state badge and charts update without a reload.
    wait_for_state(ui, "succeeded")
    loss_chart = page.locator("#chart-loss .chart")
    loss_chart.wait_for()
    assert re.search(r"\d", loss_chart.get_attribute("aria-label") or ""), "chart without values"
    assert page.locator("#job-state").inner_text().strip() == "succeeded"
    # Where it ran, filled in live: the CPU worker's one slot.
    assert page.locator("#job-placement").inner_text().strip() == "slot 0 · CPU"
    assert page.locator("#timeline-list .tl-item").count() >= 2  # claimed, succeeded
    assert page.locator("#artifact-list a.artifact-link").count() >= 1
    ui.shot("job-succeeded")

    # -- clone and edit: the form comes prefilled from the job
    page.locator("#action-clone").click()
    page.wait_for_url(re.compile(r".*/submit\?clone=\d+$"))
    assert page.locator("#f-train-epochs").input_value() == "4"
    second = submit_train_job(ui, "higher-lr", "4", lr="0.01")
    wait_for_state(ui, "succeeded")

    # -- the jobs table, then compare the two runs picked with its checkboxes
    ui.goto("/")
    page.locator(f"#job-row-{second}").wait_for()
    ui.shot("jobs")
    page.locator(f"#select-{first}").check()
    page.locator(f"#select-{second}").check()
    page.locator("#compare-selected").click()
    page.wait_for_url(re.compile(r".*/compare\?ids=.*"))
    page.locator("#compare-chart canvas").first.wait_for()
    lr_row = page.locator('#compare-params tr[data-key="optimizer.lr"]')
    assert "0.003" in lr_row.inner_text() and "0.01" in lr_row.inner_text()
    # Only what differs is shown; equal settings wait behind "show all".
    assert page.locator('#compare-params tr[data-key="epochs"]').count() == 0
    ui.shot("compare")

    # -- evaluate the first run: metrics and a confusion matrix
    ui.goto(f"/jobs/{first}")
    page.locator("#action-evaluate summary").click()
    page.locator("#evaluate-submit").click()
    page.wait_for_url(re.compile(r".*/jobs/\d+$"))
    assert job_id_from_url(page.url) not in (first, second)
    wait_for_state(ui, "succeeded")
    page.locator("#confusion-matrix").wait_for()
    assert page.locator("#confusion-matrix td.heat").count() == 100  # digits: 10 x 10
    ui.shot("job-evaluate")

    # -- cancel a running job from its page
    ui.goto("/submit")
    submit_train_job(ui, "long-run", LONG_EPOCHS)
    wait_for_state(ui, "running", timeout_s=60)
    page.locator("#progress-epoch").wait_for()
    ui.shot("job-running")
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#action-cancel").click()
    wait_for_state(ui, "cancelled", timeout_s=60)

    # -- the remaining pages, with the data this test made
    ui.goto("/leaderboard?dataset=digits")
    assert page.locator("#leaderboard-table tr.leaderboard-row").count() >= 2
    ui.shot("leaderboard")
    ui.goto("/workers")
    page.locator(".node-card").first.wait_for()
    ui.shot("workers")
