"""The worker's side of cordon, drain and the crash guard (shared/worker_nodes.py).

Three places act on an admin's say over this node:

- Before a claim, in the pool child (`refusal`, from worker/tasks.py): a cordoned node or
  a slot stopped by the crash guard takes no job. The message is put back on its queue
  (Celery Reject with requeue, the path a child without a free slot already uses), so
  another worker takes it and nothing is lost. This check is what makes cordon exact:
  it holds for a message the node had already fetched, and from the first message after
  a restart.
- In the main process (`ConsumerSwitch`, on the consumer's timer) the node's row is
  polled, and while the node is cordoned (or every slot is stopped) it stops consuming
  its queues, as Celery's `cancel_consumer` control command does (and `add_consumer`
  once it may take jobs again). Why as well: without it a cordoned node would keep
  fetching messages only to put them back, and on a queue with one consumer that is a
  busy loop. Why not the control commands themselves: they act only on the running
  process, and the cordon must hold from a restarted node's first start.
- During a job, the lease heartbeat (worker/lease.py) reads `drain_now`, and the job
  checkpoints and is handed back like on a worker shutdown (no attempt used up).

Crash guard: what counts as a job that "died" (`counts_as_death`), decided here:
an attempt that ended, within TRAINYARD_CRASH_GUARD_SECONDS of its claim,
- with an infrastructure failure (database, broker, disk: worker/failures.py), or
- with an unexpected exception that is not the job's own (not a UserError: a bad
  dataset, a spec the slot cannot run; not running out of memory; not its time limit):
  a CUDA error from a broken driver, a permission error on the artifacts directory, or
- with its pool child dead (killed by a signal or exited: billiard's WorkerLostError,
  seen by the main process, `record_killed_child`).
A user's mistake never counts, and neither does a cancel or a hand-back; a success, or
any attempt that ran past the window, ends the streak.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta
from typing import Any

from celery import bootsteps
from sqlalchemy import select

from shared.db import transaction, utcnow
from shared.orm import Job
from shared.settings import Settings
from shared.worker_nodes import record_healthy_run, record_quick_death, stops_consuming
from shared.worker_nodes import refusal as node_refusal
from worker import slots
from worker.consumer_watch import ConsumerWatch
from worker.failures import CUDA_OOM, HOST_OOM

log = logging.getLogger(__name__)

# How often the main process looks at its node's row; a cordon takes effect within this
# (and at once for claims: the pool child checks before each one).
POLL_S = 2.0
# A refused message goes back after this pause, so a node that still fetches (between a
# cordon and its consumer switching off) does not spin on it.
REFUSE_PAUSE_S = 1.0
# How long the event loop waits for the crash guard's write about a dead child.
WRITE_TIMEOUT_S = 5.0

# Failures that are the job's own even with a traceback: it needs more memory than a
# slot has, or more time than it asked for.
_OWN_ERRORS = (CUDA_OOM, HOST_OOM, "TimeLimitExceeded")

# This worker's Celery node name: set in the main process before the pool forks
# (worker/celery_worker.py), inherited by every child.
_node: dict[str, str | None] = {"name": None}


def set_node(name: str) -> None:
    _node["name"] = name


def node_name() -> str | None:
    return _node["name"]


def _slot_index() -> int | None:
    slot = slots.current_slot()
    return None if slot is None else slot.index


def refusal(settings: Settings) -> str | None:
    """In a pool child, before a claim: why it must not take a job now; None: it may.
    A database that does not answer here is not a reason to refuse (the claim itself
    then fails and is handled as ever)."""
    node = node_name()
    if node is None:
        return None
    try:
        with transaction(settings.resolved_database_url) as session:
            return node_refusal(session, node, _slot_index())
    except Exception as exc:  # noqa: BLE001
        log.warning("node control: cannot read node %s (%s); claiming as usual", node, exc)
        return None


def verdict(state: str, retry: bool, error_type: str | None, traceback: str) -> bool | None:
    """How an attempt's end counts for the crash guard (see the module docstring): True
    a death, False a healthy run, None neither (the job's own error, a cancel, a
    hand-back). `traceback` is the runner's detail, empty for a UserError."""
    if retry:
        return True
    if state == "succeeded":
        return False
    if state == "failed" and traceback and error_type not in _OWN_ERRORS:
        return True
    return None


def attempt_ended(
    settings: Settings, *, died: bool | None, ran_s: float, error: str, slot: int | None = None
) -> None:
    """Count (or end) this slot's streak of quick deaths: `died` is `verdict`'s answer.
    Never raises: the guard must not break a worker."""
    node = node_name()
    slot = _slot_index() if slot is None else slot
    runs = settings.crash_guard_runs
    if node is None or slot is None or runs == 0:
        return
    quick = ran_s <= settings.crash_guard_seconds
    if died is None and quick:
        return
    try:
        with transaction(settings.resolved_database_url) as session:
            if died and quick:
                stopped = record_quick_death(
                    session, node, slot, error, runs, settings.crash_guard_seconds
                )
                if stopped:
                    log.error("crash guard: %s slot %s takes no more jobs: %s", node, slot, stopped)
            else:
                # A success, or a job that ran past the window whatever its end.
                record_healthy_run(session, node, slot)
    except Exception as exc:  # noqa: BLE001
        log.warning("crash guard: cannot record the attempt's end (%s)", exc)


def record_killed_child(settings: Settings, pid: int | None, message: str) -> None:
    """In the main process: the pool child `pid` died mid-job. If its job was claimed
    within the guard's window, that is a quick death of the child's slot.

    This runs in the event loop, and waits for its write (a few seconds at most) rather
    than leave it to a thread: the loop is also what forks the dead child's replacement,
    and a fork while another thread is inside an SQLite transaction leaves the child
    with SQLite's in-process lock state of that moment ("database is locked" for good).
    worker/child_death.py waits for its write for the same reason."""
    if not pid or node_name() is None or settings.crash_guard_runs == 0:
        return

    def record() -> None:
        from worker.runner import worker_name  # the runner imports this module

        try:
            with transaction(settings.resolved_database_url) as session:
                row = session.execute(
                    select(Job.started_at, Job.placement)
                    .where(Job.worker == worker_name(pid))
                    .order_by(Job.started_at.desc())
                    .limit(1)
                ).first()
                now = utcnow()
            if row is None or row.started_at is None:
                return
            slot = (row.placement or {}).get("slot")
            if not isinstance(slot, int):
                return
            ran_s = (now - row.started_at) / timedelta(seconds=1)
            attempt_ended(settings, died=True, ran_s=ran_s, error=message, slot=slot)
        except Exception as exc:  # noqa: BLE001
            log.warning("crash guard: cannot record the death of child %s (%s)", pid, exc)

    thread = threading.Thread(target=record, name="crash-guard", daemon=True)
    thread.start()
    thread.join(WRITE_TIMEOUT_S)


class ConsumerSwitch:
    """In the worker's main process: stops consuming the node's queues while the node is
    cordoned (or every slot is stopped), and consumes again once it is not.

    `tick` runs on the consumer's own timer, in the event loop (NodeControlStep): the
    consumer may only be touched from there, and nothing forks a pool child while it
    reads the database (see record_killed_child)."""

    def __init__(self, settings: Settings, node: str, slot_count: int) -> None:
        self._settings = settings
        self._node = node
        self._slot_count = slot_count
        self.queues: tuple[str, ...] | None = None  # what -Q chose, read at the first start
        self.consuming = True
        self._failing = False
        self.watch = ConsumerWatch(settings, node)

    def reason(self) -> str | None:
        with transaction(self._settings.resolved_database_url) as session:
            return stops_consuming(session, self._node, self._slot_count)

    def tick(self, consumer: Any) -> None:
        try:
            reason = self.reason()
        except Exception as exc:  # noqa: BLE001 - a missed poll is retried, never fatal
            if not self._failing:
                log.warning("node control: cannot check node %s (%s)", self._node, exc)
            self._failing = True
            return
        self._failing = False
        queues = self.queues or ()
        if reason and self.consuming:
            for queue in queues:
                consumer.cancel_task_queue(queue)
            self.consuming = False
            log.warning("node %s: %s; stopped consuming %s", self._node, reason, ",".join(queues))
        elif not reason and not self.consuming:
            for queue in queues:
                consumer.add_task_queue(queue)
            self.consuming = True
            log.warning("node %s: consuming %s again", self._node, ",".join(queues))
        # A node that should consume but takes nothing (worker/consumer_watch.py).
        self.watch.tick(consumer, queues, self.consuming)


# The main process's switch, set up before the consumer starts (worker/celery_worker.py).
_switch: dict[str, ConsumerSwitch] = {}


def install_switch(settings: Settings, node: str, slot_count: int) -> None:
    _switch["switch"] = ConsumerSwitch(settings, node, slot_count)


class NodeControlStep(bootsteps.StartStopStep):
    """A consumer bootstep: each time the consumer starts (a broker reconnect restarts
    it, and drops the timer entries of the old connection) the switch looks at once and
    then every POLL_S seconds. Added with `app.steps["consumer"].add(NodeControlStep)`."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._tref: Any = None

    def start(self, parent: Any) -> None:
        switch = _switch.get("switch")
        if switch is None or parent.timer is None:
            return
        if switch.queues is None:
            switch.queues = tuple(sorted(parent.app.amqp.queues.consume_from))
        switch.tick(parent)
        self._tref = parent.timer.call_repeatedly(POLL_S, switch.tick, (parent,))

    def stop(self, parent: Any) -> None:
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None

    def shutdown(self, parent: Any) -> None:
        self.stop(parent)


def pause_before_refusing() -> None:
    time.sleep(REFUSE_PAUSE_S)
