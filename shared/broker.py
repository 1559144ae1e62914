"""The one module that knows how Celery lays out Redis, and how to reach that Redis.

Celery's Redis transport (kombu/transport/redis.py) keeps a queue's messages like this:

- waiting: a list named after the queue, plus one list per priority step above 0,
  named `<queue>\\x06\\x16<step>`; each item is the JSON message;
- reserved by a worker but not yet acknowledged: the hash `unacked`, keyed by delivery
  tag, each value `[message, exchange, routing_key]`, and the time each was reserved
  in the sorted set `unacked_index`.

The reconciler reads both to tell a lost message from one still coming; the queues
page reads the list lengths. Trainyard's own keys are named here too (see their
sections below). Nobody else spells these names.

Every Redis client in Trainyard is built here, from any URL Celery accepts, so the
web's health check, the worker registry, the reconciler and local mode all understand
the same URLs as the broker connection itself:

    redis://[:password@]host[:port][/db]
    rediss://[:password@]host[:port][/db][?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem]
    redis+socket:///path/to/redis.sock[?virtual_host=db]
"""

from __future__ import annotations

import hashlib
import json
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

if TYPE_CHECKING:
    import redis

# redis-py and kombu are imported where a client is built, not here: settings check a
# URL with this module, and the CLI should not pay half a second for that.

PRIORITY_SEP = "\x06\x16"
UNACKED_HASH = "unacked"
UNACKED_INDEX = "unacked_index"

SCHEMES = ("redis", "rediss", "redis+socket")
# TLS options a rediss:// URL may carry, read the same way for Celery and for redis-py.
_SSL_PARAMS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_CERT_REQS = {
    "none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}


class BrokerUrlError(ValueError):
    """A TRAINYARD_REDIS_URL that neither Celery nor redis-py could use."""


# ----------------------------------------------------------------------------- URLs


def check_url(url: str) -> None:
    """Raise BrokerUrlError, saying what is wrong, for a URL this module cannot use."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise BrokerUrlError(
            f"must start with one of {', '.join(s + '://' for s in SCHEMES)} "
            f"(e.g. redis://127.0.0.1:6379/0): {url!r}"
        )
    if parts.scheme == "redis+socket" and not parts.path:
        raise BrokerUrlError("a redis+socket:// URL needs the socket's path")
    if parts.scheme != "redis+socket" and not parts.hostname:
        raise BrokerUrlError("needs a host, e.g. redis://127.0.0.1:6379/0")
    params = dict(parse_qsl(parts.query))
    reqs = params.get("ssl_cert_reqs")
    if reqs is not None and _cert_reqs(reqs) is None:
        raise BrokerUrlError(
            f"ssl_cert_reqs={reqs!r}: use one of {', '.join(_CERT_REQS)} (or CERT_REQUIRED, ...)"
        )


def _cert_reqs(value: str) -> ssl.VerifyMode | None:
    return _CERT_REQS.get(value.lower().removeprefix("cert_"))


def _ssl_options(url: str) -> dict[str, Any]:
    params = dict(parse_qsl(urlsplit(url).query))
    options: dict[str, Any] = {k: params[k] for k in _SSL_PARAMS if params.get(k)}
    # Verified unless the URL says otherwise: kombu alone would fall back to no
    # verification at all for a bare rediss:// URL.
    options["ssl_cert_reqs"] = _cert_reqs(params.get("ssl_cert_reqs", "required"))
    return options


def celery_ssl_options(url: str) -> dict[str, Any] | None:
    """Celery's `broker_use_ssl` for this URL: None for plain Redis, else the TLS options
    from the URL's query (certificates verified unless ssl_cert_reqs says otherwise)."""
    check_url(url)
    return _ssl_options(url) if urlsplit(url).scheme == "rediss" else None


def redis_client(
    url: str,
    *,
    timeout_s: float = 3.0,
    read_timeout_s: float | None = None,
    retries: int | None = None,
) -> redis.Redis:
    """A redis-py client for any URL Celery accepts (see the module docstring).

    `timeout_s` bounds connecting (and every reply, unless `read_timeout_s` is given), so
    a dead Redis is an error within seconds, never a hang. `retries` (immediate, no
    backoff) replaces redis-py's default for callers that poll in a loop of their own and
    must see each failure at once, e.g. local mode waiting for its Redis to start.
    """
    import redis

    check_url(url)
    parts = urlsplit(url)
    params = dict(parse_qsl(parts.query))
    kwargs: dict[str, Any] = {
        "socket_connect_timeout": timeout_s,
        "socket_timeout": read_timeout_s if read_timeout_s is not None else timeout_s,
    }
    if retries is not None:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        kwargs["retry"] = Retry(NoBackoff(), retries)
    if parts.scheme == "redis+socket":
        # kombu's spelling; redis-py calls it unix:// and the database `db`.
        db = params.pop("virtual_host", params.pop("db", "0")) or "0"
        query = urlencode({**params, "db": db})
        return redis.Redis.from_url(f"unix://{parts.path}?{query}", **kwargs)
    if parts.scheme == "rediss":
        kwargs.update(_ssl_options(url))
        query = urlencode({k: v for k, v in params.items() if k not in _SSL_PARAMS})
        url = urlunsplit(parts._replace(query=query))
    return redis.Redis.from_url(url, **kwargs)


def ping(url: str, timeout_s: float = 3.0) -> None:
    """Raise (redis.RedisError, OSError, BrokerUrlError) unless Redis answers at `url`."""
    client = redis_client(url, timeout_s=timeout_s)
    try:
        client.ping()
    finally:
        client.close()


# ----------------------------------------------------------------------------- logins

# Failed-login counts (server/login_throttle.py): one hash per (username, client
# address) and one per client address, fields `count` and `until`.
LOGIN_FAILURES_PREFIX = "trainyard:login-failures:"


def login_failure_keys(username: str, address: str) -> tuple[str, str]:
    """The (username, address) and the address keys. Digests, so a key's length does not
    depend on what a client sends; usernames compare case-insensitively."""

    def digest(*parts: str) -> str:
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]

    return (
        f"{LOGIN_FAILURES_PREFIX}pair:{digest(username.lower(), address)}",
        f"{LOGIN_FAILURES_PREFIX}address:{digest(address)}",
    )


# ----------------------------------------------------------------------------- queues


@cache
def _priority_steps() -> tuple[int, ...]:
    from kombu.transport.redis import PRIORITY_STEPS

    return tuple(PRIORITY_STEPS)


def queue_lists(queue: str) -> list[str]:
    """The Redis lists that hold a queue's waiting messages, one per priority step."""
    return [queue] + [f"{queue}{PRIORITY_SEP}{step}" for step in _priority_steps() if step]


def queue_depths(client: redis.Redis, queues: Iterable[str]) -> dict[str, int]:
    """Messages waiting per queue (all priority steps together). Raises RedisError."""
    queues = list(queues)
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        for name in queue_lists(queue):
            pipe.llen(name)
    lengths = iter(pipe.execute())
    return {q: sum(next(lengths) for _ in queue_lists(q)) for q in queues}


@dataclass(frozen=True)
class QueuedMessages:
    """Which task messages Redis holds right now, by Celery task id."""

    waiting: frozenset[str]
    # task id -> when a worker reserved it (Unix time, the reserving host's clock)
    reserved: dict[str, float]

    def holds(self, task_id: str, reserved_since: float) -> bool:
        """Whether a delivery of `task_id` is still coming.

        A message reserved before `reserved_since` by a worker that never claimed the
        job belongs to a worker that died between reserving and claiming: Redis would
        only hand it out again after the visibility timeout (hours), so it does not count.
        """
        return task_id in self.waiting or self.reserved.get(task_id, 0.0) >= reserved_since


def read_messages(client: redis.Redis, queues: Iterable[str]) -> QueuedMessages:
    """One MULTI/EXEC snapshot of the queues' lists and the unacked hash.

    Atomic, so a message moving from a list to `unacked` (or back, on restore) is seen
    in one place or the other. One window stays: a worker has popped a message but not
    yet recorded it as unacked. A publish then is a duplicate the claim absorbs.
    """
    lists = [name for q in sorted(set(queues)) for name in queue_lists(q)]
    pipe = client.pipeline(transaction=True)
    for name in lists:
        pipe.lrange(name, 0, -1)
    pipe.hgetall(UNACKED_HASH)
    pipe.zrange(UNACKED_INDEX, 0, -1, withscores=True)
    *waiting_lists, unacked, index = pipe.execute()
    waiting = {tid for msgs in waiting_lists for raw in msgs if (tid := _task_id(raw))}
    reserved_at = {_text(tag): score for tag, score in index}
    reserved: dict[str, float] = {}
    for tag, raw in unacked.items():
        tid = _task_id(raw)
        if tid is not None:
            # Not in the index (yet): treat as reserved just now, i.e. still coming.
            when = reserved_at.get(_text(tag), float("inf"))
            reserved[tid] = max(reserved.get(tid, 0.0), when)
    return QueuedMessages(frozenset(waiting), reserved)


def _task_id(raw: bytes | str) -> str | None:
    try:
        message = json.loads(raw)
        # An unacked entry is [message, exchange, routing_key]; a waiting one the message.
        if isinstance(message, list):
            message = message[0]
        return str(message["headers"]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None  # not a Celery task message; nothing of ours


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# ----------------------------------------------------------------------------- scheduler

# Held (SET NX with an expiry) by the one reconciler whose pass decides preemptions
# (shared/scheduling.py), so two reconcilers never stop two jobs for one waiting job.
SCHEDULER_LOCK_KEY = "trainyard:scheduler:lock"


def take_scheduler_lock(client: redis.Redis, token: str, ttl_s: float) -> bool:
    """True if this caller now holds the lock (or already did: it is renewed)."""
    if client.set(SCHEDULER_LOCK_KEY, token, nx=True, px=int(ttl_s * 1000)):
        return True
    if _text(client.get(SCHEDULER_LOCK_KEY) or b"") == token:
        client.pexpire(SCHEDULER_LOCK_KEY, int(ttl_s * 1000))
        return True
    return False


_RELEASE_IF_MINE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


def release_scheduler_lock(client: redis.Redis, token: str) -> None:
    """Give the lock up if this caller holds it (compare and delete in one step, so a
    lock that expired and went to another reconciler is left alone)."""
    client.eval(_RELEASE_IF_MINE, 1, SCHEDULER_LOCK_KEY, token)


# ----------------------------------------------------------------------------- streams

# One sorted set per user: its open job streams (server/stream_slots.py), each member a
# random token scored with the Unix time its slot expires. A slot ends when its stream
# does; the expiry is for a web process that died holding slots.
STREAM_SLOTS_PREFIX = "trainyard:streams:user:"

# Drop expired slots, then take one if fewer than the cap are open. Redis's own clock
# for every process alike. KEYS[1] the user's set; ARGV: token, cap, ttl seconds.
_TAKE_STREAM_SLOT = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', t)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], t + tonumber(ARGV[3]), ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3])) + 1)
return 1
"""


def stream_slots_key(user_id: int) -> str:
    return f"{STREAM_SLOTS_PREFIX}{user_id}"


def take_stream_slot(client: redis.Redis, user_id: int, token: str, cap: int, ttl_s: float) -> bool:
    """Open one of the user's `cap` stream slots for at most `ttl_s` seconds; False when
    all are taken. Raises RedisError."""
    taken = client.eval(_TAKE_STREAM_SLOT, 1, stream_slots_key(user_id), token, cap, ttl_s)
    return bool(taken)


def release_stream_slot(client: redis.Redis, user_id: int, token: str) -> None:
    """Give a slot back (a no-op when it already expired). Raises RedisError."""
    client.zrem(stream_slots_key(user_id), token)


# ----------------------------------------------------------------------------- serving

# The prediction servers' statistics (worker/serving/stats.py), read by the web's Models
# page: one hash per model, a field per serve process ("host:pid") holding its JSON
# snapshot of that model's versions, with the time it was taken. The hash expires when
# no serve process has written it for SERVE_STATS_TTL_S; a process that stopped leaves
# a stale field that readers skip by its time.
SERVE_STATS_PREFIX = "trainyard:serve:stats:"
SERVE_STATS_TTL_S = 300


def serve_stats_key(model_name: str) -> str:
    return f"{SERVE_STATS_PREFIX}{model_name}"


def publish_serve_stats(
    client: redis.Redis, instance: str, by_model: dict[str, dict[str, Any]]
) -> None:
    """Write this serve process's snapshot of each model. Raises RedisError."""
    if not by_model:
        return
    pipe = client.pipeline(transaction=False)
    for name, snapshot in by_model.items():
        key = serve_stats_key(name)
        pipe.hset(key, instance, json.dumps(snapshot, separators=(",", ":")))
        pipe.expire(key, SERVE_STATS_TTL_S)
    pipe.execute()


def read_serve_stats(client: redis.Redis, model_name: str) -> dict[str, dict[str, Any]]:
    """Each serve process's last snapshot of the model: instance -> snapshot. Raises
    RedisError."""
    found = {}
    for instance, raw in client.hgetall(serve_stats_key(model_name)).items():
        try:
            found[_text(instance)] = json.loads(raw)
        except ValueError:
            continue
    return found


# ----------------------------------------------------------------------------- monitoring

# Counters and histograms that worker slots and reconcilers count for Prometheus
# (shared/event_metrics.py): one hash per series, named after it; its fields are the
# series' label values (and a histogram's bucket, sum or count). No TTL: they are
# counters, and a Redis that loses them reads as a counter reset, which Prometheus's
# rate() already understands.
EVENT_METRICS_PREFIX = "trainyard:prom:"


def event_metrics_key(series_name: str) -> str:
    return f"{EVENT_METRICS_PREFIX}{series_name}"
