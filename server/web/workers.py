"""The workers and queues page: who is online, queue depths, and why jobs wait.

Rendered on the server from the same data GET /api/v1/workers and /queues return
(server/cluster_status.py); static/js/workers.js then refreshes it from those endpoints.
Admins also get a node's buttons: cordon, drain, drain now, uncordon, clear the crash
guard (POST /workers/<node>/<action>, CSRF-protected like every form).
"""

from __future__ import annotations

from datetime import datetime

from flask import abort, current_app, flash, g, redirect, render_template, url_for
from flask.typing import ResponseReturnValue
from flask_login import login_required

from server.cluster_status import queues_json, read_cluster, workers_json
from server.database import get_session
from server.web import bp
from shared.db import utcnow
from shared.worker_nodes import check_node_name, clear_guard, set_control

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
    cluster = read_cluster(settings.redis_url, keep_lost_s=settings.lost_worker_hours * 3600)
    now = utcnow()
    return render_template(
        "workers.html",
        workers=workers_json(session, cluster, g.user, settings.stuck_consumer_seconds),
        queues=queues_json(session, cluster, g.user, settings.aging_points_per_hour),
        is_admin=g.user.is_admin,
        refresh_s=REFRESH_S,
        since=lambda stamp: seconds_since(stamp, now),
    )


# What the admin buttons on a node card do (shared/worker_nodes.py), and what the flash
# message then says.
_ACTIONS = {
    "cordon": "cordoned: it takes no new jobs; the jobs it runs go on",
    "drain": "draining: it takes no new jobs and its running jobs finish",
    "drain_now": "drained now: its running jobs checkpoint and go back to the queue",
    "uncordon": "uncordoned: it takes jobs again",
    "clear": "crash guard cleared: its stopped slots take jobs again",
}


@bp.post("/workers/<node>/<action>")
@login_required
def worker_action(node: str, action: str) -> ResponseReturnValue:
    """An admin's button on a node card: cordon, drain, drain now, uncordon, clear."""
    if not g.user.is_admin:
        abort(403)
    if action not in _ACTIONS:
        abort(404)
    try:
        node = check_node_name(node)
    except ValueError as exc:
        flash(f"Invalid node name: {exc}.", "error")
        return redirect(url_for("web.workers"), 303)
    session = get_session()
    if action == "clear":
        clear_guard(session, node)
    else:
        set_control(session, node, action, g.user.username)  # type: ignore[arg-type]
    session.commit()
    flash(f"Node {node} {_ACTIONS[action]}.", "info")
    return redirect(url_for("web.workers"), 303)
