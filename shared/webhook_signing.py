"""Webhook signatures: what the dispatcher sends and what a receiver checks.

    Trainyard-Timestamp: 1764759600
    Trainyard-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<raw body>")>

The timestamp is signed with the body, so a captured request cannot be replayed later
with a fresh timestamp; a receiver refuses requests whose timestamp is more than
REPLAY_WINDOW_SECONDS from its own clock, and dedupes on Trainyard-Event-Id (a retry
carries the same event id, a new timestamp and a new signature). Standard library only,
so a receiver can copy `verify` as it is (README "Webhooks").
"""

from __future__ import annotations

import hashlib
import hmac
import time

SCHEME = "v1"
REPLAY_WINDOW_SECONDS = 300


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The Trainyard-Signature header's value for this body sent at `timestamp`."""
    message = str(timestamp).encode() + b"." + body
    return f"{SCHEME}=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def verify(
    secret: str,
    timestamp: str,
    signature: str,
    body: bytes,
    *,
    now: float | None = None,
    window: int = REPLAY_WINDOW_SECONDS,
) -> bool:
    """Whether `signature` (the header's value) is this secret's for `body` at
    `timestamp`, and the timestamp is within `window` seconds of `now`."""
    try:
        sent = int(timestamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - sent) > window:
        return False
    # Several comma-separated signatures are allowed (a secret being rotated).
    expected = sign(secret, sent, body)
    return any(hmac.compare_digest(expected, s.strip()) for s in signature.split(","))
