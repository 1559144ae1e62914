"""The worker's own look at whether it still consumes, and the restart of its consumer
(TRAINYARD_STUCK_CONSUMER_RESTART; off by default).

The web flags a node that is alive but takes no messages (shared/fleet_health.py). With
the setting on, the node's main process applies the same rule to itself on the
consumer's timer (NodeControlStep, worker/node_control.py) every CHECK_S seconds, and
when it holds on two checks in a row it cancels and re-adds its queue consumers, as
Celery's cancel_consumer/add_consumer control commands would: kombu then registers the
queues with the broker connection again. Each restart is logged and recorded on the
node's registry record, which the workers page shows. If the node still takes nothing
afterwards it stays flagged, and a restart of the worker is the remedy (README).

It runs on the event loop like the cordon switch, and only reads: its slots' entries
and the queue depths from Redis, the crash guard's rows and the waiting jobs from the
database. Nothing here may break the worker: any error skips the check.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from shared.broker import queue_depths, redis_client
from shared.db import transaction, utcnow
from shared.fleet_health import IdleSlot, not_consuming, queued_jobs
from shared.orm import Job
from shared.settings import Settings
from shared.worker_nodes import slot_guards
from shared.worker_registry import online_slots, record_consumer_restart

log = logging.getLogger(__name__)

# How often the rule is checked; a restart needs it to hold on two checks in a row.
CHECK_S = 10.0
REDIS_TIMEOUT_S = 2.0


class ConsumerWatch:
    def __init__(self, settings: Settings, node: str) -> None:
        self._settings = settings
        self._node = node
        self._next = 0.0
        self._suspected = False
        self.restarts = 0

    def verdict(self, queues: tuple[str, ...]) -> str | None:
        """The rule of shared/fleet_health.py, for this node; None: it consumes."""
        from sqlalchemy import select

        client = redis_client(self._settings.require_redis_url(), timeout_s=REDIS_TIMEOUT_S)
        try:
            mine = [s for s in online_slots(client) if s.info.node == self._node]
            messages = queue_depths(client, queues)
        finally:
            client.close()
        after_s = self._settings.stuck_consumer_seconds
        if not mine or any(s.quiet_s is None or s.quiet_s < after_s for s in mine):
            return None  # the cheap half: a slot got a message lately
        with transaction(self._settings.resolved_database_url) as session:
            stopped = {g.slot for g in slot_guards(session, self._node).values() if g.stopped}
            names = [s.name for s in mine]
            busy = set(
                session.scalars(select(Job.worker).where(Job.state == "running",
                                                         Job.worker.in_(names)))
            )  # fmt: skip
            waiting = queued_jobs(session, queues, utcnow())
        slots = [
            IdleSlot(
                queues=s.info.queues,
                gpu_memory=tuple(g.get("memory_total_bytes") for g in s.info.gpus),
                busy=s.name in busy,
                stopped=s.info.slot in stopped,
                idle_s=s.idle_s,
                quiet_s=s.quiet_s,
            )
            for s in mine
        ]
        return not_consuming(slots, False, messages, waiting, after_s)

    def tick(self, consumer: Any, queues: tuple[str, ...], consuming: bool) -> None:
        """On the consumer's timer. `consuming`: the cordon switch has the queues on."""
        if not self._settings.stuck_consumer_restart or not queues:
            return
        now = time.monotonic()
        if not consuming:
            self._suspected = False  # cordoned or every slot stopped: not meant to consume
            return
        if now < self._next:
            return
        self._next = now + CHECK_S
        try:
            reason = self.verdict(queues)
        except Exception as exc:  # noqa: BLE001 - a missed check is retried, never fatal
            log.info("consumer watch: cannot check node %s (%s)", self._node, exc)
            return
        if reason is None or not self._suspected:
            self._suspected = reason is not None
            return
        self._suspected = False
        for queue in queues:
            consumer.cancel_task_queue(queue)
            consumer.add_task_queue(queue)
        self.restarts += 1
        log.error("node %s: %s; restarted its consumer of %s", self._node, reason, ",".join(queues))
        try:
            client = redis_client(self._settings.require_redis_url(), timeout_s=REDIS_TIMEOUT_S)
            try:
                record_consumer_restart(client, self._node, reason)
            finally:
                client.close()
        except Exception as exc:  # noqa: BLE001 - the log line above still says it
            log.info("consumer watch: cannot record the restart (%s)", exc)
