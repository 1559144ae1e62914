"""The jobs page at "/": every job the user may see, filtered, sorted, keyset-paginated.

The filters are a GET form, so a filtered view is a URL to bookmark or share. The query
is server/job_query.py's, the one GET /api/v1/jobs runs, and the page's parameters are
that endpoint's (less `limit` and `before`), so static/js/jobs.js refreshes the visible
rows by asking the API the same question.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import g, render_template, request, url_for
from flask.typing import ResponseReturnValue
from flask_login import current_user, login_required
from pydantic import ValidationError
from sqlalchemy import select

from server import job_query
from server.database import get_session
from server.errors import ApiError
from server.job_query import JobFilters, PageCursor, SortName
from server.params import JobListQuery
from server.web import bp
from server.web.filters import duration
from shared.dataset_catalog import DATASETS
from shared.job_states import ALL_STATES
from shared.metric_catalog import final_metrics, key_metric
from shared.model_catalog import MODELS
from shared.orm import Job, User
from shared.spec import JOB_KINDS

PAGE_SIZE = 50
# The page's query parameters: the API's list parameters but the page size and the
# legacy `before` cursor (the page hands out opaque cursors only).
PAGE_PARAMS = ("state", "kind", "model", "dataset", "tag", "owner", "q", "sort", "cursor")
FILTER_PARAMS = ("state", "kind", "model", "dataset", "tag", "owner", "q")
FIELD_LABELS = {"q": "Name contains", "state": "State", "kind": "Kind", "model": "Model",
                "dataset": "Dataset", "tag": "Tag", "owner": "Owner", "sort": "Sort"}  # fmt: skip
SORT_LABELS: dict[str, str] = {"newest": "Newest first", "oldest": "Oldest first", "name": "Name"}
# Link texts for the previous and next page, per order.
PAGER_LABELS: dict[str, tuple[str, str]] = {
    "newest": ("Newer", "Older"),
    "oldest": ("Older", "Newer"),
    "name": ("Previous", "Next"),
}
ACTIVE_STATES = ("queued", "running")


@bp.before_request
def _set_user() -> None:
    # The same `g.user` the API uses, so pages and API share server/access.py.
    if current_user.is_authenticated:
        g.user = current_user._get_current_object()


@dataclass(frozen=True)
class JobRow:
    """What one table row shows, worked out here so the template only lays it out."""

    job: Job
    tags: list[str]
    metric: tuple[str, float] | None
    progress: str | None

    @property
    def active(self) -> bool:
        return self.job.state in ACTIVE_STATES


def progress_text(job: Job) -> str | None:
    """ "epoch 3/10 · 42%" for a running job; what a queued one is waiting for."""
    if job.cancel_requested and job.state in ACTIVE_STATES:
        return "cancelling"
    if job.state == "queued":
        return f"retry {job.attempt + 1} of {job.max_attempts}" if job.attempt else None
    if job.state != "running":
        return None
    progress = job.progress or {}
    parts = []
    if progress.get("epochs"):
        parts.append(f"epoch {progress.get('epoch', 0)}/{progress['epochs']}")
    fraction = progress.get("fraction")
    if isinstance(fraction, (int, float)):
        parts.append(f"{fraction:.0%}")
    eta = progress.get("eta_s")
    if isinstance(eta, (int, float)):
        parts.append(f"ETA {duration(eta)}")
    # No-break spaces inside each part, so a narrow cell wraps between parts only.
    return " · ".join(p.replace(" ", "\u00a0") for p in parts) or "starting"


def job_row(job: Job) -> JobRow:
    tags = job.spec.get("tags") if isinstance(job.spec, dict) else None
    return JobRow(
        job=job,
        tags=[t for t in tags if isinstance(t, str)] if isinstance(tags, list) else [],
        metric=key_metric(job.kind, final_metrics(job.result)),
        progress=progress_text(job),
    )


def _page_query() -> tuple[JobListQuery, dict[str, str]]:
    """The page's parameters, validated like the API's; empty form fields are unset.

    A bad parameter (only a hand-edited URL has one) is left out and reported, so the
    page still shows the jobs the other filters select.
    """
    args = {k: v for k in PAGE_PARAMS if (v := request.args.get(k, "").strip())}
    if not g.user.is_admin:
        args.pop("owner", None)  # members see only their own jobs anyway
    errors: dict[str, str] = {}
    for _ in range(len(PAGE_PARAMS) + 1):  # each round drops at least one parameter
        try:
            return JobListQuery.model_validate({**args, "limit": PAGE_SIZE}), errors
        except ValidationError as exc:
            for err in exc.errors(include_url=False):
                name = str(err["loc"][0]) if err["loc"] else "query"
                errors[name] = err["msg"]
                args.pop(name, None)
    return JobListQuery(limit=PAGE_SIZE), errors


def _page_url(query: JobListQuery, **changes: Any) -> str:
    params = {k: getattr(query, k) for k in PAGE_PARAMS}
    params.update(changes)
    if params.get("sort") == "newest":
        params["sort"] = None
    return url_for("web.home", **{k: v for k, v in params.items() if v})


def _owner_choices() -> list[str]:
    if not g.user.is_admin:
        return []
    return list(get_session().scalars(select(User.username).order_by(User.username)))


@bp.get("/")
@login_required
def home() -> ResponseReturnValue:
    query, errors = _page_query()
    pager: dict[str, str | None] = {"prev": None, "next": None, "first": None}
    status = 400 if errors else 200
    try:
        cursor = PageCursor.decode(query.cursor, query.sort) if query.cursor else None
    except ApiError as exc:
        errors, cursor, status = {**errors, **exc.fields}, None, 400
        query = query.model_copy(update={"cursor": None})
    filters = JobFilters(**{k: getattr(query, k) for k in FILTER_PARAMS})
    page = job_query.list_jobs(filters, query.sort, cursor, PAGE_SIZE)
    rows = [job_row(j) for j in page.jobs]
    if page.prev is not None:
        pager["prev"] = _page_url(query, cursor=page.prev.encode())
    if page.next is not None:
        pager["next"] = _page_url(query, cursor=page.next.encode())
    if query.cursor and not rows:
        # Past the end (or the rows after the cursor are gone): a way back.
        pager["first"] = _page_url(query, cursor=None)
    sort: SortName = query.sort
    filtered = any(getattr(query, k) for k in FILTER_PARAMS)
    shown_query = query

    def tag_url(tag: str) -> str:
        return _page_url(shown_query, tag=tag, cursor=None)

    return render_template(
        "jobs.html",
        query=query,
        rows=rows,
        errors=errors,
        pager=pager,
        pager_labels=PAGER_LABELS[sort],
        sort_labels=SORT_LABELS,
        field_labels=FIELD_LABELS,
        sort_url={s: _page_url(query, sort=s, cursor=None) for s in SORT_LABELS},
        filtered=filtered,
        clear_url=_page_url(JobListQuery(limit=PAGE_SIZE, sort=sort)),
        states=ALL_STATES,
        kinds=JOB_KINDS,
        models=sorted(MODELS),
        datasets=sorted(DATASETS),
        owners=_owner_choices(),
        is_admin=g.user.is_admin,
        polling=any(r.active for r in rows),
        page_tags=sorted({t for r in rows for t in r.tags}),
        tag_url=tag_url,
    ), status
