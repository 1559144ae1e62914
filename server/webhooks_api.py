"""Webhooks over HTTP: the caller's notification endpoints and their delivery log.

    POST   /api/v1/webhooks                      create: 201, the secret in this answer only
    GET    /api/v1/webhooks                      yours (admins: all=true)
    GET    /api/v1/webhooks/{id}
    PATCH  /api/v1/webhooks/{id}                 change; rotate_secret=true answers a new one
    DELETE /api/v1/webhooks/{id}
    GET    /api/v1/webhooks/{id}/deliveries      the delivery log, newest first
    POST   /api/v1/webhooks/{id}/test            queue a ping: 202

The rules (events, formats, which URLs, the outbox) are shared/webhooks.py's; sending is
shared/webhook_delivery.py's, in the reconciler. Owned like jobs: someone else's webhook
reads as missing; admins see and change all of them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from flask import Blueprint, current_app, jsonify
from flask.typing import ResponseReturnValue
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select

from server.access import can_see
from server.api_schemas import ResponseModel
from server.auth import api_user, authenticate_api_request
from server.database import get_session
from server.errors import ApiError
from server.openapi import operation
from server.params import NoQuery, QueryModel, check_path_ids, json_body, parse_query
from server.serialize import iso
from shared import webhooks
from shared.orm import NotificationEvent, User, Webhook, WebhookDelivery

bp = Blueprint("webhooks_v1", __name__, url_prefix="/api/v1/webhooks")
bp.before_request(authenticate_api_request)
bp.before_request(check_path_ids)

EventName = Literal["job.succeeded", "job.failed", "job.cancelled", "job.stalled", "sweep.finished"]
FormatName = Literal["json", "slack", "teams"]
assert set(EventName.__args__) == set(webhooks.EVENTS)  # type: ignore[attr-defined]
assert set(FormatName.__args__) == set(webhooks.FORMATS)  # type: ignore[attr-defined]

_URL = "where events are POSTed: http:// or https://, no user:password@; private addresses " \
    "only where TRAINYARD_WEBHOOK_ALLOW_PRIVATE allows them"  # fmt: skip
_STALL = "job.stalled: a running job whose progress has not changed for this many minutes"


class WebhookCreate(BaseModel):
    # Strict: `"enabled": 0` or `"stall_minutes": "30"` is refused, as the document says.
    model_config = ConfigDict(extra="forbid", strict=True)

    url: str = Field(
        max_length=webhooks.MAX_URL_LENGTH, description=_URL,
        examples=["https://hooks.example.com/trainyard"],
    )  # fmt: skip
    events: list[EventName] = Field(
        min_length=1, max_length=10, description="what to send",
        examples=[["job.failed", "job.stalled"]],
    )  # fmt: skip
    format: FormatName = Field(
        default="json", description="json (the event), slack or teams (a chat message)"
    )
    stall_minutes: int = Field(
        default=webhooks.DEFAULT_STALL_MINUTES, ge=1, le=webhooks.MAX_STALL_MINUTES,
        description=_STALL,
    )  # fmt: skip
    enabled: bool = True


class WebhookChange(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    url: str | None = Field(default=None, max_length=webhooks.MAX_URL_LENGTH, description=_URL)
    events: list[EventName] | None = Field(default=None, min_length=1, max_length=10)
    format: FormatName | None = None
    stall_minutes: int | None = Field(default=None, ge=1, le=webhooks.MAX_STALL_MINUTES)
    enabled: bool | None = None
    rotate_secret: bool = Field(
        default=False, description="make a new secret; the answer has it, this once"
    )


class WebhookListQuery(QueryModel):
    all: bool = Field(default=False, description="every user's webhooks (admins only)")


class DeliveryListQuery(QueryModel):
    limit: int = Field(default=100, ge=1, le=1000, description="at most this many, newest first")


class WebhookOut(ResponseModel):
    id: int
    owner: str = Field(description="the owner's username")
    url: str
    events: list[str]
    format: str
    stall_minutes: int
    enabled: bool
    secret_hint: str = Field(description="the secret's first characters, to recognise it")
    created_at: datetime
    updated_at: datetime


class WebhookCreatedOut(WebhookOut):
    secret: str = Field(
        description="signs every delivery (Trainyard-Signature); shown in this answer only"
    )


class WebhookChangedOut(WebhookOut):
    secret: str | None = Field(default=None, description="the new secret, with rotate_secret only")


class Webhooks(ResponseModel):
    webhooks: list[WebhookOut]


class WebhookDeliveryOut(ResponseModel):
    id: int
    event_id: str = Field(description="what receivers dedupe on (Trainyard-Event-Id)")
    event: str
    status: str = Field(description="pending, delivered, or failed (given up)")
    attempts: int
    next_attempt_at: datetime | None = Field(description="while pending")
    last_status_code: int | None
    last_error: str | None
    delivered_at: datetime | None
    created_at: datetime


class WebhookDeliveries(ResponseModel):
    webhook_id: int
    deliveries: list[WebhookDeliveryOut]


class WebhookPing(ResponseModel):
    event_id: str = Field(description="the test event's id; its delivery is in the log")


# ---------------------------------------------------------------- helpers


def _body(model: type[BaseModel], message: str) -> Any:
    try:
        return model.model_validate(json_body("invalid_webhook", message))
    except ValidationError as exc:
        fields = {".".join(str(p) for p in e["loc"]) or "body": e["msg"] for e in exc.errors()}
        raise ApiError(422, "invalid_webhook", message, fields) from None


def _refused(exc: webhooks.WebhookError, message: str) -> ApiError:
    if exc.field == "max_webhooks_per_user":
        return ApiError(409, "quota_exceeded", exc.message, {exc.field: exc.message})
    return ApiError(422, "invalid_webhook", message, {exc.field: exc.message})


def visible_webhook(webhook_id: int) -> Webhook:
    """The webhook, or a 404 that reads the same whether it is missing or someone else's."""
    hook = get_session().get(Webhook, webhook_id)
    if hook is None or not can_see(hook.owner_id):
        raise ApiError(404, "not_found", f"webhook {webhook_id} does not exist",
                       {"webhook_id": "no such webhook"})  # fmt: skip
    return hook


def webhook_json(hook: Webhook, owner: str | None = None) -> dict[str, Any]:
    if owner is None:
        owner = webhooks.owner_name(get_session(), hook.owner_id) or ""
    return {
        "id": hook.id,
        "owner": owner,
        "url": hook.url,
        "events": list(hook.events or []),
        "format": hook.format,
        "stall_minutes": hook.stall_minutes,
        "enabled": hook.enabled,
        "secret_hint": hook.secret[: len(webhooks.SECRET_PREFIX) + 4] + "…",
        "created_at": iso(hook.created_at),
        "updated_at": iso(hook.updated_at),
    }


def delivery_log(webhook_id: int, limit: int) -> list[dict[str, Any]]:
    """The webhook's deliveries, newest first (the API's and the settings page's)."""
    rows = get_session().execute(
        select(WebhookDelivery, NotificationEvent.kind)
        .join(NotificationEvent, NotificationEvent.event_id == WebhookDelivery.event_id)
        .where(WebhookDelivery.webhook_id == webhook_id)
        .order_by(WebhookDelivery.id.desc()).limit(limit)
    ).all()  # fmt: skip
    return [
        {
            "id": d.id,
            "event_id": d.event_id,
            "event": kind,
            "status": d.status,
            "attempts": d.attempts,
            "next_attempt_at": iso(d.next_attempt_at) if d.status == "pending" else None,
            "last_status_code": d.last_status_code,
            "last_error": d.last_error,
            "delivered_at": iso(d.delivered_at),
            "created_at": iso(d.created_at),
        }
        for d, kind in rows
    ]


def list_rows(owner_id: int | None) -> list[tuple[Webhook, str]]:
    """Webhooks with their owners' names, newest first; everyone's for None."""
    stmt = select(Webhook, User.username).join(User, User.id == Webhook.owner_id)
    if owner_id is not None:
        stmt = stmt.where(Webhook.owner_id == owner_id)
    return [(h, name) for h, name in get_session().execute(stmt.order_by(Webhook.id.desc()))]


# ---------------------------------------------------------------- routes

_WRITE_ERRORS = {
    409: "You have TRAINYARD_MAX_WEBHOOKS_PER_USER webhooks already.",
    413: "",
    415: "",
    422: "A field is invalid (`error.fields` names it): an event or format that does not "
    "exist, or a URL that is not http(s), carries credentials, does not resolve, or "
    "resolves to a private address where those are refused.",
}


@bp.post("")
@operation(
    tag="webhooks", json=WebhookCreate, ok={201: WebhookCreatedOut}, errors=_WRITE_ERRORS,
    validate=False,
)  # fmt: skip
def create_webhook() -> ResponseReturnValue:
    """Create a webhook; its signing secret is in this answer only."""
    parse_query(NoQuery)
    body: WebhookCreate = _body(WebhookCreate, "invalid webhook")
    session = get_session()
    try:
        hook = webhooks.create_webhook(
            session, current_app.config["TRAINYARD_SETTINGS"], api_user().id,
            url=body.url, events=body.events, format=body.format,
            stall_minutes=body.stall_minutes, enabled=body.enabled,
        )  # fmt: skip
    except webhooks.WebhookError as exc:
        raise _refused(exc, "invalid webhook") from None
    session.commit()
    out = {**webhook_json(hook, api_user().username), "secret": hook.secret}
    return jsonify(out), 201, {"Location": f"/api/v1/webhooks/{hook.id}"}


@bp.get("")
@operation(
    tag="webhooks", query=WebhookListQuery, ok={200: Webhooks},
    errors={403: "`all=true` from a caller who is not an admin."},
)  # fmt: skip
def list_webhooks() -> ResponseReturnValue:
    """Your webhooks, newest first (`all=true`: everyone's, admins)."""
    query = parse_query(WebhookListQuery)
    user = api_user()
    if query.all and not user.is_admin:
        raise ApiError(
            403, "forbidden", "only admins can list every user's webhooks", {"all": "admins only"}
        )
    rows = list_rows(None if query.all else user.id)
    return jsonify({"webhooks": [webhook_json(h, owner) for h, owner in rows]})


@bp.get("/<int:webhook_id>")
@operation(tag="webhooks", ok={200: WebhookOut}, errors=(404,))
def get_webhook(webhook_id: int) -> ResponseReturnValue:
    """One webhook (never its secret)."""
    parse_query(NoQuery)
    return jsonify(webhook_json(visible_webhook(webhook_id)))


@bp.patch("/<int:webhook_id>")
@operation(
    tag="webhooks", json=WebhookChange, ok={200: WebhookChangedOut},
    errors={404: "", **_WRITE_ERRORS}, validate=False,
)  # fmt: skip
def change_webhook(webhook_id: int) -> ResponseReturnValue:
    """Change a webhook's URL, events, format, stall time or enabled flag, or rotate its
    secret (the answer carries the new secret then, and only then)."""
    parse_query(NoQuery)
    hook = visible_webhook(webhook_id)
    body: WebhookChange = _body(WebhookChange, "invalid webhook change")
    changes = body.model_dump(exclude_unset=True)
    nulls = [name for name, value in changes.items() if value is None]
    if nulls:
        raise ApiError(422, "invalid_webhook", "invalid webhook change",
                       {name: "must not be null" for name in nulls})  # fmt: skip
    session = get_session()
    try:
        rotated = webhooks.update_webhook(
            session, current_app.config["TRAINYARD_SETTINGS"], hook, changes
        )
    except webhooks.WebhookError as exc:
        raise _refused(exc, "invalid webhook change") from None
    session.commit()
    out = webhook_json(hook)
    if rotated:
        out["secret"] = hook.secret
    return jsonify(out)


@bp.delete("/<int:webhook_id>")
@operation(tag="webhooks", ok={200: WebhookOut}, errors=(404, 413))
def delete_webhook(webhook_id: int) -> ResponseReturnValue:
    """Delete a webhook and its delivery log; nothing more is sent to it."""
    parse_query(NoQuery)
    hook = visible_webhook(webhook_id)
    out = webhook_json(hook)
    delete_webhook_row(hook)
    return jsonify(out)


def delete_webhook_row(hook: Webhook) -> None:
    """Delete a webhook, its deliveries and its pings (the settings page's too)."""
    session = get_session()
    session.query(WebhookDelivery).filter(WebhookDelivery.webhook_id == hook.id).delete()
    session.query(NotificationEvent).filter(NotificationEvent.webhook_id == hook.id).delete()
    session.delete(hook)
    session.commit()


@bp.get("/<int:webhook_id>/deliveries")
@operation(tag="webhooks", query=DeliveryListQuery, ok={200: WebhookDeliveries}, errors=(404,))
def list_deliveries(webhook_id: int) -> ResponseReturnValue:
    """The webhook's delivery log: each event's status, attempts, last answer or error
    and, while pending, when it is tried next."""
    query = parse_query(DeliveryListQuery)
    hook = visible_webhook(webhook_id)
    return jsonify({"webhook_id": hook.id, "deliveries": delivery_log(hook.id, query.limit)})


@bp.post("/<int:webhook_id>/test")
@operation(tag="webhooks", ok={202: WebhookPing}, errors=(404, 413))
def test_webhook(webhook_id: int) -> ResponseReturnValue:
    """Queue a `ping` event for this webhook (sent even while it is disabled); follow it
    in the delivery log."""
    parse_query(NoQuery)
    hook = visible_webhook(webhook_id)
    session = get_session()
    event_id = webhooks.queue_ping(session, hook)
    session.commit()
    return jsonify({"event_id": event_id}), 202
