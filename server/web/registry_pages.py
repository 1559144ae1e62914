"""The "Models" pages: the registered models (/registry), one model (/registry/<name>)
with its versions, their pinned files and the stage history, the stage buttons, and the
job page's "Register model" form (/jobs/<id>/register).

Rendered from the API's JSON (server/registry_api.py) and changed through the same
rules (shared/model_registry.py), so the pages and the API refuse the same things with
the same words. Another user's model and a missing one get the same 404 page.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from flask import current_app, flash, g, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from flask_login import login_required
from flask_wtf import FlaskForm

from server.access import find_visible_job
from server.database import get_session
from server.params import MAX_ID
from server.registry_api import (
    actor_of,
    list_rows,
    model_detail_json,
    models_json,
    promote_job,
)
from server.web import bp, job_view
from shared import broker
from shared import model_registry as registry
from shared.job_states import JobState
from shared.orm import Job

log = logging.getLogger(__name__)

LIST_LIMIT = 200
NOTE_CHARS = 2000
STAGE_LABELS = {"none": "None", "staging": "Staging", "production": "Production",
                "archived": "Archived"}  # fmt: skip


class RegistryForm(FlaskForm):
    """The stage buttons and the register form: fields are read from request.form, the
    form object only checks the CSRF token."""


def _not_found(name: str) -> ResponseReturnValue:
    # The same page for a missing model and another user's.
    return render_template("registry_not_found.html", name=name), 404


@bp.app_template_global()
def register_model_form(job: Job) -> dict[str, Any] | None:
    """What the job page's "Register model" form needs, or None where the job has no
    model to register (not succeeded, a kind that makes none, its files deleted)."""
    if (
        job.kind not in registry.PROMOTABLE_KINDS
        or job.state != JobState.SUCCEEDED.value
        or job.artifacts_deleted_at is not None
        or not job.checkpoint_path
    ):
        return None
    # A name to start from: the job's, made valid.
    base = re.sub(r"[^a-z0-9._-]+", "-", (job.name or "").lower()).strip("-._")
    return {
        "default_name": (base or f"job-{job.id}")[:64],
        "stages": registry.INITIAL_STAGES,
        "labels": STAGE_LABELS,
        "model_file": registry.MODEL_FILE[job.kind],
        "pattern": registry.NAME_PATTERN.pattern,
    }


# ---------------------------------------------------------------- serving


def _quantile(buckets: list[Any], counts: list[int], q: float) -> float | None:
    total = sum(counts)
    seen = 0
    for bound, count in zip(buckets, counts, strict=False):
        seen += count
        if total and seen >= q * total:
            return float(bound) if bound != "inf" else None
    return None


def serving_summary(name: str) -> dict[str, Any] | None:
    """What the prediction servers (`trainyard serve`) published about this model
    (shared/broker.py, "serving"), summed over every serve process heard from lately:
    per version, requests, errors, latency quantiles (bucket bounds) and batch sizes.
    None when no serve process has served it; {"error": ...} when Redis cannot be read."""
    settings = current_app.config["TRAINYARD_SETTINGS"]
    if not settings.redis_url:
        return None
    client = broker.redis_client(settings.redis_url, timeout_s=1.0)
    try:
        snapshots = broker.read_serve_stats(client, name)
    except Exception as exc:  # noqa: BLE001 - the page renders without the block
        log.warning("serving stats of %s not read: %s", name, exc)
        return {"error": f"cannot reach Redis ({type(exc).__name__})", "versions": []}
    finally:
        client.close()
    fresh_s = max(30.0, 3 * settings.serve_stats_seconds)
    live = [s for s in snapshots.values() if time.time() - float(s.get("at", 0)) <= fresh_s]
    if not live:
        return None
    merged: dict[int, dict[str, Any]] = {}
    for snap in live:
        for number, v in snap.get("versions", {}).items():
            m = merged.setdefault(int(number), {"requests": 0, "errors": 0, "counts": None,
                                                "buckets": None, "sizes": {}})  # fmt: skip
            m["requests"] += v["requests"]
            m["errors"] += sum(v["errors"].values())
            lat = v["latency_ms"]
            m["buckets"] = lat["buckets"]
            m["counts"] = [a + b for a, b in zip(m["counts"] or [0] * len(lat["counts"]),
                                                 lat["counts"], strict=True)]  # fmt: skip
            for size, n in v["batches"]["sizes"].items():
                m["sizes"][int(size)] = m["sizes"].get(int(size), 0) + n
    versions = []
    for number, m in sorted(merged.items(), reverse=True):
        passes = sum(m["sizes"].values())
        versions.append({
            "version": number,
            "requests": m["requests"],
            "errors": m["errors"],
            "p50_le": _quantile(m["buckets"], m["counts"], 0.5),
            "p95_le": _quantile(m["buckets"], m["counts"], 0.95),
            "forward_passes": passes,
            "mean_batch": round(sum(k * n for k, n in m["sizes"].items()) / passes, 1)
            if passes else None,
            "max_batch": max(m["sizes"]) if m["sizes"] else None,
        })  # fmt: skip
    return {"instances": len(live), "versions": versions, "error": None}


# ---------------------------------------------------------------- pages


@bp.get("/registry")
@login_required
def registry_list() -> ResponseReturnValue:
    """The user's models, newest first (an admin's page lists everyone's)."""
    rows = list_rows(g.user, g.user.is_admin, LIST_LIMIT)
    return render_template(
        "registry.html",
        models=models_json(get_session(), rows),
        is_admin=g.user.is_admin,
        limit=LIST_LIMIT,
        labels=STAGE_LABELS,
    )


@bp.get("/registry/<name>")
@login_required
def registry_model(name: str) -> ResponseReturnValue:
    session = get_session()
    model = registry.visible_model(session, name, actor_of(g.user))
    if model is None:
        return _not_found(name)
    data = model_detail_json(session, model)
    for v in data["versions"]:
        v["size"] = job_view.file_size(v["size_bytes"])
        for f in v["files"]:
            f["size"] = job_view.file_size(f["size_bytes"])
    return render_template(
        "registry_model.html",
        model=data,
        stages=registry.STAGES,
        labels=STAGE_LABELS,
        serving=serving_summary(model.name),
    )


@bp.post("/registry/<name>/versions/<int:version>/stage")
@login_required
def registry_stage(name: str, version: int) -> ResponseReturnValue:
    session = get_session()
    model = registry.visible_model(session, name, actor_of(g.user))
    row = registry.find_version(session, model, version) if model else None
    if model is None or row is None:
        return _not_found(name)
    back = redirect(url_for("web.registry_model", name=model.name), 303)
    if not RegistryForm().validate_on_submit():
        flash("The form had expired (no valid security token); try again.", "error")
        return back
    stage = request.form.get("stage", "")
    note = request.form.get("note", "").strip()[:NOTE_CHARS] or None
    before = row.stage
    try:
        moved = registry.move_stage(session, row.id, stage, actor_of(g.user), note)
    except registry.RegistryError as exc:
        flash(f"Could not move {name} version {version}: {exc.message}.", "error")
        return back
    if moved.stage == before:
        flash(f"{name} version {version} is already in {before}.", "info")
    else:
        also = " The version that was in production is archived." if stage == "production" else ""
        flash(f"{name} version {version}: {before} → {moved.stage}.{also}", "info")
    return back


@bp.post("/jobs/<int:job_id>/register")
@login_required
def job_register(job_id: int) -> ResponseReturnValue:
    """The job page's "Register model" form."""
    job = find_visible_job(job_id) if job_id <= MAX_ID else None
    if job is None:
        return render_template("job_not_found.html", job_id=job_id), 404
    back = redirect(url_for("web.job_detail", job_id=job_id), 303)
    if not RegistryForm().validate_on_submit():
        flash("The form had expired (no valid security token); try again.", "error")
        return back
    name = request.form.get("name", "").strip()
    description = request.form.get("description", "").strip()[:NOTE_CHARS] or None
    try:
        version = promote_job(g.user, name, job.id, stage=request.form.get("stage", "none"),
                              description=description)  # fmt: skip
    except registry.RegistryError as exc:
        flash(f"Could not register job #{job_id}'s model: {exc.message}.", "error")
        return back
    flash(f"Registered job #{job_id}'s model as {name} version {version.version} "
          f"({version.stage}).", "info")  # fmt: skip
    return redirect(url_for("web.registry_model", name=name), 303)
