"""Which worker slots are online: a small registry in Redis, kept alive by heartbeats.

Each worker slot (a Celery prefork child; its name `host:pid` is what the runner writes
into `Job.worker`) keeps a hash `trainyard:workers:<host:pid>` describing itself, and
refreshes it every HEARTBEAT_S with a TTL of TTL_S. A slot that dies without saying
goodbye (SIGKILL, OOM, a lost host) therefore vanishes on its own within TTL_S; a clean
shutdown deletes its hash at once. A set, `trainyard:workers`, names the slots so that
readers need no SCAN over the whole keyspace; names whose hash expired are pruned by
the next reader.

Liveness comes from Redis's own clock (the key's remaining TTL), never from comparing
the worker's clock with the reader's, so clock skew between hosts cannot make a live
worker look dead or a dead one alive.

Each slot also says how long it has been idle (`idle_s`: since its last task ended, 0
while one runs) and since when no message reached it (`quiet_s`: since its last task
started), measured by its own monotonic clock at the beat; a reader adds the beat's age
(by Redis's clock), so these too are free of skew. They are what finds a worker that is
alive but no longer consuming (shared/fleet_health.py).

A node is remembered past its slots: `trainyard:worker-node:<node>` (a hash: host,
last_seen, stopped_at) and `trainyard:worker-node-slots:<node>` (a sorted set of the slot
names it ran, by last beat) have no TTL, so a node whose slots all expired without a
clean shutdown (SIGKILL, a lost host) shows as "lost", with the jobs its slots ran;
a clean shutdown writes stopped_at (`mark_stopped`). Readers prune nodes not seen for
a day or so (`departed_nodes`).

Registry writes must never break a worker: the heartbeat thread catches everything, logs
the first failure of a streak (not one line every beat) and tries again next beat.

No Flask, no torch: the worker passes in what it knows about its devices, and a
function that samples its host, process and GPUs (worker/telemetry.py); each beat stores
that sample, as JSON, in the hash's `telemetry` field for the workers page.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from shared.broker import redis_client

log = logging.getLogger(__name__)

KEY_PREFIX = "trainyard:workers:"
INDEX_KEY = "trainyard:workers"
# Nodes, kept without a TTL (module docstring).
NODE_PREFIX = "trainyard:worker-node:"
NODE_SLOTS_PREFIX = "trainyard:worker-node-slots:"
NODE_INDEX_KEY = "trainyard:worker-nodes"
# Slot names kept per node: a crash-looping pool can go through many pids.
NODE_SLOTS_KEPT = 50
HEARTBEAT_S = 5.0
# Several missed beats before a slot counts as gone: one slow Redis round trip (or a
# busy GIL in a training step) must not make a worker flicker off the page.
TTL_S = 20.0


@dataclass(frozen=True)
class SlotInfo:
    """What a worker slot says about itself."""

    name: str  # host:pid, exactly as Job.worker holds it
    node: str  # the Celery node name, e.g. trainyard-1234@gpu-01
    host: str
    pid: int
    queues: tuple[str, ...]
    node_slots: int  # the node's concurrency: how many slots it runs in all
    gpu_names: tuple[str, ...] = ()  # every GPU this process can see; empty: CPU only
    device: str = "cpu"  # the torch device jobs in this slot run on, e.g. "cuda:0"
    started_at: float = field(default_factory=time.time)  # Unix time
    slot: int | None = None  # the worker slot this child owns (worker/slots.py)
    # The slot's GPUs: {"index", "uuid", "name", "memory_total_bytes"} each, from NVML
    # (uuid, name and memory are None for a GPU the operator named on a host without
    # NVML). Routing by gpu_memory_gb reads memory_total_bytes.
    gpus: tuple[dict[str, Any], ...] = ()

    @property
    def gpu_count(self) -> int:
        return len(self.gpu_names)

    def to_hash(self, now: float) -> dict[str, str]:
        return {
            "node": self.node,
            "host": self.host,
            "pid": str(self.pid),
            "queues": ",".join(self.queues),
            "node_slots": str(self.node_slots),
            "gpus": str(self.gpu_count),
            "gpu_names": json.dumps(list(self.gpu_names)),
            "device": self.device,
            "slot": "" if self.slot is None else str(self.slot),
            "gpu_devices": json.dumps(list(self.gpus)),
            "started_at": repr(self.started_at),
            "last_heartbeat": repr(now),
        }

    @classmethod
    def from_hash(cls, name: str, raw: dict[str, str]) -> SlotInfo:
        return cls(
            name=name,
            node=raw.get("node", ""),
            host=raw.get("host", name.rpartition(":")[0]),
            pid=int(raw.get("pid") or 0),
            queues=tuple(q for q in raw.get("queues", "").split(",") if q),
            node_slots=int(raw.get("node_slots") or 1),
            gpu_names=tuple(json.loads(raw.get("gpu_names") or "[]")),
            device=raw.get("device", "cpu"),
            started_at=float(raw.get("started_at") or 0.0),
            slot=int(raw["slot"]) if raw.get("slot") else None,
            gpus=tuple(
                g for g in json.loads(raw.get("gpu_devices") or "[]") if isinstance(g, dict)
            ),
        )


@dataclass(frozen=True)
class OnlineSlot:
    """A slot as a reader finds it in the registry."""

    info: SlotInfo
    last_heartbeat: float  # Unix time, by the worker's clock (for display only)
    heartbeat_age_s: float  # seconds since its last beat, by Redis's clock
    telemetry: dict[str, Any] | None = None  # its latest sample (worker/telemetry.py)
    # Seconds since its last task ended (0 while one runs) and since its last task
    # started (or since the slot started), as of now; None from a worker that does not
    # say (an older version).
    idle_s: float | None = None
    quiet_s: float | None = None

    @property
    def name(self) -> str:
        return self.info.name


@dataclass(frozen=True)
class Activity:
    """What a slot says about its tasks at a beat (SlotHeartbeat keeps it)."""

    idle_s: float  # since its last task ended; 0 while one runs
    quiet_s: float  # since its last task started (or the slot started)
    last_task_at: float  # Unix time of its last task's start or end, for display


@dataclass(frozen=True)
class DepartedNode:
    """A node with no slot online, as its record (module docstring) remembers it."""

    node: str
    host: str
    last_seen: float  # Unix time, the worker's clock
    stopped_at: float | None  # a clean shutdown; None: lost
    slot_names: tuple[str, ...]  # host:pid of the slots it ran, newest first

    @property
    def lost(self) -> bool:
        return self.stopped_at is None


def slot_key(name: str) -> str:
    return KEY_PREFIX + name


def register(
    client: redis.Redis,
    info: SlotInfo,
    ttl_s: float = TTL_S,
    telemetry: dict[str, Any] | None = None,
    activity: Activity | None = None,
) -> None:
    """Write (or refresh) a slot's hash and its TTL, and name it in the index; and
    record its node as seen now (no TTL: module docstring). `telemetry`: the slot's
    latest host/process/GPU sample, kept until the next one."""
    pipe = client.pipeline(transaction=True)
    key = slot_key(info.name)
    now = time.time()
    fields = info.to_hash(now)
    if telemetry is not None:
        fields["telemetry"] = json.dumps(telemetry)
    if activity is not None:
        fields["idle_s"] = repr(round(activity.idle_s, 1))
        fields["quiet_s"] = repr(round(activity.quiet_s, 1))
        fields["last_task_at"] = repr(activity.last_task_at)
    pipe.hset(key, mapping=fields)
    pipe.pexpire(key, int(ttl_s * 1000))
    pipe.sadd(INDEX_KEY, info.name)
    if info.node:
        node_key = NODE_PREFIX + info.node
        pipe.hset(node_key, mapping={"host": info.host, "last_seen": repr(now)})
        pipe.hdel(node_key, "stopped_at")
        pipe.zadd(NODE_SLOTS_PREFIX + info.node, {info.name: now})
        pipe.zremrangebyrank(NODE_SLOTS_PREFIX + info.node, 0, -NODE_SLOTS_KEPT - 1)
        pipe.sadd(NODE_INDEX_KEY, info.node)
    pipe.execute()


def mark_stopped(client: redis.Redis, node: str) -> None:
    """A clean shutdown of `node` (its main process, after the pool stopped): shown as
    "stopped", never as "lost". Only for a node the registry knows."""
    key = NODE_PREFIX + node
    if client.exists(key):
        client.hset(key, "stopped_at", repr(time.time()))


def record_consumer_restart(client: redis.Redis, node: str, reason: str) -> None:
    """The node restarted its queue consumer by itself (worker/consumer_watch.py)."""
    key = NODE_PREFIX + node
    pipe = client.pipeline(transaction=True)
    pipe.hincrby(key, "consumer_restarts", 1)
    pipe.hset(key, mapping={"consumer_restarted_at": repr(time.time()), "restart_reason": reason})
    pipe.execute()


@dataclass(frozen=True)
class ConsumerRestarts:
    count: int
    last_at: float  # Unix time, the worker's clock
    reason: str


def consumer_restarts(client: redis.Redis, nodes: list[str]) -> dict[str, ConsumerRestarts]:
    """The automatic consumer restarts each of `nodes` recorded. Raises RedisError."""
    if not nodes:
        return {}
    pipe = client.pipeline(transaction=False)
    for node in nodes:
        pipe.hmget(NODE_PREFIX + node, "consumer_restarts", "consumer_restarted_at",
                   "restart_reason")  # fmt: skip
    found: dict[str, ConsumerRestarts] = {}
    for node, (count, at, reason) in zip(nodes, pipe.execute(), strict=True):
        if count:
            found[node] = ConsumerRestarts(
                int(count), float(at or 0.0), _text(reason) if reason else ""
            )
    return found


def departed_nodes(
    client: redis.Redis, online: set[str], keep_s: float, now: float | None = None
) -> list[DepartedNode]:
    """Nodes with no slot in `online` (node names) seen within `keep_s`, newest first;
    older records are deleted here. Raises RedisError."""
    now = time.time() if now is None else now
    names = sorted(_text(n) for n in client.smembers(NODE_INDEX_KEY))
    names = [n for n in names if n not in online]
    if not names:
        return []
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(NODE_PREFIX + name)
        pipe.zrevrange(NODE_SLOTS_PREFIX + name, 0, -1)
    replies = pipe.execute()
    found: list[DepartedNode] = []
    stale: list[str] = []
    for name, raw, members in zip(names, replies[::2], replies[1::2], strict=True):
        fields = {_text(k): _text(v) for k, v in (raw or {}).items()}
        try:
            last_seen = float(fields.get("last_seen") or 0.0)
            stopped = float(fields["stopped_at"]) if fields.get("stopped_at") else None
        except ValueError:
            last_seen, stopped = 0.0, None
        if now - last_seen > keep_s:
            stale.append(name)
            continue
        found.append(
            DepartedNode(
                node=name,
                host=fields.get("host", ""),
                last_seen=last_seen,
                stopped_at=stopped,
                slot_names=tuple(_text(m) for m in members),
            )
        )
    if stale:
        pipe = client.pipeline(transaction=True)
        for name in stale:
            pipe.delete(NODE_PREFIX + name, NODE_SLOTS_PREFIX + name)
        pipe.srem(NODE_INDEX_KEY, *stale)
        pipe.execute()
    found.sort(key=lambda n: -n.last_seen)
    return found


def unregister(client: redis.Redis, name: str) -> None:
    pipe = client.pipeline(transaction=True)
    pipe.delete(slot_key(name))
    pipe.srem(INDEX_KEY, name)
    pipe.execute()


def online_slots(client: redis.Redis, ttl_s: float = TTL_S) -> list[OnlineSlot]:
    """Every slot whose hash has not expired, by node then name. Raises RedisError."""
    names = sorted(_text(n) for n in client.smembers(INDEX_KEY))
    if not names:
        return []
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(slot_key(name))
        pipe.pttl(slot_key(name))
    replies = pipe.execute()
    found: list[OnlineSlot] = []
    gone: list[str] = []
    for name, raw, pttl in zip(names, replies[::2], replies[1::2], strict=True):
        if not raw or pttl is None or pttl < 0:
            # Expired (a dead slot), or a hash without a TTL, which no live worker
            # writes: either way not online.
            gone.append(name)
            continue
        fields = {_text(k): _text(v) for k, v in raw.items()}
        try:
            info = SlotInfo.from_hash(name, fields)
            last = float(fields.get("last_heartbeat") or 0.0)
        except (ValueError, TypeError) as exc:
            log.warning("worker registry: ignoring malformed entry %r (%s)", name, exc)
            continue
        age = max(0.0, ttl_s - pttl / 1000.0)
        found.append(
            OnlineSlot(
                info=info,
                last_heartbeat=last,
                heartbeat_age_s=round(age, 1),
                telemetry=_telemetry(fields.get("telemetry")),
                idle_s=_since(fields.get("idle_s"), age),
                quiet_s=_since(fields.get("quiet_s"), age),
            )
        )
    if gone:
        client.srem(INDEX_KEY, *gone)
    found.sort(key=lambda s: (s.info.node, s.info.host, s.info.pid))
    return found


def remove_node(client: redis.Redis, node: str) -> int:
    """Delete every slot of one Celery node (its main process, on shutdown, cleans up
    after children that could not do it themselves). Returns how many went."""
    removed = 0
    for slot in online_slots(client):
        if slot.info.node == node:
            unregister(client, slot.name)
            removed += 1
    return removed


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _since(raw: str | None, beat_age_s: float) -> float | None:
    # A duration as of the beat, plus the beat's age: as of now.
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return round(value + beat_age_s if value > 0 else value, 1)


def _telemetry(raw: str | None) -> dict[str, Any] | None:
    # A sample that does not parse costs the page its figures, never the slot's row.
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class SlotHeartbeat:
    """A daemon thread that keeps one slot's registry entry alive.

    `start` writes the entry once before returning (so the slot shows up at once if
    Redis answers) and then refreshes it every `interval_s`; `stop` ends the thread and
    deletes the entry. Neither ever raises.
    """

    def __init__(
        self,
        url: str,
        info: SlotInfo,
        interval_s: float = HEARTBEAT_S,
        ttl_s: float = TTL_S,
        telemetry: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.info = info
        self._telemetry = telemetry
        self._telemetry_failing = False
        self._url = url
        self._interval_s = interval_s
        self._ttl_s = ttl_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: redis.Redis | None = None
        self._failing = False
        # Task activity (Activity), by the monotonic clock; the slot's start counts as
        # its last task's start and end.
        self._in_task = False
        self._started = self._ended = time.monotonic()
        self._last_task_at = time.time()

    def task_started(self) -> None:
        """A message reached this slot (whatever it then does with it): written at once,
        so a reader never takes a slot that just got work for an idle one."""
        self._in_task = True
        self._started = time.monotonic()
        self._last_task_at = time.time()
        self.beat()

    def task_ended(self) -> None:
        self._in_task = False
        self._ended = time.monotonic()
        self._last_task_at = time.time()
        self.beat()

    def activity(self) -> Activity:
        now = time.monotonic()
        return Activity(
            idle_s=0.0 if self._in_task else now - self._ended,
            quiet_s=now - self._started,
            last_task_at=self._last_task_at,
        )

    def start(self) -> None:
        self.beat()
        self._thread = threading.Thread(target=self._run, name="trainyard-registry", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        try:
            unregister(self._redis(), self.info.name)
        except Exception as exc:  # noqa: BLE001 - the entry then expires on its own
            log.debug("worker registry: could not remove %s (%s)", self.info.name, exc)

    def beat(self) -> bool:
        """Refresh the entry once; False (and logged once per streak) when it failed."""
        sample = self._sample()
        try:
            register(self._redis(), self.info, self._ttl_s, sample, self.activity())
        except Exception as exc:  # noqa: BLE001 - a registry must never break a worker
            if not self._failing:
                log.warning(
                    "worker registry: cannot write %s to Redis (%s: %s); retrying every %.0f s",
                    self.info.name, type(exc).__name__, exc, self._interval_s,
                )  # fmt: skip
            self._failing = True
            return False
        if self._failing:
            log.info("worker registry: %s registered again", self.info.name)
        self._failing = False
        return True

    def _sample(self) -> dict[str, Any] | None:
        if self._telemetry is None:
            return None
        try:
            sample = self._telemetry()
        except Exception as exc:  # noqa: BLE001 - the slot still registers, without figures
            if not self._telemetry_failing:
                log.warning("worker registry: cannot sample telemetry (%s)", exc)
            self._telemetry_failing = True
            return None
        self._telemetry_failing = False
        return sample

    def _redis(self) -> redis.Redis:
        if self._client is None:
            self._client = redis_client(self._url)
        return self._client

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.beat()
