"""Pages for logged-in users."""

from __future__ import annotations

from flask import g, render_template
from flask.typing import ResponseReturnValue
from flask_login import current_user, login_required
from sqlalchemy import select
from sqlalchemy.orm import joinedload

from server.access import visible_jobs
from server.database import get_session
from server.web import bp
from shared.models import Job

HOME_PAGE_JOBS = 50


@bp.before_request
def _set_user() -> None:
    # The same `g.user` the API uses, so pages and API share server/access.py.
    if current_user.is_authenticated:
        g.user = current_user._get_current_object()


@bp.get("/")
@login_required
def home() -> ResponseReturnValue:
    stmt = visible_jobs(select(Job)).options(joinedload(Job.owner)).order_by(Job.id.desc())
    jobs = get_session().scalars(stmt.limit(HOME_PAGE_JOBS)).all()
    return render_template("home.html", jobs=jobs)
