"""MetricSink: buffers metric points and progress, writes them in batches off the hot path.

The training loop only appends to a list (cheap, no I/O). A background thread writes
every `flush_seconds` in one short transaction, fenced by the attempt number: if this
attempt lost the job, nothing is written. A failed write keeps the points for the next
try, so a database hiccup delays metrics instead of failing the job (docs/architecture.md,
"Reliability" R8).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import insert

from shared import event_metrics
from shared import prometheus_catalog as pc
from shared.db import transaction
from shared.metric_catalog import finite_number
from shared.orm import MetricPoint
from shared.state_machine import still_owns, update_progress

log = logging.getLogger(__name__)


class LostJob(Exception):
    """This attempt no longer owns the job (another attempt claimed it)."""


class MetricSink:
    def __init__(
        self,
        database_url: str,
        job_id: int,
        attempt: int,
        flush_seconds: float = 2.0,
        flush_points: int = 500,
        give_up: Callable[[], bool] = lambda: False,
        redis_url: str | None = None,
        on_written: Callable[[list[dict[str, Any]]], None] | None = None,
    ):
        """`give_up`: checked while `close` retries a failed write; True means the points
        can no longer be written by this attempt (its lease ran out), so stop trying.
        `redis_url`: where to count the points written, for Prometheus. `on_written`:
        given each batch once it is stored (worker/tensorboard_live.py)."""
        self._url = database_url
        self._job_id = job_id
        self._attempt = attempt
        self._flush_seconds = flush_seconds
        self._flush_points = flush_points
        self._give_up = give_up
        self._redis_url = redis_url
        self._on_written = on_written
        self._points: list[dict[str, Any]] = []
        self._progress: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"metric-sink-{job_id}", daemon=True)
        self.lost = False
        self.points_written = 0
        self._dropped_keys: set[str] = set()

    # -- the Sink protocol used by worker/training -------------------------------
    def log(self, key: str, value: float, step: int, epoch: int | None = None) -> None:
        number = finite_number(value)
        if number is None:
            # SQLite stores NaN as NULL, which the NOT NULL column refuses: one such point
            # would fail every later batch of the job, and JSON has no NaN either. The
            # gap in the series is the honest record; the log says why it is there.
            if key not in self._dropped_keys:
                self._dropped_keys.add(key)
                log.warning(
                    "job %s: %s is %r at step %s; non-finite points are not stored",
                    self._job_id, key, value, step,
                )  # fmt: skip
            return
        point = {
            "job_id": self._job_id,
            "attempt": self._attempt,
            "key": key,
            "step": int(step),
            "epoch": epoch,
            "value": number,
            "wall_time": time.time(),
        }
        with self._lock:
            self._points.append(point)
            full = len(self._points) >= self._flush_points
        if full:
            self._wake.set()

    def progress(self, progress: dict[str, Any]) -> None:
        with self._lock:
            self._progress = dict(progress)

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> MetricSink:
        self._thread.start()
        return self

    def close(self, timeout: float = 60.0) -> None:
        """Stop the thread and write what is left, retrying until `timeout`."""
        self._closed.set()
        self._wake.set()
        self._thread.join()
        deadline = time.monotonic() + timeout
        delay = 0.2
        while not self.lost:
            if self._give_up():
                log.warning(
                    "job %s attempt %s: dropping %d metric points: the job may be another "
                    "attempt's now",
                    self._job_id, self._attempt, len(self._points),
                )  # fmt: skip
                return
            try:
                if self.flush() == 0:
                    return
            except LostJob:
                return
            except Exception:  # noqa: BLE001 - retried until the deadline
                if time.monotonic() > deadline:
                    log.error(
                        "job %s: giving up on %d unwritten metric points",
                        self._job_id,
                        len(self._points),
                    )
                    raise
                log.warning(
                    "job %s: metric write failed, retrying in %.1fs",
                    self._job_id,
                    delay,
                    exc_info=True,
                )
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def __enter__(self) -> MetricSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def flush(self) -> int:
        """Write buffered points and the latest progress; returns how many points."""
        with self._write_lock:
            with self._lock:
                points, self._points = self._points, []
                progress = self._progress
            if not points and progress is None:
                return 0
            try:
                with transaction(self._url) as session:
                    # The fenced UPDATE is the ownership check, and locks the job row so
                    # a concurrent reclaim waits for this batch. Without new progress,
                    # leave the last one in place.
                    if progress is None:
                        owned = still_owns(session, self._job_id, self._attempt)
                    else:
                        owned = update_progress(session, self._job_id, self._attempt, progress)
                    if not owned:
                        self.lost = True
                        raise LostJob(f"job {self._job_id} attempt {self._attempt} lost its claim")
                    if points:
                        session.execute(insert(MetricPoint), points)
            except LostJob:
                raise
            except Exception:
                with self._lock:
                    self._points[:0] = points  # keep order; retried on the next flush
                raise
            with self._lock:
                if self._progress is progress:
                    self._progress = None
            self.points_written += len(points)
            if points:
                event_metrics.count(self._redis_url, pc.METRIC_POINTS, by=len(points))
                self._hand_on(points)
            return len(points)

    def _hand_on(self, points: list[dict[str, Any]]) -> None:
        if self._on_written is None:
            return
        try:
            self._on_written(points)
        except Exception:  # noqa: BLE001 - a side copy (a full disk) must not stop training
            log.warning("job %s: could not hand on %d stored points", self._job_id,
                        len(points), exc_info=True)  # fmt: skip

    def _run(self) -> None:
        while not self._closed.is_set():
            self._wake.wait(self._flush_seconds)
            self._wake.clear()
            if self._closed.is_set():
                return
            try:
                self.flush()
            except LostJob:
                log.warning(
                    "job %s attempt %s: lost the job; metrics stop", self._job_id, self._attempt
                )
                return
            except Exception:  # noqa: BLE001 - a DB hiccup must not kill training
                log.warning("job %s: metric flush failed; will retry", self._job_id, exc_info=True)
