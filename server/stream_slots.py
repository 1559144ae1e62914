"""Caps on open job streams: per user across every web process, and per web process.

Each open `/jobs/<id>/stream` takes a slot before its response starts and gives it back
when the stream ends, however it ends. A user's slots are counted in Redis (one sorted
set per user, shared/broker.py) so the cap holds across web processes and hosts; each
slot also expires on its own a while after its stream's longest life, so a web process
that dies holding slots does not lock its users out. The per-process count is a plain
counter: it bounds the sockets and database polls one process carries.

Redis failing does not refuse streams (the per-process cap still holds): live updates
are a convenience, and a broker hiccup should not blank every open job page.
"""

from __future__ import annotations

import logging
import secrets
import threading
from dataclasses import dataclass, field

from server.job_stream import STREAM_SECONDS
from shared import broker
from shared.settings import Settings

log = logging.getLogger(__name__)

# A slot outlives its stream's longest response by this much before Redis drops it.
SLOT_GRACE_SECONDS = 30.0


@dataclass
class StreamSlot:
    """One open stream's place under both caps. `release` is idempotent."""

    slots: StreamSlots
    user_id: int
    token: str
    _released: bool = field(default=False, repr=False)

    def release(self) -> None:
        with self.slots.lock:
            if self._released:
                return
            self._released = True
            self.slots.open -= 1
        self.slots.release_user(self.user_id, self.token)


@dataclass(frozen=True)
class Refusal:
    """Why a stream was refused, and when to try again (seconds, for Retry-After)."""

    message: str
    retry_after: int


class StreamSlots:
    def __init__(
        self,
        settings: Settings,
        stream_seconds: float = STREAM_SECONDS,
        grace_seconds: float = SLOT_GRACE_SECONDS,
    ) -> None:
        self.per_user = settings.max_streams_per_user
        self.per_process = settings.max_streams_per_process
        self.ttl_s = stream_seconds + grace_seconds
        # A stream's response ends within stream_seconds; a slot is free by then.
        self.retry_after = max(1, round(stream_seconds))
        self.lock = threading.Lock()
        self.open = 0
        self.redis_url = settings.redis_url
        self._redis = None
        # Without Redis (an app built for a test without a broker): count in-process.
        self._local: dict[int, set[str]] = {}

    def acquire(self, user_id: int) -> StreamSlot | Refusal:
        with self.lock:
            if self.open >= self.per_process:
                return Refusal(
                    "this server has too many live job pages open; live updates resume shortly",
                    self.retry_after,
                )
            self.open += 1
        slot = StreamSlot(self, user_id, secrets.token_hex(8))
        if not self._take_user(user_id, slot.token):
            with self.lock:
                slot._released = True
                self.open -= 1
            return Refusal(
                f"too many live job pages open: at most {self.per_user} per user; close some tabs",
                self.retry_after,
            )
        return slot

    def _client(self):  # type: ignore[no-untyped-def]
        if self._redis is None:
            self._redis = broker.redis_client(self.redis_url, timeout_s=1.0)
        return self._redis

    def _take_user(self, user_id: int, token: str) -> bool:
        if not self.redis_url:
            with self.lock:
                tokens = self._local.setdefault(user_id, set())
                if len(tokens) >= self.per_user:
                    return False
                tokens.add(token)
                return True
        try:
            return broker.take_stream_slot(
                self._client(), user_id, token, self.per_user, self.ttl_s
            )
        except Exception:  # noqa: BLE001 - Redis down or unreachable
            log.warning("stream slot for user %s not counted: Redis failed", user_id, exc_info=True)
            return True

    def release_user(self, user_id: int, token: str) -> None:
        if not self.redis_url:
            with self.lock:
                self._local.get(user_id, set()).discard(token)
            return
        try:
            broker.release_stream_slot(self._client(), user_id, token)
        except Exception:  # noqa: BLE001 - the slot expires on its own
            log.warning("stream slot of user %s not released: Redis failed", user_id, exc_info=True)
