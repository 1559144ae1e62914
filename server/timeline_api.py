"""A job's timeline over the API: GET /api/v1/jobs/{id}/events.

The same entries the job page shows (and its live stream sends): claimed by which
worker and attempt, resumed from a checkpoint, requeued and why, cancel requested,
finished. Rows come from shared/job_events.py, written in the transaction of each
transition, so the timeline never shows one that was rolled back.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from flask import Blueprint, jsonify
from flask.typing import ResponseReturnValue
from pydantic import Field
from sqlalchemy import select

from server.access import visible_job
from server.api_schemas import ResponseModel
from server.auth import authenticate_api_request
from server.database import get_session
from server.job_errors import shown_message, viewer_is_admin
from server.openapi import operation
from server.params import MAX_ID, QueryModel, check_path_ids, parse_query
from server.serialize import iso
from shared.job_events import EVENT_KINDS
from shared.orm import JobEvent
from shared.settings import Settings

bp = Blueprint("timeline_v1", __name__, url_prefix="/api/v1")
bp.before_request(authenticate_api_request)
bp.before_request(check_path_ids)


class TimelineQuery(QueryModel):
    after: int = Field(
        default=0, ge=0, le=MAX_ID, description="only events with a larger id (the last you have)"
    )
    limit: int = Field(default=500, ge=1, le=1000, description="page size")


class TimelineEvent(ResponseModel):
    id: int = Field(description="increases with every event; pass the last one as `after`")
    at: datetime
    kind: str = Field(
        description="claimed, resumed, requeued, handed_back, republished, cancel_requested, "
        "succeeded, failed or cancelled"
    )
    label: str = Field(description="the kind in words, as the web UI shows it")
    attempt: int | None = Field(description="the attempt it happened to")
    worker: str | None = Field(description="host:pid of the worker, for claims")
    message: str | None = Field(description="the reason (requeued, failed) or checkpoint")


class JobTimeline(ResponseModel):
    job_id: int
    events: list[TimelineEvent] = Field(description="oldest first")
    next_after: int | None = Field(
        description="pass as `after` for the next page; null on the last page"
    )


def event_label(kind: str) -> str:
    return EVENT_KINDS.get(kind, kind.replace("_", " "))


def event_to_json(
    event: JobEvent, admin: bool | None = None, settings: Settings | None = None
) -> dict[str, Any]:
    """`admin`: whether the viewer sees messages with server paths (default: the
    request's user; server/job_errors.py). `settings` outside a request (the stream)."""
    if admin is None:
        admin = viewer_is_admin()
    return {
        "id": event.id,
        "at": iso(event.at),
        "kind": event.kind,
        "label": event_label(event.kind),
        "attempt": event.attempt,
        "worker": event.worker,
        "message": event.message if admin else shown_message(event.message, settings),
    }


@bp.get("/jobs/<int:job_id>/events")
@operation(tag="jobs", query=TimelineQuery, ok={200: JobTimeline}, errors=(404,))
def job_timeline(job_id: int) -> ResponseReturnValue:
    """A job's timeline: claims, resumes, requeues, cancel requests, the end."""
    query = parse_query(TimelineQuery)
    job = visible_job(job_id)
    rows = (
        get_session()
        .scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job.id, JobEvent.id > query.after)
            .order_by(JobEvent.id)
            .limit(query.limit + 1)
        )
        .all()
    )
    page = rows[: query.limit]
    next_after = page[-1].id if len(rows) > query.limit else None
    return jsonify(
        {"job_id": job.id, "events": [event_to_json(e) for e in page], "next_after": next_after}
    )
