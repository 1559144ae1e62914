"""LeaseKeeper: a heartbeat thread that extends the job's lease, and the one place that
decides when a running job must stop early, and why.

The training loop only calls `should_stop()` between steps (cheap: a flag, another flag
and a clock read), so every reason to stop reaches it within a step or two:

- cancelled: the user asked (the heartbeat reads the flag from the job row);
- lost: another attempt holds the job, or may hold it (see below); this attempt then
  writes nothing final;
- time_limit: the spec's `max_runtime_s` has passed since the claim;
- shutdown: the worker is shutting down (worker/shutdown.py); the job is handed back.
- drain: an admin drained this worker node with --now (shared/worker_nodes.py); the
  heartbeat reads the node's row, and the job is handed back like on shutdown.
- preempted: the scheduler asked this job to make room for a waiting job of higher
  priority (shared/scheduling.py); the heartbeat reads the flag from the job row, and
  the job checkpoints and is handed back like on shutdown.

Heartbeat failures: each beat that fails is counted (`failed_beats`, reset by a good
one). The lease runs out `lease_seconds` after the last beat that succeeded; from then
on the reconciler may requeue the job and another worker claim it, so this attempt
stops itself: it is `lost`, even if the database never told it so. With the default
timings (lease 60 s, a beat every 10 s) that is 6 failed beats in a row. The check
also runs in `should_stop`, so a beat stuck in a hung connection cannot delay it.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time

from shared.db import transaction
from shared.state_machine import renew_lease
from shared.worker_nodes import hand_back_requested
from worker.shutdown import shutdown_requested

log = logging.getLogger(__name__)


class StopReason(str, enum.Enum):
    CANCELLED = "cancelled"
    LOST = "lost"
    TIME_LIMIT = "time_limit"
    SHUTDOWN = "shutdown"
    PREEMPTED = "preempted"
    DRAIN = "drain"


class LeaseKeeper:
    def __init__(
        self,
        database_url: str,
        job_id: int,
        attempt: int,
        lease_seconds: float,
        interval: float,
        *,
        max_runtime_s: float | None = None,
        claimed_at: float | None = None,
        node: str | None = None,
    ):
        """`claimed_at`: time.monotonic() taken just before the claim, which set the
        first lease; defaults to now. `node`: this worker's Celery node name, whose
        drain --now stops the job."""
        self._node = node
        self._url = database_url
        self._job_id = job_id
        self._attempt = attempt
        self._lease_seconds = lease_seconds
        self._interval = interval
        start = time.monotonic() if claimed_at is None else claimed_at
        # Local (monotonic) times: when the lease last set may run out, and the soft limit.
        self._lease_ends = start + lease_seconds
        self._deadline = start + max_runtime_s if max_runtime_s else math.inf
        self.stop = threading.Event()
        self.stop_reason: StopReason | None = None
        self.failed_beats = 0  # in a row
        self.preempted_by: int | None = None  # the job this one makes room for
        self._reason_lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    @property
    def lost(self) -> bool:
        return self.stop_reason is StopReason.LOST

    @property
    def cancel_requested(self) -> bool:
        return self.stop_reason is StopReason.CANCELLED

    @property
    def beats_per_lease(self) -> int:
        """About how many beats fail in a row before this attempt stops itself."""
        return max(1, math.floor(self._lease_seconds / self._interval))

    def request_stop(self, reason: StopReason) -> None:
        """Stop the job for `reason`. The first reason wins, except that losing the
        job overrides any other: a lost attempt must not write an outcome."""
        with self._reason_lock:
            if self.stop_reason is None or reason is StopReason.LOST:
                self.stop_reason = reason
        self.stop.set()

    def should_stop(self) -> bool:
        """Polled by the training loop before every step."""
        if self.stop.is_set():
            return True
        if shutdown_requested():
            self.request_stop(StopReason.SHUTDOWN)
        else:
            self._check_clocks(time.monotonic())
        return self.stop.is_set()

    def _check_clocks(self, now: float) -> None:
        if now >= self._lease_ends:
            log.warning(
                "job %s attempt %s: no heartbeat for %.1fs (%d failed in a row), longer than "
                "the %.0fs lease; another worker may own the job now: stopping",
                self._job_id, self._attempt, now - self._lease_ends + self._lease_seconds,
                self.failed_beats, self._lease_seconds,
            )  # fmt: skip
            self.request_stop(StopReason.LOST)
        elif now >= self._deadline:
            self._deadline = math.inf  # once is enough; keeps _wait_seconds from spinning
            self.request_stop(StopReason.TIME_LIMIT)

    def beat(self) -> None:
        started = time.monotonic()
        with transaction(self._url) as session:
            hb = renew_lease(session, self._job_id, self._attempt, self._lease_seconds)
            drain_now = (
                hb.owned and self._node is not None and hand_back_requested(session, self._node)
            )
        if not hb.owned:
            self.request_stop(StopReason.LOST)
            return
        # The database set the lease from its own "now", which came after `started`.
        self._lease_ends = started + self._lease_seconds
        self.failed_beats = 0
        if hb.cancel_requested:
            self.request_stop(StopReason.CANCELLED)
        elif hb.preempted_by is not None and self.stop_reason is None:
            self.preempted_by = hb.preempted_by
            self.request_stop(StopReason.PREEMPTED)
        elif drain_now:
            self.request_stop(StopReason.DRAIN)

    def _run(self) -> None:
        while not self._done.wait(self._wait_seconds()):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - a missed beat is survivable until the lease runs out
                self.failed_beats += 1
                log.warning(
                    "job %s attempt %s: heartbeat failed (%d in a row)",
                    self._job_id, self._attempt, self.failed_beats, exc_info=True,
                )  # fmt: skip
            self._check_clocks(time.monotonic())
            if self.lost:
                log.warning("job %s attempt %s: lease lost; stopping", self._job_id, self._attempt)
                return

    def _wait_seconds(self) -> float:
        # Wake for the time limit too, so `stop` is set on time even between beats.
        return max(0.0, min(self._interval, self._deadline - time.monotonic()))

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
