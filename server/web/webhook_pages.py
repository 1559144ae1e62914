"""The webhooks settings page (/settings/webhooks): the user's webhooks (an admin's page
lists everyone's), a form to add one (its secret is shown on the answer, once), delete
and test buttons, and each webhook's recent deliveries. The rules are the API's
(shared/webhooks.py); this page only turns forms into their calls."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import current_app, flash, redirect, render_template, url_for
from flask.typing import ResponseReturnValue
from flask_login import current_user, login_required
from flask_wtf import FlaskForm
from wtforms import BooleanField, IntegerField, SelectField, SelectMultipleField, StringField
from wtforms.fields.choices import SelectChoice
from wtforms.validators import InputRequired, NumberRange
from wtforms.widgets import CheckboxInput, ListWidget

from server.database import get_session
from server.params import MAX_ID
from server.web import bp
from server.web.job_page import ActionForm
from server.webhooks_api import delete_webhook_row, delivery_log, list_rows
from shared import webhooks
from shared.orm import Webhook

LOG_ROWS = 20
EVENT_LABELS = {
    webhooks.JOB_SUCCEEDED: "a job succeeded",
    webhooks.JOB_FAILED: "a job failed",
    webhooks.JOB_CANCELLED: "a job was cancelled",
    webhooks.JOB_STALLED: "a running job made no progress for the stall time",
    webhooks.SWEEP_FINISHED: "a sweep finished",
}
FORMAT_LABELS = {"json": "JSON (the event)", "slack": "Slack message", "teams": "Teams card"}


class WebhookForm(FlaskForm):
    url = StringField("URL", validators=[InputRequired()], id="webhook-url")
    events = SelectMultipleField(
        "Events",
        choices=[SelectChoice(k, v) for k, v in EVENT_LABELS.items()],
        default=[webhooks.JOB_SUCCEEDED, webhooks.JOB_FAILED],
        widget=ListWidget(prefix_label=False),
        option_widget=CheckboxInput(),
        id="webhook-events",
    )
    format = SelectField(
        "Format",
        choices=[SelectChoice(k, v) for k, v in FORMAT_LABELS.items()],
        default="json",
        id="webhook-format",
    )
    stall_minutes = IntegerField(
        "Stall time (minutes)",
        default=webhooks.DEFAULT_STALL_MINUTES,
        validators=[InputRequired(), NumberRange(1, webhooks.MAX_STALL_MINUTES)],
        id="webhook-stall",
    )
    enabled = BooleanField("Enabled", default=True, id="webhook-enabled")


def _page(
    form: WebhookForm, created: Webhook | None = None, status: int = 200
) -> ResponseReturnValue:
    user = current_user._get_current_object()
    rows: list[dict[str, Any]] = [
        {"hook": hook, "owner": owner, "log": delivery_log(hook.id, LOG_ROWS)}
        for hook, owner in list_rows(None if user.is_admin else user.id)
    ]
    page = render_template(
        "webhooks.html", form=form, rows=rows, created=created, log_rows=LOG_ROWS,
        event_labels=EVENT_LABELS, allow_private=_settings().webhooks_allow_private,
    )  # fmt: skip
    return page, status


def _settings() -> Any:
    return current_app.config["TRAINYARD_SETTINGS"]


@bp.get("/settings/webhooks")
@login_required
def webhooks_page() -> ResponseReturnValue:
    return _page(WebhookForm())


@bp.post("/settings/webhooks")
@login_required
def webhook_create() -> ResponseReturnValue:
    form = WebhookForm()
    if not form.validate_on_submit():
        if "csrf_token" in form.errors:
            flash("The form had expired (no valid security token); try again.", "error")
        return _page(form, status=422)
    session = get_session()
    try:
        hook = webhooks.create_webhook(
            session, _settings(), current_user.id, url=form.url.data.strip(),
            events=form.events.data or [], format=form.format.data,
            stall_minutes=form.stall_minutes.data, enabled=form.enabled.data,
        )  # fmt: skip
    except webhooks.WebhookError as exc:
        session.rollback()
        target = getattr(form, exc.field, form.url)
        target.errors = [*target.errors, exc.message]
        return _page(form, status=422)
    session.commit()
    # The secret is on this answer only (not a redirect: it would have to travel in the
    # session cookie to reach the next page).
    return _page(WebhookForm(formdata=None), created=hook, status=201)


def _owned(webhook_id: int) -> Webhook | None:
    hook = get_session().get(Webhook, webhook_id) if webhook_id <= MAX_ID else None
    if hook is None or not (current_user.is_admin or hook.owner_id == current_user.id):
        return None
    return hook


def _not_found(webhook_id: int) -> ResponseReturnValue:
    message = f"Webhook {webhook_id} does not exist."
    return render_template("error.html", status=404, title="Not found", message=message), 404


def _act(webhook_id: int, act: Callable[[Webhook], str]) -> ResponseReturnValue:
    """A button on one webhook (CSRF token only), then back to the page."""
    hook = _owned(webhook_id)
    if hook is None:
        return _not_found(webhook_id)
    if not ActionForm().validate_on_submit():
        flash("The form had expired (no valid security token); try again.", "error")
    else:
        flash(act(hook), "info")
    return redirect(url_for("web.webhooks_page"), 303)


@bp.post("/settings/webhooks/<int:webhook_id>/delete")
@login_required
def webhook_delete(webhook_id: int) -> ResponseReturnValue:
    def delete(hook: Webhook) -> str:
        delete_webhook_row(hook)
        return f"Webhook {webhook_id} deleted."

    return _act(webhook_id, delete)


@bp.post("/settings/webhooks/<int:webhook_id>/test")
@login_required
def webhook_test(webhook_id: int) -> ResponseReturnValue:
    def ping(hook: Webhook) -> str:
        session = get_session()
        event_id = webhooks.queue_ping(session, hook)
        session.commit()
        return f"Test event {event_id} queued; its delivery shows below in a moment."

    return _act(webhook_id, ping)
