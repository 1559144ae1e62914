"""The sweep pages in a real browser: a sweep written in the form (a bad space first,
named next to the text), then its page while trials finish: counts, best trial, the
table's order and both charts redraw live without a reload; cancel asks first, then the
page offers resume."""

from __future__ import annotations

import re
from datetime import timedelta

from playwright.sync_api import expect

from shared.db import transaction, utcnow
from shared.orm import Job, SweepTrial
from shared.settings import Settings
from shared.sweep_controller import tick
from tests.browser.conftest import Ui
from tests.test_sweep_pages import YAML_SPEC as SPEC


def _finish(db_url: str, job_id: int, value: float, ago_s: float) -> None:
    with transaction(db_url) as s:
        job = s.get(Job, job_id)
        job.state, job.finished_at = "succeeded", utcnow() - timedelta(seconds=ago_s)
        job.result = {"metrics": {"val_accuracy": value, "num_parameters": 4810.0,
                                  "samples_per_s": 12345.6}}  # fmt: skip


def _order(ui: Ui) -> list[str]:
    return ui.page.locator("#sweep-trials tbody tr.trial-row").evaluate_all(  # type: ignore[attr-defined]
        "rows => rows.map(r => r.dataset.trial)"
    )


def test_a_sweep_from_the_form_and_its_live_page(ui: Ui, db_url: str, settings: Settings) -> None:
    page = ui.page
    ui.goto("/sweeps")
    expect(page.locator("#sweeps-empty")).to_be_visible()
    page.click("#new-sweep")
    page.fill("#sweep-spec", SPEC.replace("choice([relu, gelu])", "choice([relu, swish])"))
    page.click("#sweep-submit")
    error = page.locator('#sweep-spec-errors [data-field="space.model.params.activation"]')
    expect(error).to_contain_text("swish")
    expect(page.locator("#sweep-spec")).to_have_attribute("aria-invalid", "true")
    page.fill("#sweep-spec", SPEC)
    page.click("#sweep-submit")
    expect(page).to_have_url(re.compile(r"/sweeps/\d+$"))
    sweep_id = int(page.url.rsplit("/", 1)[1])
    expect(page.locator("#sweep-state")).to_have_text("running")
    expect(page.locator("#sweep-best")).to_contain_text("No trial has finished")
    expect(page.locator("#sweep-best-curve")).to_contain_text("No finished trial yet")

    # The controller creates the four trials; the page shows them without a reload.
    page.evaluate("window.__same_page = true")
    assert tick(settings, sweep_id, "test", lambda job: None).created == [0, 1, 2, 3]
    expect(page.locator('#sweep-counts [data-count="queued"] .count-n')).to_have_text("4")
    expect(page.locator("#sweep-trials tbody tr.trial-row")).to_have_count(4)
    with transaction(db_url) as s:
        jobs = [
            t.job_id
            for t in s.query(SweepTrial).filter_by(sweep_id=sweep_id).order_by(SweepTrial.number)
        ]

    _finish(db_url, jobs[0], 0.61, ago_s=40)
    _finish(db_url, jobs[2], 0.83, ago_s=20)
    expect(page.locator('#sweep-counts [data-count="succeeded"] .count-n')).to_have_text("2")
    expect(page.locator("#best-trial-link")).to_have_attribute("href", f"/jobs/{jobs[2]}")
    expect(page.locator("#sweep-best")).to_contain_text("val_accuracy 0.83")
    expect(page.locator("#sweep-best")).to_contain_text("4,810 parameters")
    assert _order(ui) == ["2", "0", "1", "3"]
    # Both charts: uPlot's canvas, and one parallel-coordinates line per finished trial
    # over an axis per parameter plus the metric.
    expect(page.locator("#sweep-best-curve canvas").first).to_be_visible()
    expect(page.locator("#sweep-parallel polyline.pc-line")).to_have_count(2)
    expect(page.locator("#sweep-parallel .pc-axis")).to_have_count(3)
    expect(page.locator("#sweep-parallel polyline.pc-line.is-best")).to_have_count(1)

    # A new best takes over everywhere.
    _finish(db_url, jobs[1], 0.95, ago_s=5)
    expect(page.locator("#best-trial-link")).to_have_attribute("href", f"/jobs/{jobs[1]}")
    expect(page.locator("#sweep-trials tbody tr.trial-row.is-best")).to_have_attribute(
        "data-trial", "1"
    )
    expect(page.locator("#sweep-parallel polyline.pc-line")).to_have_count(3)
    assert _order(ui) == ["1", "2", "0", "3"]
    assert page.evaluate("window.__same_page") is True  # redrawn, not reloaded
    # What the script drew reads exactly as what the server renders.
    drawn = [
        page.inner_text(sel) for sel in ("#sweep-trials tbody", "#sweep-best", "#sweep-counts")
    ]
    page.reload()
    assert [
        page.inner_text(sel) for sel in ("#sweep-trials tbody", "#sweep-best", "#sweep-counts")
    ] == drawn
    ui.shot("sweep-page")

    # Cancel asks first; declining changes nothing.
    page.once("dialog", lambda dialog: dialog.dismiss())
    page.click("#sweep-cancel")
    expect(page.locator("#sweep-state")).to_have_text("running")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#sweep-cancel")
    expect(page.locator("#sweep-state")).to_have_text("cancelled")
    expect(page.locator(".flash")).to_contain_text(f"Sweep #{sweep_id} cancelled")
    expect(page.locator('#sweep-counts [data-count="cancelled"] .count-n')).to_have_text("1")
    page.click("#sweep-resume")
    expect(page.locator("#sweep-state")).to_have_text("running")

    ui.goto("/sweeps")
    row = page.locator(f'#sweeps-table tr[data-sweep-id="{sweep_id}"]')
    expect(row).to_contain_text("from the form")
    expect(row).to_contain_text("0.95")
    # A trial's job page leads back to its sweep.
    ui.goto(f"/jobs/{jobs[1]}")
    page.click("#sweep-link")
    expect(page).to_have_url(re.compile(rf"/sweeps/{sweep_id}$"))
