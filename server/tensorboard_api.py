"""A job's metrics as TensorBoard files: GET /api/v1/jobs/{id}/tensorboard.

Answers a .tar.gz of the job's run directory (shared/tensorboard_export.py) built from
the stored metric points at full resolution, with the wall time each point was logged
at (the charts' JSON has no wall times: it is downsampled for drawing). Owned like the
job's other endpoints: someone else's job reads as missing. The metrics outlive the
job's files, so the export works after its artifacts were deleted.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from flask import Blueprint, current_app, send_file
from flask.typing import ResponseReturnValue
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.access import visible_job
from server.auth import authenticate_api_request
from server.database import get_session
from server.openapi import operation
from server.params import NoQuery, check_path_ids, parse_query
from shared.orm import Job, MetricPoint
from shared.settings import Settings

if TYPE_CHECKING:
    from shared.tensorboard_export import RunData, ScalarPoint

bp = Blueprint("tensorboard_v1", __name__, url_prefix="/api/v1")
bp.before_request(authenticate_api_request)
bp.before_request(check_path_ids)

# Rows fetched per round trip while streaming a long series.
_BATCH_ROWS = 10_000
# Above this the archive goes to a temporary file instead of memory.
_SPOOL_BYTES = 8 << 20

_TAR_RESPONSE = {
    "200": {
        "description": "The job's run directory as a .tar.gz: extract it into a log "
        "directory and run `tensorboard --logdir` on that",
        "headers": {
            "Content-Disposition": {
                "description": "attachment; filename=job-<id>-<name>.tar.gz",
                "schema": {"type": "string"},
            }
        },
        "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def _timestamp(at: datetime | None) -> float | None:
    # Stored as naive UTC (shared.db.utcnow).
    return None if at is None else at.replace(tzinfo=timezone.utc).timestamp()


def _thinned(rows: Iterable[ScalarPoint], stride: int) -> list[ScalarPoint]:
    """One point per step (a resumed attempt that logged a step again: its point wins),
    then every `stride`-th of those and always the last, without holding the rest."""
    kept: list[ScalarPoint] = []
    pending: ScalarPoint | None = None
    index = 0
    for step, value, wall_time in rows:
        if pending is not None and pending[0] != step:
            if index % stride == 0:
                kept.append(pending)
            index += 1
        pending = (step, value, wall_time)
    if pending is not None:
        kept.append(pending)
    return kept


def load_points(session: Session, job_id: int, max_points: int) -> dict[str, list[ScalarPoint]]:
    """Each key's (step, value, wall time) in step order, at most about `max_points`."""
    counts = session.execute(
        select(MetricPoint.key, func.count())
        .where(MetricPoint.job_id == job_id)
        .group_by(MetricPoint.key)
    ).all()
    series = {}
    for key, count in counts:
        rows = session.execute(
            select(MetricPoint.step, MetricPoint.value, MetricPoint.wall_time)
            .where(MetricPoint.job_id == job_id, MetricPoint.key == key)
            .order_by(MetricPoint.step, MetricPoint.id)
            .execution_options(yield_per=_BATCH_ROWS)
        )
        # The count includes repeated steps, so the thinned series may come out shorter.
        stride = max(1, -(-count // max_points))
        series[key] = _thinned(((r[0], r[1], r[2]) for r in rows), stride)
    return series


def run_data(session: Session, job: Job, max_points: int) -> RunData:
    """The job as shared/tensorboard_export.py writes it."""
    from shared.tensorboard_export import RunData

    return RunData(
        job_id=job.id,
        name=job.name,
        state=job.state,
        spec=job.spec or {},
        result=job.result,
        created_at=_timestamp(job.created_at) or 0.0,
        finished_at=_timestamp(job.finished_at),
        series=load_points(session, job.id, max_points),
    )


@bp.get("/jobs/<int:job_id>/tensorboard")
@operation(
    tag="jobs",
    ok={200: None},
    errors=(404,),
    validate=False,  # a binary body; spectree would try to read it as JSON
    extra={"responses": _TAR_RESPONSE},
)
def job_tensorboard(job_id: int) -> ResponseReturnValue:
    """A job's metrics as TensorBoard event files.

    Scalars at their steps and wall times (`train/loss`, `val/accuracy`, `system/...`),
    final metrics as `final/<key>`, and the JobSpec as HParams.
    """
    # Imported here: the protobuf modules take half a second, which no other request pays.
    from shared.tensorboard_export import tar_run, write_run

    parse_query(NoQuery)
    job = visible_job(job_id)
    settings: Settings = current_app.config["TRAINYARD_SETTINGS"]
    run = run_data(get_session(), job, settings.tensorboard_max_points)
    # Not a `with`: the response closes it once sent.
    archive = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)  # noqa: SIM115
    with tempfile.TemporaryDirectory(prefix="trainyard-tb-") as workdir:
        run_dir = write_run(run, Path(workdir))
        tar_run(run_dir, archive, run.finished_at or run.created_at)
    archive.seek(0)
    return send_file(
        archive,  # type: ignore[arg-type]
        mimetype="application/gzip",
        as_attachment=True,
        download_name=f"{run.dirname}.tar.gz",
        max_age=0,
    )
