"""The compare page: several jobs side by side.

GET /compare?ids=3,5,8[&metric=val_loss] shows their curves for one metric overlaid
(static/js/compare.js draws them with uPlot from GET /api/v1/jobs/<id>/metrics), the
hyperparameters that differ between their specs, and their final metrics with the best
of each marked.

Every id must be a job the user may see: one that is missing or someone else's makes
the whole page a 404 that reads the same either way. Dropping it and comparing the rest
would show a link's recipient a different, incomplete comparison without a word, and a
notice naming the dropped id would tell apart "exists, not yours" from "no such job".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from flask import g, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from flask_login import login_required
from sqlalchemy import select
from sqlalchemy.orm import joinedload

from server.access import visible_jobs
from server.database import get_session
from server.metric_series import metric_keys
from server.params import MAX_ID
from server.web import bp
from shared.metric_catalog import (
    KEY_METRIC_KEYS,
    best_positions,
    final_metrics,
    is_system,
    metric_info,
    sort_key,
)
from shared.orm import Job

MAX_JOBS = 10
# Spec fields that are not hyperparameters: the name heads each column already.
NOT_COMPARED = {"name"}
_ID_SPLIT = re.compile(r"[\s,]+")


class CompareError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def parse_ids(values: list[str]) -> list[int]:
    """Job ids from `ids=1,2,3` and/or repeated `ids=` (the jobs page's checkboxes),
    in order, each once."""
    ids: list[int] = []
    for value in values:
        for token in _ID_SPLIT.split(value.strip()):
            if not token:
                continue
            token = token.removeprefix("#")
            if not token.isdigit() or not 1 <= int(token) <= MAX_ID:
                raise CompareError(400, f"{token[:20]!r} is not a job id")
            if int(token) not in ids:
                ids.append(int(token))
    return ids


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A spec as dotted keys: {"optimizer": {"lr": 0.1}} -> {"optimizer.lr": 0.1}."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def show_value(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ", ".join(value) if value else "—"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(", ", ": ")) if value else "—"
    return str(value)


@dataclass(frozen=True)
class ParamRow:
    key: str
    values: list[str]


@dataclass(frozen=True)
class MetricRow:
    key: str
    values: list[float | None]
    best: set[int]
    direction: str | None
    label: str


def param_rows(jobs: list[Job]) -> tuple[list[ParamRow], list[ParamRow]]:
    """(rows that differ between the jobs, rows the same for all), by key."""
    flat = [{k: v for k, v in flatten(j.spec).items() if k not in NOT_COMPARED} for j in jobs]
    keys = sorted(set().union(*flat))
    differ, same = [], []
    for key in keys:
        raw = [f.get(key) for f in flat]
        row = ParamRow(key, [show_value(v) for v in raw])
        # Compared as JSON, so 0.001 and 1e-3 (one float) agree and a missing key does not.
        encoded = {json.dumps(f[key], sort_keys=True) if key in f else None for f in flat}
        (differ if len(encoded) > 1 else same).append(row)
    return differ, same


def metric_rows(jobs: list[Job]) -> list[MetricRow]:
    finals = [final_metrics(j.result) for j in jobs]
    rows = []
    for key in sorted(set().union(*finals), key=sort_key):
        values: list[float | None] = [f.get(key) for f in finals]
        info = metric_info(key)
        rows.append(MetricRow(key, values, best_positions(key, values), info.direction, info.label))
    return rows


def _canonical(ids: list[int], metric: str | None) -> str:
    params: dict[str, str] = {"ids": ",".join(str(i) for i in ids)} if ids else {}
    if metric:
        params["metric"] = metric
    return url_for("web.compare", **params)


def _load(ids: list[int]) -> list[Job]:
    stmt = visible_jobs(select(Job).where(Job.id.in_(ids))).options(joinedload(Job.owner))
    found = {j.id: j for j in get_session().scalars(stmt)}
    missing = [i for i in ids if i not in found]
    if missing:
        # The same words for a job that does not exist and one that is not the user's.
        names = ", ".join(str(i) for i in missing)
        raise CompareError(
            404,
            f"Job {names} does not exist." if len(missing) == 1 else f"Jobs {names} do not exist.",
        )
    return [found[i] for i in ids]


def _chooser_keys(jobs: list[Job]) -> list[str]:
    session = get_session()
    keys: set[str] = set()
    for job in jobs:
        keys.update(metric_keys(session, job.id))
    return sorted(keys, key=sort_key)


def default_metric(keys: list[str]) -> str | None:
    """The chart's metric when the URL names none: the key metric the jobs logged (a
    train job's; evaluations log no series), else the first in display order that is
    not system telemetry (how busy the hardware was is not what a comparison is for)."""
    results = [k for k in keys if not is_system(k)]
    return next((k for k in KEY_METRIC_KEYS["train"] if k in keys), results[0] if results else None)


@bp.get("/compare")
@login_required
def compare() -> ResponseReturnValue:
    metric = request.args.get("metric", "").strip() or None
    try:
        ids = parse_ids(request.args.getlist("ids") + request.args.getlist("add"))
    except CompareError as exc:
        return _error_page(exc, [])
    if len(request.args.getlist("ids")) > 1 or "add" in request.args:
        # The checkbox form and the add form: redirect to the one short, shareable URL.
        return redirect(_canonical(ids, metric))
    if len(ids) > MAX_JOBS:
        return _error_page(
            CompareError(400, f"Compare at most {MAX_JOBS} jobs at once ({len(ids)} given)."),
            ids,
        )
    try:
        jobs = _load(ids)
    except CompareError as exc:
        return _error_page(exc, [])
    keys = _chooser_keys(jobs) if jobs else []
    if metric not in keys:
        metric = default_metric(keys)
    differ, same = param_rows(jobs) if jobs else ([], [])
    return render_template(
        "compare.html",
        jobs=jobs,
        ids=ids,
        metric=metric,
        metric_keys=keys,
        differ=differ,
        same=same,
        metrics=metric_rows(jobs) if jobs else [],
        remove_url={j.id: _canonical([i for i in ids if i != j.id], metric) for j in jobs},
        is_admin=g.user.is_admin,
        max_jobs=MAX_JOBS,
        error=None,
    )


def _error_page(exc: CompareError, ids: list[int]) -> ResponseReturnValue:
    return (
        render_template(
            "compare.html",
            jobs=[],
            ids=ids,
            metric=None,
            metric_keys=[],
            differ=[],
            same=[],
            metrics=[],
            remove_url={},
            is_admin=g.user.is_admin,
            max_jobs=MAX_JOBS,
            error=exc,
        ),
        exc.status,
    )
