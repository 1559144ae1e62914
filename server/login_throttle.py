"""Login throttling that slows whoever fails, and nobody else.

A failed login counts against its (username, client address) pair and against the
address. A few failures are free; after that each one doubles the wait before that pair
(or address) may try again, up to a cap, and the wait always runs out. A correct
password from an address that has not failed is never refused: a limit per username
alone would let anyone lock an account (`admin`) out by failing on purpose.

The counts live in Redis (keys from shared/broker.py), so every web process shares them;
an app without Redis (a test app) keeps them in memory. An attempt is counted as a
failure before the password is checked and taken back on success, so a burst of
parallel guesses cannot all slip in before the first failure is recorded. The client
address is `request.remote_addr`, which ProxyFix rewrites only behind a trusted proxy
(TRAINYARD_TRUSTED_PROXIES, server/app.py).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from flask import Flask, current_app

from shared.broker import login_failure_keys, redis_client
from shared.settings import Settings

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

T = TypeVar("T")
# A count is forgotten a day after its last failure (a Redis expiry).
FORGET_SECONDS = 24 * 3600
# The in-memory store drops expired counts once it holds this many.
MEMORY_PURGE_AT = 10_000


@dataclass(frozen=True)
class Failures:
    """Failures counted for one key, and until when (Unix time) it must wait."""

    count: int = 0
    until: float = 0.0


Change = Callable[[list[Failures]], tuple[list[Failures | None], T]]


class _Store(Protocol):
    def update(self, keys: Sequence[str], change: Change[T]) -> T: ...


class LoginThrottle:
    """Per (username, address) and per address backoff; see the module docstring."""

    def __init__(self, settings: Settings):
        self.free_per_name = settings.login_free_failures
        self.free_per_address = settings.login_address_free_failures
        self.max_backoff = settings.login_max_backoff_seconds
        # Time for the waits; tests replace it to let a wait run out without sleeping.
        self.clock: Callable[[], float] = time.time
        ttl = self.max_backoff + FORGET_SECONDS
        self._store: _Store = (
            _RedisStore(redis_client(settings.redis_url), ttl)
            if settings.redis_url
            else _MemoryStore(ttl)
        )

    def _backoff(self, count: int, free: int) -> float:
        if count <= free:
            return 0.0
        return float(min(self.max_backoff, 2 ** min(count - free - 1, 30)))

    def attempt(self, username: str, address: str) -> int | None:
        """Seconds to wait when this attempt must not be checked now; else None, and the
        attempt is counted as a failure until `succeeded` takes it back."""
        now = self.clock()

        def change(records: list[Failures]) -> tuple[list[Failures | None], int | None]:
            wait = max(r.until for r in records) - now
            if wait > 0:
                # Refusals are not counted: the wait grows with guesses, not with clicks.
                return list(records), math.ceil(wait)
            pair, addr = (
                Failures(r.count + 1, now + self._backoff(r.count + 1, free))
                for r, free in zip(
                    records, (self.free_per_name, self.free_per_address), strict=True
                )
            )
            return [pair, addr], None

        try:
            return self._store.update(login_failure_keys(username, address), change)
        except Exception:  # noqa: BLE001 - any storage failure
            # Fail open, like the submission limits: with Redis down, logins still work
            # (argon2's cost still slows guessing) rather than nobody logging in.
            log.warning("login throttle not checked: Redis failed", exc_info=True)
            return None

    def succeeded(self, username: str, address: str) -> None:
        """Take back the attempt's count: this name's failures here are forgotten, and the
        address's count drops by this one attempt (a success does not launder the
        failures an address made against other names)."""

        def change(records: list[Failures]) -> tuple[list[Failures | None], None]:
            addr = records[1]
            # The attempt was allowed, so any wait it found had run out: no wait.
            count = addr.count - 1
            return [None, Failures(count, 0.0) if count > 0 else None], None

        try:
            self._store.update(login_failure_keys(username, address), change)
        except Exception:  # noqa: BLE001
            log.warning("login throttle not updated: Redis failed", exc_info=True)


class _RedisStore:
    def __init__(self, client: redis.Redis, ttl_s: int):
        self.client = client
        self.ttl_s = ttl_s

    def update(self, keys: Sequence[str], change: Change[T]) -> T:
        def transaction(pipe: redis.client.Pipeline) -> T:
            # WATCHed by client.transaction: a concurrent change to either key retries.
            records = [_decode(pipe.hgetall(key)) for key in keys]
            new, result = change(records)
            pipe.multi()
            for key, old, record in zip(keys, records, new, strict=True):
                if record is None:
                    pipe.delete(key)
                elif record != old:
                    pipe.hset(key, mapping={"count": record.count, "until": record.until})
                    pipe.expire(key, self.ttl_s)
            return result

        return self.client.transaction(transaction, *keys, value_from_callable=True)


def _decode(raw: dict[bytes, bytes]) -> Failures:
    if not raw:
        return Failures()
    return Failures(int(raw.get(b"count", 0)), float(raw.get(b"until", 0.0)))


class _MemoryStore:
    def __init__(self, ttl_s: int):
        self.ttl_s = ttl_s
        self.lock = threading.Lock()
        self.records: dict[str, tuple[Failures, float]] = {}

    def update(self, keys: Sequence[str], change: Change[T]) -> T:
        with self.lock:
            now = time.monotonic()
            records = []
            for key in keys:
                record, expires = self.records.get(key, (Failures(), math.inf))
                records.append(record if expires > now else Failures())
            new, result = change(records)
            for key, old, record in zip(keys, records, new, strict=True):
                if record is None:
                    self.records.pop(key, None)
                elif record != old:
                    self.records[key] = (record, now + self.ttl_s)
            if len(self.records) > MEMORY_PURGE_AT:
                self.records = {k: v for k, v in self.records.items() if v[1] > now}
            return result


def init_app(app: Flask, settings: Settings) -> None:
    app.extensions["trainyard_login_throttle"] = LoginThrottle(settings)


def login_throttle() -> LoginThrottle:
    return current_app.extensions["trainyard_login_throttle"]
