"""Logging in and out in a real browser."""

from __future__ import annotations

import re

from tests.browser.conftest import PASSWORD, SCREENSHOTS, Ui, make_user


def test_login_errors_then_success_then_logout(browser, live_server: str, db_url: str) -> None:  # type: ignore[no-untyped-def]
    make_user(db_url, "grace")
    context = browser.new_context()
    page = context.new_page()
    page.goto(live_server + "/")
    page.wait_for_url(re.compile(r".*/login\?next=.*"))  # pages need a login
    page.get_by_label("Username").fill("grace")
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Log in").click()
    error = page.locator(".field-error")
    assert "Wrong username or password" in error.inner_text()
    # The username is kept; the password is not echoed back.
    assert page.get_by_label("Username").input_value() == "grace"
    assert page.get_by_label("Password").input_value() == ""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "login-error-desktop.png"), full_page=True)

    page.get_by_label("Password").fill(PASSWORD)
    page.keyboard.press("Enter")  # keyboard-only works
    page.wait_for_url(re.compile(r".*/$"))
    assert "grace" in page.locator(".account").inner_text()

    page.get_by_role("button", name="Log out").click()
    page.wait_for_url(re.compile(r".*/login$"))
    page.goto(live_server + "/")
    page.wait_for_url(re.compile(r".*/login\?next=.*"))
    context.close()


def test_api_docs_page(ui: Ui) -> None:
    ui.goto("/api/docs")
    ui.page.get_by_text("/api/v1/jobs/{job_id}/cancel").wait_for()  # type: ignore[attr-defined]
    ui.shot("api-docs")
