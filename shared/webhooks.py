"""Webhooks: which events exist, which URLs may receive them, what a body looks like, and
the outbox rows that record events (docs/architecture.md, "Webhooks").

An event is recorded as a `notification_outbox` row in the transaction of what it
reports, so it exists exactly when its cause was committed:

- job.succeeded / job.failed / job.cancelled: by shared/job_events.py `add_event`,
  which every move of the state machine into a finished state calls in its transaction;
- sweep.finished: by shared/sweep_controller.py where a sweep ends succeeded or failed;
- job.stalled: by shared/webhook_delivery.py's stalled pass (no progress for a
  webhook's `stall_minutes`);
- ping: by POST /api/v1/webhooks/<id>/test, for that webhook alone.

The event id names what happened ("job.failed:42:2" is job 42's attempt 2 failing) and
is unique, so recording one twice is a no-op. Events are recorded only for an owner with
an enabled webhook that wants them: a site without webhooks writes nothing.
Sending is shared/webhook_delivery.py's; signatures shared/webhook_signing.py's.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from shared.db import utcnow
from shared.metric_catalog import final_metrics, key_metric
from shared.orm import Base, Job, NotificationEvent, Sweep, SweepTrial, User, Webhook
from shared.settings import Settings

JOB_SUCCEEDED, JOB_FAILED, JOB_CANCELLED = "job.succeeded", "job.failed", "job.cancelled"
JOB_STALLED, SWEEP_FINISHED, PING = "job.stalled", "sweep.finished", "ping"
# What a webhook may subscribe to (a ping needs no subscription).
EVENTS = (JOB_SUCCEEDED, JOB_FAILED, JOB_CANCELLED, JOB_STALLED, SWEEP_FINISHED)
FORMATS = ("json", "slack", "teams")
# A finished job's timeline kind (shared/job_states.py) -> its event.
JOB_FINISH_EVENTS = {"succeeded": JOB_SUCCEEDED, "failed": JOB_FAILED, "cancelled": JOB_CANCELLED}
DEFAULT_STALL_MINUTES = 30
MAX_STALL_MINUTES = 7 * 24 * 60
MAX_URL_LENGTH = 2000
SECRET_PREFIX = "whsec_"
# Error messages travel in a payload; a receiver needs the gist, not a whole traceback.
MAX_MESSAGE = 500


class WebhookError(Exception):
    """A webhook that cannot be stored: `field` is what is wrong, `message` why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


# ---------------------------------------------------------------- addresses


def refused_address(address: str) -> str | None:
    """Why a webhook may not be sent to this IP address (None: a public address). Only
    globally routable unicast addresses pass: private, loopback, link-local (cloud
    metadata at 169.254.169.254 is one), carrier-grade NAT, multicast, reserved and
    unspecified ones are refused, IPv4-mapped IPv6 judged as the IPv4 it maps."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_global and not ip.is_multicast:
        return None
    for kind in ("loopback", "link_local", "private", "multicast", "unspecified", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return "not public"


Resolver = Callable[[str, int], list[str]]


def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (TCP), in the resolver's order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def checked_addresses(
    host: str, port: int, allow_private: bool, resolver: Resolver = resolve
) -> list[str]:
    """The addresses to connect to for `host`: all of them must be public unless
    `allow_private` (one private answer among public ones is refused too, or a DNS
    server could steer a retry to it). Raises WebhookError naming `url`."""
    try:
        addresses = resolver(host, port)
    except (OSError, UnicodeError) as exc:
        raise WebhookError("url", f"cannot resolve {host}: {exc}") from None
    if not addresses:
        raise WebhookError("url", f"{host} has no address")
    if not allow_private:
        for address in addresses:
            reason = refused_address(address)
            if reason:
                # Not the address itself: a member must not map the internal network.
                raise WebhookError(
                    "url",
                    f"{host} resolves to a {reason} address; webhooks go to public "
                    "addresses only here (TRAINYARD_WEBHOOK_ALLOW_PRIVATE)",
                )
    return addresses


def check_url(url: str, allow_private: bool, resolver: Resolver = resolve) -> str:
    """The URL, if webhooks may be sent there: http or https, a host, no credentials, and
    (unless `allow_private`) a host whose every address is public. Raises WebhookError."""
    if len(url) > MAX_URL_LENGTH:
        raise WebhookError("url", f"at most {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise WebhookError("url", "must not contain spaces or control characters")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise WebhookError("url", "must start with http:// or https://")
    if "@" in parts.netloc:
        raise WebhookError("url", "must not contain credentials (user:password@); "
                           "the signature authenticates the sender")  # fmt: skip
    host = parts.hostname
    if not host:
        raise WebhookError("url", "needs a host name or address")
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        raise WebhookError("url", "the port must be a number from 1 to 65535") from None
    if not allow_private:
        checked_addresses(host, port, allow_private, resolver)
    return url


# ---------------------------------------------------------------- webhooks


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def count_owned(session: Session, owner_id: int) -> int:
    stmt = select(func.count()).select_from(Webhook).where(Webhook.owner_id == owner_id)
    return int(session.execute(stmt).scalar_one())


def create_webhook(
    session: Session,
    settings: Settings,
    owner_id: int,
    *,
    url: str,
    events: Iterable[str],
    format: str = "json",
    stall_minutes: int = DEFAULT_STALL_MINUTES,
    enabled: bool = True,
) -> Webhook:
    """Store a new webhook with a fresh secret (the caller shows it once). Raises
    WebhookError: a bad URL, or `max_webhooks_per_user` reached (field of that name)."""
    if count_owned(session, owner_id) >= settings.max_webhooks_per_user:
        raise WebhookError(
            "max_webhooks_per_user",
            f"you have {settings.max_webhooks_per_user} webhooks, the most allowed; "
            "delete one first",
        )
    now = utcnow()
    hook = Webhook(
        owner_id=owner_id,
        url=check_url(url, settings.webhooks_allow_private),
        secret=new_secret(),
        events=check_events(events),
        format=check_format(format),
        stall_minutes=check_stall_minutes(stall_minutes),
        enabled=enabled,
        created_at=now,
        updated_at=now,
    )
    session.add(hook)
    session.flush()
    return hook


def update_webhook(
    session: Session, settings: Settings, hook: Webhook, changes: dict[str, Any]
) -> bool:
    """Apply `changes` (url, events, format, stall_minutes, enabled, rotate_secret);
    True when a new secret was made. Raises WebhookError."""
    if "url" in changes:
        hook.url = check_url(changes["url"], settings.webhooks_allow_private)
    if "events" in changes:
        hook.events = check_events(changes["events"])
    if "format" in changes:
        hook.format = check_format(changes["format"])
    if "stall_minutes" in changes:
        hook.stall_minutes = check_stall_minutes(changes["stall_minutes"])
    if "enabled" in changes:
        hook.enabled = bool(changes["enabled"])
    rotated = bool(changes.get("rotate_secret"))
    if rotated:
        hook.secret = new_secret()
    hook.updated_at = utcnow()
    session.flush()
    return rotated


def check_events(events: Iterable[str]) -> list[str]:
    chosen = list(dict.fromkeys(events))
    unknown = [e for e in chosen if e not in EVENTS]
    if unknown:
        raise WebhookError(
            "events", f"unknown event {unknown[0]!r}; choose from {', '.join(EVENTS)}"
        )
    if not chosen:
        raise WebhookError("events", f"choose at least one of {', '.join(EVENTS)}")
    return chosen


def check_format(value: str) -> str:
    if value not in FORMATS:
        raise WebhookError("format", f"choose one of {', '.join(FORMATS)}")
    return value


def check_stall_minutes(value: int) -> int:
    if not 1 <= value <= MAX_STALL_MINUTES:
        raise WebhookError("stall_minutes", f"from 1 to {MAX_STALL_MINUTES} minutes")
    return value


# ---------------------------------------------------------------- the outbox


def insert_ignoring_duplicates(
    session: Session, model: type[Base], rows: list[dict[str, Any]], keys: list[str]
) -> int:
    """INSERT rows, skipping any whose unique `keys` already exist (ON CONFLICT DO
    NOTHING on both databases): two dispatchers, or a retried pass, insert once."""
    if not rows:
        return 0
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(model).values(rows).on_conflict_do_nothing(index_elements=keys)
    # RETURNING counts what was inserted (rowcount is not reliable across drivers here).
    return len(session.execute(stmt.returning(model.__table__.c.id)).all())


def record_event(
    session: Session,
    event_id: str,
    kind: str,
    owner_id: int | None,
    payload: dict[str, Any],
    *,
    webhook_id: int | None = None,
    fanned_out_at: datetime | None = None,
) -> bool:
    """Add an event to the outbox in the caller's transaction; False if it exists."""
    now = utcnow()
    body = {"event": kind, "event_id": event_id, "occurred_at": _iso(now), **payload}
    row = {"event_id": event_id, "kind": kind, "owner_id": owner_id, "webhook_id": webhook_id,
           "payload": body, "created_at": now, "fanned_out_at": fanned_out_at}  # fmt: skip
    return insert_ignoring_duplicates(session, NotificationEvent, [row], ["event_id"]) == 1


def wanted(session: Session, owner_id: int | None, kind: str) -> bool:
    """Whether the owner has an enabled webhook subscribed to `kind`."""
    if owner_id is None:
        return False
    rows = session.scalars(
        select(Webhook.events).where(Webhook.owner_id == owner_id, Webhook.enabled.is_(True))
    )
    return any(kind in (events or ()) for events in rows)


def _iso(ts: datetime | None) -> str | None:
    return None if ts is None else ts.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _short(text: str | None) -> str | None:
    return None if text is None else text[:MAX_MESSAGE]


JOB_COLUMNS = (Job.id, Job.owner_id, Job.name, Job.kind, Job.state, Job.queue, Job.attempt,
               Job.error_type, Job.error_message, Job.result, Job.started_at, Job.finished_at)  # fmt: skip


def job_summary(job: Any) -> dict[str, Any]:
    """What an event says about a job (a Job or a row with its columns)."""
    metrics = final_metrics(job.result) if job.state == "succeeded" else {}
    key = key_metric(job.kind, metrics)
    return {
        "id": job.id,
        "name": job.name,
        "kind": job.kind,
        "state": job.state,
        "queue": job.queue,
        "attempt": job.attempt,
        "error_type": job.error_type,
        "error_message": _short(job.error_message),
        "key_metric": {"key": key[0], "value": key[1]} if key else None,
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
    }


def record_job_finished(session: Session, job_id: int, state: str, attempt: int | None) -> None:
    """A job reached a finished state in this transaction: record its event if its owner
    wants it. `attempt` is the one that ended (None for a job cancelled while queued:
    its current attempt count, 0 if it never ran). A job is finished once, so the id
    is unique without the attempt; the attempt says which one it was."""
    kind = JOB_FINISH_EVENTS[state]
    # Columns, not the entity: the caller's session may hold the Job with changes of
    # its own, and the UPDATE that finished it bypassed the session anyway.
    job = session.execute(select(*JOB_COLUMNS).where(Job.id == job_id)).one_or_none()
    if job is None or not wanted(session, job.owner_id, kind):
        return
    number = job.attempt if attempt is None else attempt
    record_event(session, f"{kind}:{job_id}:{number}", kind, job.owner_id,
                 {"job": job_summary(job)})  # fmt: skip


def record_sweep_finished(session: Session, sweep_id: int) -> None:
    """A sweep ended (succeeded or failed) in this transaction. Not on cancel: that was
    its owner's own doing, and a cancelled sweep may be resumed and finish later."""
    columns = (Sweep.id, Sweep.owner_id, Sweep.name, Sweep.state, Sweep.error_message,
               Sweep.finished_at)  # fmt: skip
    sweep = session.execute(select(*columns).where(Sweep.id == sweep_id)).one_or_none()
    if sweep is None or not wanted(session, sweep.owner_id, SWEEP_FINISHED):
        return
    trials = session.execute(
        select(func.count()).select_from(SweepTrial).where(SweepTrial.sweep_id == sweep_id)
    ).scalar_one()
    payload = {"sweep": {"id": sweep.id, "name": sweep.name, "state": sweep.state,
                         "error_message": _short(sweep.error_message), "trials": trials,
                         "finished_at": _iso(sweep.finished_at)}}  # fmt: skip
    record_event(session, f"{SWEEP_FINISHED}:{sweep_id}", SWEEP_FINISHED, sweep.owner_id, payload)


def queue_ping(session: Session, hook: Webhook) -> str:
    """A test event for this webhook alone; its event id."""
    event_id = f"{PING}:{hook.id}:{secrets.token_hex(6)}"
    record_event(session, event_id, PING, hook.owner_id, {"webhook": {"id": hook.id}},
                 webhook_id=hook.id)  # fmt: skip
    return event_id


# ---------------------------------------------------------------- bodies


def _link(base_url: str, payload: dict[str, Any]) -> str | None:
    base = base_url.rstrip("/")
    if "job" in payload:
        return f"{base}/jobs/{payload['job']['id']}"
    if "sweep" in payload:
        return f"{base}/sweeps/{payload['sweep']['id']}"
    return f"{base}/settings/webhooks" if payload.get("event") == PING else None


def headline(payload: dict[str, Any]) -> tuple[str, str]:
    """(title, one more line) in words, for chat presets and the delivery log."""
    kind = payload.get("event", "")
    if "job" in payload:
        job = payload["job"]
        title = f"Job #{job['id']}" + (f" ({job['name']})" if job.get("name") else "")
        if kind == JOB_STALLED:
            minutes = payload.get("stalled_minutes")
            return (
                f"{title} has stalled",
                f"no progress for {minutes} minutes (attempt {job['attempt']})",
            )
        state = job.get("state", kind.removeprefix("job."))
        if job.get("key_metric"):
            metric = job["key_metric"]
            return f"{title} {state}", f"{metric['key']} = {metric['value']:.6g}"
        error = ": ".join(x for x in (job.get("error_type"), job.get("error_message")) if x)
        return f"{title} {state}", error or f"attempt {job.get('attempt')}"
    if "sweep" in payload:
        sweep = payload["sweep"]
        title = f"Sweep #{sweep['id']}" + (f" ({sweep['name']})" if sweep.get("name") else "")
        detail = f"{sweep['trials']} trials" + (
            f"; {sweep['error_message']}" if sweep.get("error_message") else ""
        )
        return f"{title} {sweep['state']}", detail
    return "Trainyard test event", "this webhook receives Trainyard's notifications"


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_COLORS = {JOB_SUCCEEDED: "2EB67D", JOB_FAILED: "E01E5A", JOB_STALLED: "ECB22E"}


def render(format: str, payload: dict[str, Any], base_url: str) -> dict[str, Any]:
    """The body sent for an event: the event itself ("json"), a Slack incoming-webhook
    message ("slack") or a Microsoft Teams MessageCard ("teams")."""
    link = _link(base_url, payload)
    if format == "json":
        body = dict(payload)
        for part in ("job", "sweep"):
            if part in body:
                body[part] = {**body[part], "url": link}
        return body
    title, detail = headline(payload)
    if format == "slack":
        text = f"*{_slack_escape(title)}*\n{_slack_escape(detail)}"
        if link:
            text += f"\n<{link}|Open in Trainyard>"
        return {"text": f"{title}: {detail}",
                "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": text}}]}  # fmt: skip
    card: dict[str, Any] = {
        "@type": "MessageCard",
        "@context": "https://schema.org/extensions",
        "summary": f"{title}: {detail}",
        "themeColor": _COLORS.get(payload.get("event", ""), "5B6B7B"),
        "title": title,
        "text": detail,
    }
    if link:
        card["potentialAction"] = [{"@type": "OpenUri", "name": "Open in Trainyard",
                                    "targets": [{"os": "default", "uri": link}]}]  # fmt: skip
    return card


def owner_name(session: Session, owner_id: int) -> str | None:
    return session.execute(select(User.username).where(User.id == owner_id)).scalar_one_or_none()
