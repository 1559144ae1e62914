"""The "Run your code" page: GET/POST /submit/script, a script job from the browser.

A plain form (it works without JS): the code bundle rides along as the multipart field
`file` and is stored by the bundle API's own view (server/bundles_api.py: one place for
the archive rules, the size limit and storage), or an earlier bundle is picked; the
other inputs become a ScriptSpec that goes through server/submission.py like every job.
Problems come back next to the input they name. Users without `can_run_code` get the
page with a 403 that names the permission instead of a form.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from typing import Any

from flask import current_app, g, redirect, render_template, request
from flask.typing import ResponseReturnValue
from flask_login import current_user, login_required
from flask_wtf import FlaskForm
from sqlalchemy import select
from werkzeug.exceptions import RequestEntityTooLarge

from server import bundles_api, submission
from server.access import find_visible_job
from server.database import get_session
from server.errors import ApiError
from server.params import MAX_ID
from server.web import bp
from shared.code_bundle import BundleLimits
from shared.dataset_cache import DATASET_DIRS
from shared.orm import CodeBundle

# The page lists this many of the user's newest bundles to pick from.
BUNDLE_CHOICES = 50
# The inputs, in page order, each with the spec field its errors are reported under.
INPUTS = ("file", "bundle_id", "entry", "args", "params", "dataset", "gpus", "memory_gb",
          "priority", "max_runtime_s", "name", "tags")  # fmt: skip


class ScriptCsrf(FlaskForm):
    """Only the CSRF token; the inputs are read from the request."""


@dataclass
class ScriptPage:
    values: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # input name -> message
    message: str | None = None
    stored: str | None = None  # "Stored project.tar.gz as bundle 3."


def _limits() -> BundleLimits:
    return BundleLimits.from_settings(current_app.config["TRAINYARD_SETTINGS"])


def _use_session_user() -> None:
    if "user" not in g:
        g.user = current_user._get_current_object()


def _bundles() -> list[CodeBundle]:
    return list(
        get_session().scalars(
            select(CodeBundle)
            .where(CodeBundle.owner_id == g.user.id)
            .order_by(CodeBundle.id.desc())
            .limit(BUNDLE_CHOICES)
        )
    )


def _render(page: ScriptPage, status: int = 200) -> ResponseReturnValue:
    allowed = g.user.may_run_code
    html = render_template(
        "script_submit.html",
        page=page,
        allowed=allowed,
        bundles=_bundles() if allowed else [],
        datasets=list(DATASET_DIRS),
        inputs=INPUTS,
        max_bundle_bytes=_limits().max_archive_bytes,
    )
    return html, status


@bp.get("/submit/script")
@login_required
def script_submit_page() -> ResponseReturnValue:
    _use_session_user()
    if not g.user.may_run_code:
        return _render(ScriptPage(), status=403)
    clone = request.args.get("clone")
    if clone is None:
        return _render(ScriptPage(values={"entry": "train.py", "priority": "5"}))
    job = find_visible_job(int(clone)) if clone.isdigit() and 0 < int(clone) <= MAX_ID else None
    if job is None or job.kind != "script":
        # Someone else's job reads exactly like one that does not exist.
        page = ScriptPage(values={"entry": "train.py", "priority": "5"})
        page.message = f"Job {clone} is not a script job of yours."
        return _render(page, status=404)
    page = ScriptPage(values=values_from_spec(job.spec))
    page.message = f"Every input is filled from job {job.id}; submitting creates a new job."
    return _render(page)


def values_from_spec(spec: dict[str, Any]) -> dict[str, str]:
    """The inputs of a stored script spec (clone and edit)."""
    resources = spec.get("resources") or {}
    dataset = spec.get("dataset") or {}
    values = {
        "bundle_id": str(spec.get("bundle_id", "")),
        "entry": str(spec.get("entry", "")),
        "args": shlex.join(str(a) for a in spec.get("args") or []),
        "params": json.dumps(spec["params"]) if spec.get("params") else "",
        "dataset": str(dataset.get("name") or ""),
        "gpus": str(resources["gpus"]) if resources.get("gpus") else "",
        "memory_gb": f"{resources['memory_gb']:g}" if resources.get("memory_gb") else "",
        "priority": str(spec.get("priority", 5)),
        "max_runtime_s": str(spec.get("max_runtime_s") or ""),
        "name": str(spec.get("name") or ""),
        "tags": ", ".join(str(t) for t in spec.get("tags") or []),
    }
    return values


@bp.post("/submit/script")
@login_required
def script_submit_form() -> ResponseReturnValue:
    _use_session_user()
    if not g.user.may_run_code:
        return _render(ScriptPage(), status=403)
    request.max_content_length = _limits().max_archive_bytes + bundles_api.MULTIPART_SLACK
    try:
        values = {name: request.form.get(name, "").strip() for name in INPUTS if name != "file"}
    except RequestEntityTooLarge:
        limit = f"{_limits().max_archive_bytes:,}"
        page = ScriptPage(message=f"The form with its file is larger than {limit} bytes.")
        return _render(page, status=413)
    page = ScriptPage(values=values)
    if not ScriptCsrf().validate_on_submit():
        page.message = "The form expired or was not sent from this page; check it and submit again."
        return _render(page, status=400)
    _store_bundle(page)
    spec = _spec(page)
    if page.errors or spec is None:
        return _render(page, status=422)
    try:
        # Checked against the catalogues (the dataset's files are there) like the API's.
        job = submission.submit(submission.parse_job_spec(spec), g.user)
    except ApiError as exc:
        page.errors.update(_by_input(exc.fields))
        if not exc.fields:
            page.message = exc.message
        return _render(page, status=exc.status)
    return redirect(f"/jobs/{job.id}", code=303)


def _store_bundle(page: ScriptPage) -> None:
    """A bundle sent with the form: stored by the API's view; its id fills bundle_id."""
    file = request.files.get("file")
    if file is None or not file.filename:
        if not page.values.get("bundle_id"):
            page.errors["file"] = "choose a .tar.gz or .zip of your code, or one uploaded before"
        return
    try:
        response = bundles_api.create_bundle()
    except ApiError as exc:
        page.errors["file"] = exc.fields.get("file") or exc.message
        return
    body = response[0].get_json()  # type: ignore[index]
    page.values["bundle_id"] = str(body["id"])
    page.stored = f"Stored {body['filename']} as bundle {body['id']} ({body['file_count']} files)."


def _spec(page: ScriptPage) -> dict[str, Any] | None:
    """The ScriptSpec the inputs describe; problems of the inputs themselves go to
    page.errors (the spec's own checks come after)."""
    v = page.values
    spec: dict[str, Any] = {"kind": "script", "entry": v.get("entry", "")}
    for name in ("bundle_id", "gpus", "priority", "max_runtime_s"):
        if v.get(name):
            if not v[name].isdigit():
                page.errors[name] = "must be a whole number"
            else:
                spec[name if name != "gpus" else "_gpus"] = int(v[name])
    resources: dict[str, Any] = {}
    if "_gpus" in spec:
        resources["gpus"] = spec.pop("_gpus")
    if v.get("memory_gb"):
        try:
            resources["memory_gb"] = float(v["memory_gb"])
        except ValueError:
            page.errors["memory_gb"] = "must be a number of GB"
    if resources:
        spec["resources"] = resources
    try:
        spec["args"] = shlex.split(v.get("args", ""))
    except ValueError as exc:
        page.errors["args"] = f"cannot be split as a shell would: {exc}"
    if v.get("params"):
        try:
            spec["params"] = json.loads(v["params"])
        except ValueError as exc:
            page.errors["params"] = f"is not JSON: {exc}"
    if v.get("dataset"):
        spec["dataset"] = {"name": v["dataset"]}
    if v.get("name"):
        spec["name"] = v["name"]
    if v.get("tags"):
        spec["tags"] = [t.strip() for t in v["tags"].split(",") if t.strip()]
    return None if page.errors else spec


def _by_input(fields: dict[str, str]) -> dict[str, str]:
    """Spec field names ("resources.gpus", "args.2", "dataset.name") to the inputs."""
    out: dict[str, str] = {}
    for name, message in fields.items():
        top = name.split(".", 1)[0]
        target = {"resources": name.rsplit(".", 1)[-1], "can_run_code": "file"}.get(top, top)
        if target not in INPUTS:
            target = "form"
        out.setdefault(target, message if target != "form" else f"{name}: {message}")
    return out
