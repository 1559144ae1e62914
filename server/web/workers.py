"""The workers and queues page: who is online, queue depths, and why jobs wait.

Rendered on the server from the same data GET /api/v1/workers and /queues return
(server/cluster_status.py); static/js/workers.js then refreshes it from those endpoints.
"""

from __future__ import annotations

from datetime import datetime

from flask import current_app, g, render_template
from flask.typing import ResponseReturnValue
from flask_login import login_required

from server.cluster_status import queues_json, read_cluster, workers_json
from server.database import get_session
from server.web import bp
from shared.db import utcnow

REFRESH_S = 5


def seconds_since(stamp: str | None, now: datetime) -> float | None:
    """Seconds from an API timestamp ("2026-01-02T03:04:05.678Z") to `now` (naive UTC)."""
    if not stamp:
        return None
    then = datetime.fromisoformat(stamp.removesuffix("Z"))
    return max((now - then).total_seconds(), 0.0)


@bp.get("/workers")
@login_required
def workers() -> ResponseReturnValue:
    session = get_session()
    settings = current_app.config["TRAINYARD_SETTINGS"]
    cluster = read_cluster(settings.redis_url)
    now = utcnow()
    return render_template(
        "workers.html",
        workers=workers_json(session, cluster, g.user),
        queues=queues_json(session, cluster, g.user, settings.aging_points_per_hour),
        is_admin=g.user.is_admin,
        refresh_s=REFRESH_S,
        since=lambda stamp: seconds_since(stamp, now),
    )
