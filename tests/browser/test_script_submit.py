"""The "Run your code" page in a real browser: from the submit page's link, a bundle
chosen in the file input and a bad params field shown next to it, then fixed and
submitted, landing on the queued script job's page."""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

from playwright.sync_api import expect

from shared import accounts
from shared.db import transaction
from tests.browser.conftest import Ui


def write_bundle(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        data = b"from worker import sdk\nsdk.finish({'val_accuracy': 1.0})\n"
        info = tarfile.TarInfo("train.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_run_your_code_page_submits_a_script_job(ui: Ui, db_url: str, tmp_path: Path) -> None:
    with transaction(db_url) as s:
        user = accounts.find_user(s, ui.username)
        assert user is not None
        user.can_run_code = True
    page = ui.page
    ui.goto("/submit")
    page.click("#script-page-link")
    expect(page.locator("h1")).to_have_text("Run your code")
    page.set_input_files("#s-file", str(write_bundle(tmp_path / "project.tar.gz")))
    page.fill("#s-args", "--epochs 2 --note 'two words'")
    page.fill("#s-params", "{not json")
    page.click("#submit-button")
    expect(page.locator("#s-params-error")).to_contain_text("is not JSON")
    expect(page.locator("#error-summary")).to_be_visible()
    # The bundle was checked and stored on that try: it is picked now, no new upload.
    expect(page.locator("#s-file-status")).to_contain_text("Stored project.tar.gz as bundle")
    expect(page.locator("#s-bundle_id option:checked")).to_contain_text("project.tar.gz")
    page.fill("#s-params", '{"lr": 0.01}')
    page.click("#submit-button")
    expect(page).to_have_url(re.compile(r"/jobs/\d+$"))
    expect(page.locator("body")).to_contain_text("entry train.py")
    expect(page.locator("body")).to_contain_text("--epochs 2 --note 'two words'")
