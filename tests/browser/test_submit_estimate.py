"""The submit form's live estimate: typing a huge hidden size shows the job's size and
memory and that it is over the member's limits, before anything is submitted."""

from __future__ import annotations

from playwright.sync_api import expect

from tests.browser.conftest import Ui


def test_the_estimate_follows_what_the_user_types(ui: Ui) -> None:
    page = ui.page
    ui.goto("/submit")
    figures = page.locator("#estimate-figures")
    over = page.locator("#estimate-over")
    # The default job (the CNN on digits) is small and within every limit.
    expect(figures).to_contain_text("Estimate: 53,002 parameters")  # type: ignore[attr-defined]
    expect(over).to_be_hidden()

    page.select_option("#f-train-model-name", "mlp")  # type: ignore[attr-defined]
    page.locator("#f-train-model-mlp-params-layers").fill("16")  # type: ignore[attr-defined]
    page.locator("#f-train-model-mlp-params-hidden").fill("8192")  # type: ignore[attr-defined]
    # 64 inputs x 8192, 15 x (8192^2 + 8192), 8192 x 10 outputs + biases
    expect(figures).to_contain_text("1,007,370,250 parameters")
    expect(figures).to_contain_text("GiB of memory")
    expect(over).to_be_visible()
    expect(over).to_contain_text("the model would have 1,007,370,250 parameters")
    expect(over).to_contain_text("the limit is 100,000,000")
    expect(page.locator("#job-estimate")).to_have_class("job-estimate over")
    ui.shot("submit-estimate-over")

    # Back within the limits: the warning goes.
    page.locator("#f-train-model-mlp-params-hidden").fill("64")  # type: ignore[attr-defined]
    expect(over).to_be_hidden()
    expect(figures).to_contain_text("parameters")
    expect(figures).not_to_contain_text("1,007,370,250")

    # Submitting the huge one anyway gets the same refusal next to the input.
    page.locator("#f-train-model-mlp-params-hidden").fill("8192")  # type: ignore[attr-defined]
    page.locator("#submit-button").click()  # type: ignore[attr-defined]
    expect(page.locator("#f-train-model-mlp-params-hidden-error")).to_contain_text(
        "the limit is 100,000,000"
    )
