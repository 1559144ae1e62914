"""Browser tests: Playwright (Python) driving Debian's Chromium, headless.

Playwright never downloads a browser here: it launches the system Chromium
(TRAINYARD_TEST_CHROMIUM, default /usr/bin/chromium; scripts/test.sh installs it).
Set TRAINYARD_TEST_SKIP_BROWSER=1 to skip these tests on a machine without one.
Screenshots of every page land in test-artifacts/screenshots/ (desktop and narrow).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shared import accounts
from shared.db import get_engine, transaction
from shared.orm import Base
from tests.conftest import REPO

CHROMIUM = os.environ.get("TRAINYARD_TEST_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"
# Without the background-networking flags Chromium keeps dialling Google's hosts, which
# this closed network refuses; --no-sandbox because CI runs as root.
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
DESKTOP = {"width": 1280, "height": 860}
NARROW = {"width": 390, "height": 844}
PASSWORD = "correct horse battery"


@pytest.fixture
def db_url(tmp_path: Path) -> Iterator[str]:
    """SQLite only: the pages are the same on both databases, and the API tests already
    cover PostgreSQL; a browser test per backend would double the slowest tests."""
    url = f"sqlite:///{tmp_path / 'trainyard.db'}"
    Base.metadata.create_all(get_engine(url))
    yield url
    get_engine(url).dispose()


@pytest.fixture(scope="session")
def browser():  # type: ignore[no-untyped-def]
    if os.environ.get("TRAINYARD_TEST_SKIP_BROWSER") == "1":
        pytest.skip("TRAINYARD_TEST_SKIP_BROWSER=1")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"no Chromium at {CHROMIUM}: install the 'chromium' package (scripts/test.sh does)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@dataclass
class Ui:
    """A logged-in browser tab on the live server, collecting console errors."""

    base: str
    page: object
    username: str
    errors: list[str] = field(default_factory=list)

    def goto(self, path: str) -> None:
        self.page.goto(self.base + path)  # type: ignore[attr-defined]

    def shot(self, name: str) -> None:
        """Screenshots at desktop and phone widths, for people to look at."""
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page = self.page
        for label, size in (("desktop", DESKTOP), ("narrow", NARROW)):
            page.set_viewport_size(size)  # type: ignore[attr-defined]
            page.screenshot(path=str(SCREENSHOTS / f"{name}-{label}.png"), full_page=True)  # type: ignore[attr-defined]
        page.set_viewport_size(DESKTOP)  # type: ignore[attr-defined]


def make_user(db_url: str, username: str, role: str = "member") -> None:
    with transaction(db_url) as session:
        accounts.create_user(session, username, role, password=PASSWORD)


def log_in(page, base: str, username: str) -> None:  # type: ignore[no-untyped-def]
    page.goto(base + "/login")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(re.compile(r".*/$"))


# Chrome logs every 4xx document as a console error; a form answered with 422 (inline
# field errors) or a 404 page is the app working, not a broken page.
_EXPECTED_STATUS = re.compile(r"^Failed to load resource: .* status of (400|404|409|422|429)\b")


def _collect(errors: list[str], kind: str, text: str) -> None:
    if kind == "error" and not _EXPECTED_STATUS.match(text):
        errors.append(text)


@pytest.fixture
def ui(browser, live_server: str, db_url: str) -> Iterator[Ui]:  # type: ignore[no-untyped-def]
    make_user(db_url, "ada")
    context = browser.new_context(viewport=DESKTOP)
    page = context.new_page()
    page.set_default_timeout(15_000)
    session = Ui(live_server, page, "ada")
    # A CSP violation or a script error is a bug on a page that otherwise "looks fine".
    page.on("console", lambda msg: _collect(session.errors, msg.type, msg.text))
    page.on("pageerror", lambda exc: session.errors.append(str(exc)))
    log_in(page, live_server, "ada")
    yield session
    context.close()
    assert not session.errors, f"browser console errors: {session.errors}"
