"""Operating a fleet: cordon, drain and the crash guard, as rows in the database.

A *node* is one `trainyard worker` (`celery worker`) process, named by its Celery node
name (`trainyard-1234@gpu-01`, or whatever `--name` gave it). An admin can

- cordon it: it takes no new jobs; the jobs it runs go on;
- drain it: cordon, and its running jobs finish (the page shows "draining" until none
  runs, then "drained");
- drain it now: cordon, and its running jobs checkpoint and go back to the queue (their
  lease heartbeat reads `drain_now`, worker/lease.py), where another node resumes them;
- uncordon it: all of the above undone.

Why the database and not the Redis registry (shared/worker_registry.py): the registry is
ephemeral by design (a slot's entry dies with it), and a cordon must outlive the worker:
a node restarted under the same name is still cordoned, and a node can be cordoned
before it starts. The worker polls its row (worker/node_control.py).

The crash guard is per *slot* (node, slot index, worker/slots.py): a slot whose jobs die
within TRAINYARD_CRASH_GUARD_SECONDS of their claim TRAINYARD_CRASH_GUARD_RUNS times in a
row (a broken driver, a full disk, a bad image) stops taking jobs and says why, instead
of burning through the queue; `clear` (CLI, API, the workers page) lets it take jobs
again. Which deaths count is decided by the worker (worker/node_control.py).

No Flask, no torch: the web, the CLI and the worker all call these.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from shared.db import utcnow
from shared.orm import WorkerNode, WorkerSlotGuard

Action = Literal["cordon", "drain", "drain_now", "uncordon"]
ACTIONS: tuple[Action, ...] = ("cordon", "drain", "drain_now", "uncordon")
# Celery node names are name@host; no whitespace or slashes (they go into URL paths).
_NODE_NAME = re.compile(r"^[A-Za-z0-9._%+:-]+(@[A-Za-z0-9._-]+)?$")
MAX_NODE_CHARS = 255
# What a stopped slot's reason keeps of the last error.
_ERROR_CHARS = 300


def check_node_name(node: str) -> str:
    """`node` if it can be a Celery node name; ValueError saying why otherwise."""
    node = node.strip()
    if not node or len(node) > MAX_NODE_CHARS or not _NODE_NAME.match(node):
        raise ValueError(
            "a worker node name like trainyard-1234@gpu-01 (letters, digits, . _ - : and "
            f"one @; at most {MAX_NODE_CHARS} characters)"
        )
    return node


@dataclass(frozen=True)
class NodeControl:
    """What an admin asked of a node. A node without a row is active."""

    node: str
    cordoned: bool = False
    draining: bool = False
    drain_now: bool = False
    changed_by: str | None = None
    changed_at: datetime | None = None

    @property
    def takes_jobs(self) -> bool:
        return not self.cordoned

    def state(self, running_jobs: int) -> str:
        """ "active", "cordoned", "draining" (jobs still run) or "drained"."""
        if not self.cordoned:
            return "active"
        if self.draining:
            return "draining" if running_jobs else "drained"
        return "cordoned"


@dataclass(frozen=True)
class SlotGuard:
    node: str
    slot: int
    quick_deaths: int
    last_error: str | None
    stopped_at: datetime | None
    stopped_reason: str | None

    @property
    def stopped(self) -> bool:
        return self.stopped_at is not None


def _control(row: WorkerNode | None, node: str) -> NodeControl:
    if row is None:
        return NodeControl(node=node)
    return NodeControl(
        node=row.node, cordoned=row.cordoned, draining=row.draining, drain_now=row.drain_now,
        changed_by=row.changed_by, changed_at=row.changed_at,
    )  # fmt: skip


def _guard(row: WorkerSlotGuard) -> SlotGuard:
    return SlotGuard(
        node=row.node, slot=row.slot, quick_deaths=row.quick_deaths, last_error=row.last_error,
        stopped_at=row.stopped_at, stopped_reason=row.stopped_reason,
    )  # fmt: skip


def set_control(session: Session, node: str, action: Action, by: str | None) -> NodeControl:
    """Cordon, drain (now) or uncordon `node`; returns its state afterwards. Idempotent."""
    node = check_node_name(node)
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}")
    row = session.get(WorkerNode, node)
    if row is None:
        row = WorkerNode(node=node, cordoned=False, draining=False, drain_now=False)
        session.add(row)
    if action == "uncordon":
        row.cordoned = row.draining = row.drain_now = False
    else:
        row.cordoned = True
        # A drain is not undone by a later plain cordon, and a drain --now stays one.
        row.draining = row.draining or action in ("drain", "drain_now")
        row.drain_now = row.drain_now or action == "drain_now"
    row.changed_by = by
    row.changed_at = utcnow()
    session.flush()
    return _control(row, node)


def node_control(session: Session, node: str) -> NodeControl:
    return _control(session.get(WorkerNode, node), node)


def all_controls(session: Session) -> dict[str, NodeControl]:
    rows = session.execute(select(WorkerNode)).scalars()
    return {row.node: _control(row, row.node) for row in rows}


def slot_guards(session: Session, node: str | None = None) -> dict[tuple[str, int], SlotGuard]:
    stmt = select(WorkerSlotGuard)
    if node is not None:
        stmt = stmt.where(WorkerSlotGuard.node == node)
    return {(row.node, row.slot): _guard(row) for row in session.execute(stmt).scalars()}


def hand_back_requested(session: Session, node: str) -> bool:
    """Whether `node` was drained with --now: its running jobs must hand themselves back."""
    row = session.get(WorkerNode, node)
    return row is not None and row.drain_now


def refusal(session: Session, node: str, slot: int | None) -> str | None:
    """Why this slot must not claim a job now (cordoned node, stopped slot); None: it may."""
    control = node_control(session, node)
    if control.cordoned:
        what = "draining" if control.draining else "cordoned"
        return f"node {node} is {what}" + (
            f" by {control.changed_by}" if control.changed_by else ""
        )
    if slot is not None:
        row = session.get(WorkerSlotGuard, (node, slot))
        if row is not None and row.stopped_at is not None:
            return f"slot {slot} stopped: {row.stopped_reason}"
    return None


def stops_consuming(session: Session, node: str, slots: int) -> str | None:
    """Why the whole node should stop consuming its queues (cordoned, or every one of
    its `slots` slots stopped by the crash guard); None: consume."""
    control = node_control(session, node)
    if control.cordoned:
        return "draining" if control.draining else "cordoned"
    stopped = sum(g.stopped for g in slot_guards(session, node).values() if g.slot < slots)
    if slots and stopped >= slots:
        return "every slot stopped by the crash guard"
    return None


def record_quick_death(
    session: Session, node: str, slot: int, error: str, runs: int, seconds: float
) -> str | None:
    """A job of this slot died within `seconds` of its claim: count it; once `runs` died
    in a row, stop the slot. Returns the reason when this death stopped it."""
    row = session.get(WorkerSlotGuard, (node, slot))
    if row is None:
        row = WorkerSlotGuard(node=node, slot=slot, quick_deaths=0)
        session.add(row)
    error = " ".join(error.split())[:_ERROR_CHARS]
    row.quick_deaths = (row.quick_deaths or 0) + 1
    row.last_error = error
    row.updated_at = utcnow()
    stopped_now = None
    if runs and row.quick_deaths >= runs and row.stopped_at is None:
        row.stopped_at = row.updated_at
        row.stopped_reason = f"{row.quick_deaths} jobs died within {seconds:g} s in a row: {error}"
        stopped_now = row.stopped_reason
    session.flush()
    return stopped_now


def record_healthy_run(session: Session, node: str, slot: int) -> None:
    """A job of this slot ran past the guard's window (or succeeded): the streak ends.
    A stopped slot stays stopped until an admin clears it."""
    row = session.get(WorkerSlotGuard, (node, slot))
    if row is not None and row.quick_deaths and row.stopped_at is None:
        row.quick_deaths = 0
        row.updated_at = utcnow()
        session.flush()


def clear_guard(session: Session, node: str) -> int:
    """Let every stopped slot of `node` take jobs again, with a fresh count. Returns how
    many slots were stopped."""
    node = check_node_name(node)
    stopped = sum(g.stopped for g in slot_guards(session, node).values())
    session.execute(delete(WorkerSlotGuard).where(WorkerSlotGuard.node == node))
    return stopped
