"""Server-Sent Events for the job page: state and progress, metric points, log lines and
timeline entries, as they happen.

The stream polls: about once a second it opens a short database session, reads what is
new past the client's cursor, and closes the session before sleeping, so a watched job
never holds a connection or a transaction (and SQLite's WAL can checkpoint). Every
message carries the cursor after it as its SSE `id`; when a response ends (after
`duration` seconds, so that a stream's slot is taken again now and then) or the connection
drops, the browser reconnects with `Last-Event-ID` and the stream resumes there, with
nothing sent twice. Under gunicorn the steps of every open stream are driven by one
thread per process (server/stream_hub.py), not by a request thread each. A job in a
final state gets what is left and an `end` event.

Messages (each `data` is JSON):

    job       state, attempt, worker, progress, error, result metrics when finished
    metrics   {"append": {key: series}, "reset": {key: series}}: points past the cursor,
              or a downsampled whole series for a key the client lacks or lags far behind
    log       {"lines": [...]}: complete new lines of the job's log
    timeline  {"events": [...]}: new job events (server/timeline_api.py's shape)
    end       {"state": ...}: the job is finished (or gone); the client stops listening
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from server.job_errors import error_json
from server.job_errors import log_lines as job_log_lines
from server.metric_series import MAX_KEYS, NewPoints, points_after
from server.params import MAX_ID
from server.serialize import iso
from server.timeline_api import event_to_json
from shared import job_files
from shared.artifact_store import ArtifactStoreError, log_key, store_for
from shared.db import get_engine
from shared.job_states import is_finished
from shared.metric_catalog import finite_number
from shared.orm import Job, JobEvent
from shared.settings import Settings

STREAM_SECONDS = 30.0
POLL_SECONDS = 1.0
HEARTBEAT_SECONDS = 15.0
# How long the browser waits before reconnecting after a response ends.
RETRY_MS = 1000
# Per key and message; a client further behind gets the series again, downsampled.
MAX_POINTS_PER_KEY = 500
MAX_EVENTS_PER_MESSAGE = 200
LOG_BYTES_PER_POLL = 64_000
# A finished job's leftovers are read without sleeping, but not forever (a huge log).
MAX_DRAIN_POLLS = 20

log = logging.getLogger(__name__)

MetricKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Step = Annotated[int, Field(ge=-MAX_ID, le=MAX_ID)]


class StreamCursor(BaseModel):
    """What the client already has: a log offset, the last timeline event id, and the
    last step of each metric series. Sent as JSON, in `?cursor=` or `Last-Event-ID`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    log: int = Field(default=0, ge=0, le=MAX_ID)
    event: int = Field(default=0, ge=0, le=MAX_ID)
    metrics: dict[MetricKey, Step] = Field(default_factory=dict, max_length=MAX_KEYS)

    def token(self) -> str:
        # ASCII on one line: it travels back in an HTTP header.
        return json.dumps(self.model_dump(), separators=(",", ":"), ensure_ascii=True)

    @classmethod
    def parse(cls, token: str | None) -> StreamCursor | None:
        """The cursor in `token`, or None when it is absent or not a valid cursor."""
        if not token or len(token) > 8192:
            return None
        try:
            return cls.model_validate_json(token)
        except ValidationError:
            return None


def job_state(job: Job, admin: bool = False, settings: Settings | None = None) -> dict[str, Any]:
    """The `job` message: what the page's header and progress bar show. A member's
    error message has no server paths (server/job_errors.py)."""
    final = is_finished(job.state)
    metrics = (job.result or {}).get("metrics") or {}
    return {
        "id": job.id,
        "state": job.state,
        "final": final,
        "attempt": job.attempt,
        "max_attempts": job.max_attempts,
        "worker": job.worker,
        "cancel_requested": job.cancel_requested,
        "progress": job.progress,
        "error": error_json(job, admin, settings),
        # Scalars only: an evaluate job's confusion matrix can be large, and the page
        # fetches itself again for the full result when the job ends.
        "result": (
            {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
            if final
            else None
        ),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
    }


@dataclass
class Poll:
    """What one poll found past the cursor. `job` is None when the job is gone."""

    job: dict[str, Any] | None
    events: list[dict[str, Any]] = field(default_factory=list)
    points: NewPoints = field(default_factory=lambda: NewPoints({}, {}))
    log_lines: list[str] = field(default_factory=list)
    log_offset: int = 0

    @property
    def final(self) -> bool:
        return self.job is None or bool(self.job["final"])

    def __len__(self) -> int:
        """How many messages of new data (timeline, metrics, log) this poll makes."""
        return bool(self.events) + bool(self.points) + bool(self.log_lines)


def poll_once(
    db_url: str, settings: Settings, job_id: int, cursor: StreamCursor, admin: bool = False
) -> Poll:
    """Read what is new for the job past `cursor`, in one short session, as the viewer
    may see it (`admin`: everything; a member: no tracebacks or server paths)."""
    with Session(get_engine(db_url)) as session:
        job = session.get(Job, job_id)
        if job is None:
            return Poll(job=None, log_offset=cursor.log)
        state = job_state(job, admin, settings)
        rows = session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.id > cursor.event)
            .order_by(JobEvent.id)
            .limit(MAX_EVENTS_PER_MESSAGE)
        ).all()
        events = [event_to_json(e, admin, settings) for e in rows]
        points = points_after(session, job_id, cursor.metrics, limit=MAX_POINTS_PER_KEY)
    # The file is read after the session is closed: no connection waits on the disk.
    try:
        lines, offset = job_files.read_log_from(
            store_for(settings).source(log_key(job_id)), cursor.log, LOG_BYTES_PER_POLL
        )
    except ArtifactStoreError:
        lines, offset = [], cursor.log  # the next poll tries again

    lines = job_log_lines(lines, admin, settings)
    return Poll(job=state, events=events, points=points, log_lines=lines, log_offset=offset)


def json_safe(value: Any) -> Any:
    """`value` with every NaN or infinity as None: JSON has neither (a diverged loss is
    NaN), and a browser's JSON.parse would refuse the whole message."""
    if isinstance(value, float):
        return finite_number(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def sse_message(event: str, data: Any, cursor: StreamCursor | None = None) -> str:
    lines = []
    if cursor is not None:
        lines.append(f"id: {cursor.token()}")
    lines.append(f"event: {event}")
    # One JSON document on one line (json.dumps escapes newlines), so one data: field.
    lines.append("data: " + json.dumps(json_safe(data), separators=(",", ":"), allow_nan=False))
    return "\n".join(lines) + "\n\n"


def _series_json(series: dict[str, Any]) -> dict[str, Any]:
    return {key: s.to_json() for key, s in series.items()}


def messages_for(
    poll: Poll, cursor: StreamCursor, last_job: dict[str, Any] | None
) -> Iterator[str]:
    """The poll's messages, advancing `cursor` as each one is written."""
    if poll.job is not None and poll.job != last_job:
        yield sse_message("job", poll.job, cursor)
    if poll.events:
        cursor.event = poll.events[-1]["id"]
        yield sse_message("timeline", {"events": poll.events}, cursor)
    if poll.points:
        for key, series in {**poll.points.appended, **poll.points.reset}.items():
            if series.last_step is not None:
                cursor.metrics[key] = series.last_step
        data = {
            "append": _series_json(poll.points.appended),
            "reset": _series_json(poll.points.reset),
        }
        yield sse_message("metrics", data, cursor)
    if poll.log_lines or poll.log_offset != cursor.log:
        cursor.log = poll.log_offset
        if poll.log_lines:
            yield sse_message("log", {"lines": poll.log_lines}, cursor)


def stream_steps(
    db_url: str,
    settings: Settings,
    job_id: int,
    cursor: StreamCursor,
    *,
    duration: float = STREAM_SECONDS,
    poll_seconds: float = POLL_SECONDS,
    heartbeat_seconds: float = HEARTBEAT_SECONDS,
    clock: Callable[[], float] = time.monotonic,
    admin: bool = False,
) -> Iterator[str | float]:
    """The body of one SSE response as steps: a `str` is a message to send, a `float` the
    seconds to wait before asking for the next step. It never sleeps itself, so one
    thread can drive every stream of a process (server/stream_hub.py), or a server's
    request thread one stream (server/web/job_page.py). Holds nothing open between
    steps."""
    yield f"retry: {RETRY_MS}\n\n"
    started = last_write = clock()
    last_job: dict[str, Any] | None = None
    drain_polls = 0
    while True:
        try:
            poll = poll_once(db_url, settings, job_id, cursor, admin)
        except SQLAlchemyError:
            # The browser reconnects in RETRY_MS; a database that stays down shows as a
            # stream that keeps reconnecting, not as a thread stuck here.
            log.warning("job %s stream: database read failed", job_id, exc_info=True)
            return
        for message in messages_for(poll, cursor, last_job):
            yield message
            last_write = clock()
        last_job = poll.job or last_job
        if poll.final:
            drain_polls += 1
            if not len(poll) or drain_polls >= MAX_DRAIN_POLLS:
                state = poll.job["state"] if poll.job else None
                yield sse_message("end", {"state": state}, cursor)
                return
            continue  # more may be left (a long log): read on without sleeping
        now = clock()
        if now - started >= duration:
            return
        if now - last_write >= heartbeat_seconds:
            yield ": keep-alive\n\n"
            last_write = now
        yield min(poll_seconds, max(0.0, started + duration - now))
