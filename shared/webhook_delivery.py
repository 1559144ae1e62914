"""The webhook dispatcher: turns outbox rows into deliveries and sends them until each
is acknowledged or given up (docs/architecture.md, "Webhooks").

It runs as a thread of every `trainyard reconcile` process (`start`), so `trainyard up`
and the compose file have it without another service. Each pass:

1. fan-out: outbox rows not yet fanned out become one `webhook_deliveries` row per
   enabled webhook of the owner that wants the event (a ping: its one webhook), inserted
   with ON CONFLICT DO NOTHING on (webhook_id, event_id), then marked fanned out. A pass
   that dies in between is repeated by the next one without a duplicate;
2. send: due pending deliveries are leased one by one (a compare-and-set on
   `lease_token` / `lease_expires_at`, so of several dispatchers one sends), POSTed,
   and the outcome recorded under that lease: a 2xx marks the delivery delivered and it
   is never sent again; anything else schedules the next attempt with exponential
   backoff and jitter, or marks it failed after TRAINYARD_WEBHOOK_MAX_ATTEMPTS.

Nothing is lost to a restart: every pending delivery is a row, and a lease left by a
killed dispatcher expires. The one repeat that cannot be excluded: a receiver answered
2xx and the dispatcher died before recording it; the retry carries the same
Trainyard-Event-Id, on which receivers dedupe.

Every reconcile interval the thread also runs the stalled pass (job.stalled events) and
drops outbox rows, with their deliveries, older than TRAINYARD_WEBHOOK_RETENTION_DAYS.
No Flask, no torch.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import random
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import delete, or_, select, update

from shared.db import transaction, utcnow
from shared.orm import Job, NotificationEvent, User, Webhook, WebhookDelivery
from shared.settings import Settings
from shared.webhook_signing import sign
from shared.webhooks import (
    JOB_COLUMNS,
    JOB_STALLED,
    PING,
    Resolver,
    WebhookError,
    checked_addresses,
    insert_ignoring_duplicates,
    job_summary,
    record_event,
    render,
    resolve,
)

log = logging.getLogger(__name__)

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
FAN_OUT_BATCH = 200
# Deliveries leased per pass, sent by this many threads at once: a slow receiver holds
# one sender for at most the timeout, not the whole pass.
SEND_BATCH = 16
SENDERS = 4
# One send (connect, request, the answer's status and headers) takes at most this many
# timeouts in all.
SEND_DEADLINE = 2
MAX_ERROR = 300
USER_AGENT = "Trainyard-Webhooks/1"


def backoff_seconds(
    attempts: int, base: float, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """The wait after the `attempts`-th failed send: base * 2^(attempts-1), +-20%
    jitter (so deliveries that failed together do not retry together), at most `cap`."""
    delay = min(cap, base * 2 ** min(attempts - 1, 60))
    return min(cap, delay * (0.8 + 0.4 * rand()))


# ---------------------------------------------------------------- sending one request


@dataclass(frozen=True)
class SendResult:
    ok: bool
    status: int | None = None
    error: str | None = None


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to the address that was checked, whatever DNS says by now (no
    rebinding between the check and the connection); Host is still the URL's."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """As _PinnedHTTP, with TLS verified against the URL's host name (SNI too)."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        self.tls = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self.tls)
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self.tls.wrap_socket(sock, server_hostname=self.host)


def _abort(conn: http.client.HTTPConnection, fired: threading.Event) -> None:
    fired.set()
    if conn.sock is not None:
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_RDWR)


def _exchange(
    https: bool,
    host: str,
    port: int,
    address: str,
    target: str,
    body: bytes,
    headers: dict[str, str],
    timeout: float,
) -> tuple[int | None, str | None, bool]:
    """One request to one address: (status, error, whether to stop trying addresses)."""
    conn = (_PinnedHTTPS if https else _PinnedHTTP)(host, port, address, timeout)
    # The socket timeout bounds each read; this bounds the whole exchange, so a receiver
    # trickling its headers a byte at a time cannot hold a sender.
    fired = threading.Event()
    watchdog = threading.Timer(SEND_DEADLINE * timeout, _abort, (conn, fired))
    watchdog.start()
    try:
        conn.request("POST", target, body=body, headers=headers)
        status: int | None = conn.getresponse().status  # only the status; the body is unread
        error, final = None, True
    except TimeoutError:
        status, error, final = None, f"no answer within {timeout:g} s", False
    except ssl.SSLError as exc:
        status, error, final = None, f"TLS error: {exc.reason or exc}", True
    except ConnectionRefusedError:
        status, error, final = None, f"connection refused by {address}", False
    except OSError as exc:
        status, error, final = (
            None,
            f"connection failed: {exc.strerror or type(exc).__name__}",
            False,
        )
    except http.client.HTTPException as exc:
        status, error, final = None, f"not an HTTP answer ({type(exc).__name__})", True
    finally:
        watchdog.cancel()
        conn.close()
    if fired.is_set():  # cut off: whatever was parsed is not an answer
        return None, f"no complete answer within {SEND_DEADLINE * timeout:g} s", True
    return status, error, final


def post(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    timeout: float,
    allow_private: bool,
    resolver: Resolver = resolve,
) -> SendResult:
    """POST `body` once. Redirects are answers like any other non-2xx (never followed:
    a redirect could point anywhere, private addresses included)."""
    parts = urlsplit(url)
    https = parts.scheme.lower() == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if https else 80)
    try:
        addresses = checked_addresses(host, port, allow_private, resolver)
    except WebhookError as exc:
        return SendResult(False, error=f"refused: {exc.message}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    status: int | None = None
    error: str | None = None
    for address in addresses:
        status, error, final = _exchange(https, host, port, address, target, body, headers,
                                         timeout)  # fmt: skip
        if final:
            break
    if status is None:
        return SendResult(False, error=error)
    if 200 <= status < 300:
        return SendResult(True, status)
    note = ": redirects are not followed" if 300 <= status < 400 else ""
    return SendResult(False, status, f"HTTP {status}{note}")


def signed_headers(
    secret: str, event_id: str, kind: str, body: bytes, attempt: int
) -> dict[str, str]:
    timestamp = int(time.time())
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "Trainyard-Event-Id": event_id,
        "Trainyard-Event": kind,
        "Trainyard-Timestamp": str(timestamp),
        "Trainyard-Signature": sign(secret, timestamp, body),
        "Trainyard-Attempt": str(attempt),
    }


# ---------------------------------------------------------------- the passes


@dataclass
class DispatchReport:
    fanned_out: int = 0  # outbox rows turned into deliveries
    delivered: int = 0
    retrying: int = 0
    gave_up: int = 0
    stalled: int = 0  # job.stalled deliveries made

    def __str__(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in vars(self).items())


def fan_out(url: str, now: datetime | None = None) -> int:
    """Make the deliveries of outbox rows not yet fanned out; how many rows."""
    now = now or utcnow()
    with transaction(url) as session:
        events = session.execute(
            select(NotificationEvent.event_id, NotificationEvent.kind,
                   NotificationEvent.owner_id, NotificationEvent.webhook_id)
            .where(NotificationEvent.fanned_out_at.is_(None))
            .order_by(NotificationEvent.id).limit(FAN_OUT_BATCH)
        ).all()  # fmt: skip
        if not events:
            return 0
        owners = {e.owner_id for e in events if e.owner_id is not None}
        hooks = session.execute(
            select(Webhook.id, Webhook.owner_id, Webhook.events)
            .join(User, User.id == Webhook.owner_id)
            .where(Webhook.owner_id.in_(owners), Webhook.enabled.is_(True),
                   User.is_active.is_(True))
            .order_by(Webhook.id)  # rows inserted in one order by every dispatcher
        ).all()  # fmt: skip
        rows = []
        for event in events:
            if event.webhook_id is not None:
                targets = [event.webhook_id]
            else:
                targets = [h.id for h in hooks
                           if h.owner_id == event.owner_id and event.kind in (h.events or ())]  # fmt: skip
            rows += [_new_delivery(t, event.event_id, now) for t in targets]
        insert_ignoring_duplicates(session, WebhookDelivery, rows, ["webhook_id", "event_id"])
        session.execute(
            update(NotificationEvent)
            .where(NotificationEvent.event_id.in_([e.event_id for e in events]),
                   NotificationEvent.fanned_out_at.is_(None))
            .values(fanned_out_at=now)
        )  # fmt: skip
    return len(events)


def _new_delivery(webhook_id: int, event_id: str, now: datetime) -> dict[str, Any]:
    return {"webhook_id": webhook_id, "event_id": event_id, "status": PENDING, "attempts": 0,
            "next_attempt_at": now, "created_at": now, "updated_at": now}  # fmt: skip


def lease_due(
    url: str, lease_seconds: float, now: datetime, limit: int = SEND_BATCH
) -> list[tuple[int, str]]:
    """Take up to `limit` due deliveries: (id, lease token) of each one this call won."""
    free = or_(WebhookDelivery.lease_expires_at.is_(None), WebhookDelivery.lease_expires_at < now)
    won = []
    with transaction(url) as session:
        ids = session.scalars(
            select(WebhookDelivery.id)
            .where(WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= now, free)
            # The id breaks ties: two dispatchers lock rows in one order, never deadlock.
            .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id).limit(limit)
        ).all()  # fmt: skip
        for delivery_id in ids:
            token = secrets.token_hex(16)
            taken = session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == PENDING, free)
                .values(lease_token=token,
                        lease_expires_at=now + timedelta(seconds=lease_seconds))
                .execution_options(synchronize_session=False)
            ).rowcount  # fmt: skip
            if taken == 1:
                won.append((delivery_id, token))
    return won


def send_leased(settings: Settings, delivery_id: int, token: str) -> str:
    """Send one leased delivery and record the outcome under the lease: "delivered",
    "retrying", "failed", or "lost" (the lease was taken over meanwhile)."""
    url = settings.resolved_database_url
    with transaction(url) as session:
        row = session.execute(
            select(WebhookDelivery.attempts, WebhookDelivery.event_id, Webhook.url,
                   Webhook.secret, Webhook.format, Webhook.enabled,
                   NotificationEvent.kind, NotificationEvent.payload)
            .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
            .join(NotificationEvent, NotificationEvent.event_id == WebhookDelivery.event_id)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.lease_token == token)
        ).one_or_none()  # fmt: skip
    if row is None:
        return "lost"
    attempt = row.attempts + 1
    if not row.enabled and row.kind != PING:
        result = SendResult(False, error="the webhook was disabled before this was sent")
        return _record(settings, delivery_id, token, attempt, result, final=True)
    body = json.dumps(render(row.format, row.payload, settings.url), separators=(",", ":"),
                      ensure_ascii=False).encode()  # fmt: skip
    headers = signed_headers(row.secret, row.event_id, row.kind, body, attempt)
    result = post(row.url, body, headers, timeout=settings.webhook_timeout_seconds,
                  allow_private=settings.webhooks_allow_private)  # fmt: skip
    return _record(settings, delivery_id, token, attempt, result)


def _record(
    settings: Settings,
    delivery_id: int,
    token: str,
    attempt: int,
    result: SendResult,
    final: bool = False,
) -> str:
    now = utcnow()
    values: dict[str, Any] = {"attempts": attempt, "last_status_code": result.status,
                              "lease_token": None, "lease_expires_at": None, "updated_at": now}  # fmt: skip
    if result.ok:
        outcome = DELIVERED
        values.update(status=DELIVERED, delivered_at=now, last_error=None)
    elif final or attempt >= settings.webhook_max_attempts:
        outcome = FAILED
        values.update(status=FAILED, last_error=(result.error or "failed")[:MAX_ERROR])
    else:
        outcome = "retrying"
        wait = backoff_seconds(attempt, settings.webhook_retry_base_seconds,
                               settings.webhook_retry_max_seconds)  # fmt: skip
        values.update(next_attempt_at=now + timedelta(seconds=wait),
                      last_error=(result.error or "failed")[:MAX_ERROR])  # fmt: skip
    with transaction(settings.resolved_database_url) as session:
        kept = session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.lease_token == token)
            .values(**values).execution_options(synchronize_session=False)
        ).rowcount  # fmt: skip
    if kept != 1:
        log.warning("webhook delivery %s: lease lost while sending; not recorded", delivery_id)
        return "lost"
    return outcome


def send_due(
    settings: Settings, report: DispatchReport, pool: ThreadPoolExecutor | None = None
) -> None:
    # The lease outlives a whole batch of sends at the timeout (each sender's share of
    # it, one after another), or a slow batch could see its last deliveries taken over
    # and sent twice before it records them.
    per_sender = -(-SEND_BATCH // SENDERS)
    send_s = SEND_DEADLINE * settings.webhook_timeout_seconds
    lease = max(settings.webhook_lease_seconds, per_sender * send_s + 1)
    leased = lease_due(settings.resolved_database_url, lease, utcnow())
    if not leased:
        return
    if pool is None:  # a one-off pass: the same parallelism, its own threads
        with ThreadPoolExecutor(SENDERS, thread_name_prefix="webhook-send") as own:
            outcomes = list(own.map(lambda dt: send_leased(settings, *dt), leased))
    else:
        outcomes = list(pool.map(lambda dt: send_leased(settings, *dt), leased))
    report.delivered += outcomes.count(DELIVERED)
    report.retrying += outcomes.count("retrying")
    report.gave_up += outcomes.count(FAILED)


# ---------------------------------------------------------------- job.stalled


class StallWatch:
    """When each running attempt's progress last changed, as this process saw it. The
    training loop reports progress every second (samples/s, ETA), so progress that has
    not changed means training is not moving, even while telemetry samples still
    arrive. A first sighting counts from then: a restarted reconciler can only report
    a stall late, never early."""

    def __init__(self) -> None:
        self._seen: dict[tuple[int, int], tuple[str, datetime]] = {}

    def idle(self, job_id: int, attempt: int, progress: Any, now: datetime) -> timedelta:
        key = (job_id, attempt)
        shown = json.dumps(progress, sort_keys=True, default=str)
        seen = self._seen.get(key)
        if seen is None or seen[0] != shown:
            self._seen[key] = (shown, now)
            return timedelta(0)
        return now - seen[1]

    def keep_only(self, keys: set[tuple[int, int]]) -> None:
        for key in set(self._seen) - keys:
            del self._seen[key]


def stalled_pass(url: str, watch: StallWatch, now: datetime | None = None) -> int:
    """Record job.stalled for running jobs idle past a subscribed webhook's
    stall_minutes, and that webhook's delivery; how many deliveries were made. The
    event id is per attempt ("job.stalled:42:2"), so each attempt stalls once; a
    webhook with a longer stall_minutes gets its delivery of the same event later."""
    now = now or utcnow()
    with transaction(url) as session:
        hooks = [
            h for h in session.execute(
                select(Webhook.id, Webhook.owner_id, Webhook.events, Webhook.stall_minutes)
                .join(User, User.id == Webhook.owner_id)
                .where(Webhook.enabled.is_(True), User.is_active.is_(True))
                .order_by(Webhook.id)
            ) if JOB_STALLED in (h.events or ())
        ]  # fmt: skip
        jobs = []
        if hooks:
            jobs = session.execute(
                select(*JOB_COLUMNS, Job.progress)
                .where(Job.state == "running", Job.owner_id.in_({h.owner_id for h in hooks}))
                .order_by(Job.id)  # inserts in one order, as in fan_out
            ).all()
    due = []
    for job in jobs:
        idle = watch.idle(job.id, job.attempt, job.progress, now)
        for hook in hooks:
            if hook.owner_id == job.owner_id and idle >= timedelta(minutes=hook.stall_minutes):
                due.append((hook.id, job, idle))
    watch.keep_only({(j.id, j.attempt) for j in jobs})
    if not due:
        return 0
    with transaction(url) as session:
        for _hook, job, idle in due:
            event_id = f"{JOB_STALLED}:{job.id}:{job.attempt}"
            payload = {"job": job_summary(job), "stalled_minutes": int(idle.total_seconds() // 60)}
            # Fanned out here, per webhook as each one's threshold passes.
            record_event(session, event_id, JOB_STALLED, job.owner_id, payload, fanned_out_at=now)
        made = insert_ignoring_duplicates(
            session, WebhookDelivery,
            [_new_delivery(hook_id, f"{JOB_STALLED}:{job.id}:{job.attempt}", now)
             for hook_id, job, _ in due],
            ["webhook_id", "event_id"],
        )  # fmt: skip
    return made


def prune(url: str, retention_days: float, now: datetime | None = None) -> int:
    """Drop outbox rows fanned out more than `retention_days` ago (their deliveries go
    with them, ON DELETE CASCADE): the delivery log keeps that long."""
    cutoff = (now or utcnow()) - timedelta(days=retention_days)
    with transaction(url) as session:
        old = session.scalars(
            select(NotificationEvent.event_id).where(NotificationEvent.fanned_out_at < cutoff)
            .limit(1000)
        ).all()  # fmt: skip
        if not old:
            return 0
        session.execute(delete(WebhookDelivery).where(WebhookDelivery.event_id.in_(old)))
        session.execute(delete(NotificationEvent).where(NotificationEvent.event_id.in_(old)))
    return len(old)


# ---------------------------------------------------------------- the thread


def run_once(settings: Settings, watch: StallWatch | None = None) -> DispatchReport:
    """One of everything: stalled pass, fan-out, one batch of sends (`--once`)."""
    url = settings.resolved_database_url
    report = DispatchReport()
    report.stalled = stalled_pass(url, watch or StallWatch())
    report.fanned_out = fan_out(url)
    send_due(settings, report)
    return report


def run_forever(settings: Settings, stop_event: threading.Event) -> None:
    """Fan out and send every `webhook_poll_seconds`; the stalled pass and pruning every
    `reconcile_seconds`. A failed pass is logged and the next starts from the rows."""
    url = settings.resolved_database_url
    watch = StallWatch()
    next_slow = 0.0
    with ThreadPoolExecutor(SENDERS, thread_name_prefix="webhook-send") as pool:
        while not stop_event.is_set():
            report = DispatchReport()
            try:
                if time.monotonic() >= next_slow:
                    next_slow = time.monotonic() + settings.reconcile_seconds
                    report.stalled = stalled_pass(url, watch)
                    prune(url, settings.webhook_retention_days)
                report.fanned_out = fan_out(url)
                send_due(settings, report, pool)
            except Exception:  # noqa: BLE001 - survive; the rows are still there
                log.warning("webhook dispatch pass failed", exc_info=True)
            if report.fanned_out or report.delivered or report.retrying or report.gave_up:
                log.info("webhooks: %s", report)
            stop_event.wait(settings.webhook_poll_seconds)


def start(settings: Settings, stop_event: threading.Event) -> threading.Thread:
    """The dispatcher as a daemon thread of this process (the reconciler's)."""
    thread = threading.Thread(
        target=run_forever, args=(settings, stop_event), name=f"webhooks-{os.getpid()}",
        daemon=True,
    )  # fmt: skip
    thread.start()
    return thread
