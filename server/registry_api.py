"""The model registry over HTTP, under /api/v1/registry (GET /api/v1/models stays the
model zoo):

    GET  /api/v1/registry/models                                  yours (admins: all=true)
    POST /api/v1/registry/models/{name}/versions                  promote a job: 201
    GET  /api/v1/registry/models/{name}                           versions and stage history
    GET  /api/v1/registry/models/{name}/versions/{version}
    POST /api/v1/registry/models/{name}/versions/{version}/stage  move it

The rules (hashing, version numbers, one production version, who may write) are
shared/model_registry.py's; this module turns requests into its calls and its rows into
JSON. Owned like jobs: someone else's model reads as missing. The pages
(server/web/registry_pages.py) render the same JSON.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flask import Blueprint, current_app, jsonify
from flask.typing import ResponseReturnValue
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from server import api_schemas as schemas
from server.auth import Principal, api_user, authenticate_api_request
from server.database import get_session
from server.errors import ApiError
from server.openapi import operation
from server.params import NoQuery, QueryModel, check_path_ids, json_body, parse_query
from server.serialize import iso
from shared import model_registry as registry
from shared.artifact_store import store_for
from shared.orm import Job, ModelStageEvent, ModelVersion, RegisteredModel, User

bp = Blueprint("registry_v1", __name__, url_prefix="/api/v1/registry")
bp.before_request(authenticate_api_request)
bp.before_request(check_path_ids)

_STATUS = {"not_found": 404, "invalid": 422, "conflict": 409}
# The error's message says what failed; its field says why (the registry's words).
_SUMMARY = {
    "invalid_job": "the job's model cannot be registered",
    "invalid_name": "invalid model name",
    "invalid_stage": "invalid stage",
    "name_taken": "the model name is taken",
    "already_registered": "the job is already a version of this model",
}


class ModelListQuery(QueryModel):
    all: bool = Field(default=False, description="every user's models (admins only)")
    limit: int = Field(default=200, ge=1, le=1000, description="at most this many, newest first")


def _path_parameters(with_version: bool) -> dict[str, Any]:
    """The path parameters as the document should say them (`operation`'s `extra`
    replaces the generated list, whose fallback wording is an artifact's)."""
    params: list[dict[str, Any]] = [{
        "name": "name", "in": "path", "required": True, "schema": {"type": "string"},
        "description": f"the registered model's name: {registry.NAME_RULE}",
    }]  # fmt: skip
    if with_version:
        params.append({
            "name": "version", "in": "path", "required": True,
            "schema": {"type": "integer", "format": "int32", "minimum": 1,
                       "maximum": registry.MAX_VERSION},
            "description": "the version number (1, 2, ... per model)",
        })  # fmt: skip
    return {"parameters": params}


def actor_of(user: Principal) -> registry.Actor:
    return registry.Actor(user.id, user.is_admin)


def api_error(exc: registry.RegistryError) -> ApiError:
    summary = _SUMMARY.get(exc.code, exc.message)
    return ApiError(_STATUS[exc.kind], exc.code, summary, {exc.field: exc.message})


def model_not_found(name: str) -> ApiError:
    return ApiError(404, "not_found", f"model {name!r} does not exist", {"name": "no such model"})


def visible_model(name: str) -> RegisteredModel:
    """The model, or a 404 that reads the same whether it is missing or someone else's."""
    model = registry.visible_model(get_session(), name, actor_of(api_user()))
    if model is None:
        raise model_not_found(name)
    return model


def visible_version(name: str, number: int) -> tuple[RegisteredModel, ModelVersion]:
    model = visible_model(name)
    version = registry.find_version(get_session(), model, number)
    if version is None:
        raise ApiError(404, "not_found", f"{name} has no version {number}",
                       {"version": "no such version"})  # fmt: skip
    return model, version


def _body(model: type[BaseModel], message: str) -> Any:
    try:
        return model.model_validate(json_body("invalid_body", message))
    except ValidationError as exc:
        fields = {".".join(str(p) for p in e["loc"]) or "body": e["msg"] for e in exc.errors()}
        raise ApiError(422, "invalid_body", message, fields) from None


# ---------------------------------------------------------------- routes


@bp.get("/models")
@operation(
    tag="model-registry",
    query=ModelListQuery,
    ok={200: schemas.RegistryModels},
    errors={403: "`all=true` from a caller who is not an admin."},
)
def list_registered_models() -> ResponseReturnValue:
    """Your registered models, newest first (`all=true`: everyone's, admins)."""
    query = parse_query(ModelListQuery)
    user = api_user()
    if query.all and not user.is_admin:
        raise ApiError(
            403, "forbidden", "only admins can list every user's models", {"all": "admins only"}
        )
    return jsonify({"models": models_json(get_session(), list_rows(user, query.all, query.limit))})


def list_rows(user: Principal, everyone: bool, limit: int) -> list[RegisteredModel]:
    stmt = select(RegisteredModel).order_by(RegisteredModel.id.desc()).limit(limit)
    if not everyone:
        stmt = stmt.where(RegisteredModel.owner_id == user.id)
    return list(get_session().scalars(stmt))


@bp.post("/models/<name>/versions")
@operation(
    tag="model-registry",
    json=schemas.PromoteRequest,
    ok={201: schemas.RegistryVersionDetail},
    errors={
        404: "",
        409: "The name belongs to another user's model, or the job is already a version "
        "of this model.",
        413: "",
        415: "",
        422: "The name or stage is invalid, or the job cannot be registered (`job_id` says "
        "why: missing, not yours, not succeeded, a kind that makes no model, files deleted).",
    },
    extra=_path_parameters(with_version=False),
    validate=False,  # the body goes through json_body's checks first
)
def register_model_version(name: str) -> ResponseReturnValue:
    """Register a succeeded job's model as the model's next version.

    The model is created (yours) if the name is new. The model file (`best.pt` of a train
    or prune job, `model.pt` of a quantize job, `state_dict.pt` and every other export
    file of an export job) is hashed now: the version is immutable, and the job's files
    cannot be deleted while a version pins them.
    """
    parse_query(NoQuery)
    body = _body(schemas.PromoteRequest, "invalid promotion")
    try:
        version = promote_job(api_user(), name, body.job_id, description=body.description,
                              stage=body.stage, model_description=body.model_description)  # fmt: skip
    except registry.RegistryError as exc:
        raise api_error(exc) from None
    session = get_session()
    location = f"/api/v1/registry/models/{name}/versions/{version.version}"
    return jsonify(version_json(session, version, history=True)), 201, {"Location": location}


def promote_job(user: Principal, name: str, job_id: int, **options: Any) -> ModelVersion:
    """Promote for this user through the configured store (the job page's form too)."""
    store = store_for(current_app.config["TRAINYARD_SETTINGS"])
    return registry.promote(get_session(), store, actor_of(user), name, job_id, **options)


@bp.get("/models/<name>")
@operation(
    tag="model-registry",
    ok={200: schemas.RegistryModelDetail},
    errors=(404,),
    extra=_path_parameters(with_version=False),
)
def get_registered_model(name: str) -> ResponseReturnValue:
    """A model with its versions and the stage history of all of them, newest first."""
    parse_query(NoQuery)
    return jsonify(model_detail_json(get_session(), visible_model(name)))


@bp.get("/models/<name>/versions/<int:version>")
@operation(
    tag="model-registry",
    ok={200: schemas.RegistryVersionDetail},
    errors=(404,),
    extra=_path_parameters(with_version=True),
)
def get_model_version(name: str, version: int) -> ResponseReturnValue:
    """One version: its job, pinned files with their SHA-256, stage and history."""
    parse_query(NoQuery)
    _model, row = visible_version(name, version)
    return jsonify(version_json(get_session(), row, history=True))


@bp.post("/models/<name>/versions/<int:version>/stage")
@operation(
    tag="model-registry",
    json=schemas.StageRequest,
    ok={200: schemas.RegistryVersionDetail},
    errors={404: "", 413: "", 415: "", 422: ""},
    extra=_path_parameters(with_version=True),
    validate=False,  # the body goes through json_body's checks first
)
def change_model_version_stage(name: str, version: int) -> ResponseReturnValue:
    """Move a version to another stage (recorded with who, when and the note).

    To production: the model's production version is archived, in the same transaction.
    Moving a version to the stage it is in changes nothing.
    """
    parse_query(NoQuery)
    _model, row = visible_version(name, version)
    body = _body(schemas.StageRequest, "invalid stage change")
    session = get_session()
    try:
        moved = registry.move_stage(session, row.id, body.stage, actor_of(api_user()), body.note)
    except registry.RegistryError as exc:
        raise api_error(exc) from None
    return jsonify(version_json(session, moved, history=True))


# ---------------------------------------------------------------- serializing


def _usernames(session: Session, ids: Iterable[int | None]) -> dict[int, str]:
    wanted = {i for i in ids if i is not None}
    if not wanted:
        return {}
    return dict(session.execute(select(User.id, User.username).where(User.id.in_(wanted))).all())


def _event_json(event: ModelStageEvent, number: int, users: dict[int, str]) -> dict[str, Any]:
    return {
        "version": number,
        "from_stage": event.from_stage,
        "to_stage": event.to_stage,
        "user": users.get(event.user_id) if event.user_id is not None else None,
        "at": iso(event.at),
        "note": event.note,
    }


def _versions_json(
    session: Session, model_names: dict[int, str], versions: list[ModelVersion]
) -> list[dict[str, Any]]:
    users = _usernames(session, (v.created_by for v in versions))
    job_ids = {v.job_id for v in versions}
    names = dict(session.execute(select(Job.id, Job.name).where(Job.id.in_(job_ids))).all()) \
        if job_ids else {}  # fmt: skip
    return [
        {
            "model": model_names[v.model_id],
            "version": v.version,
            "stage": v.stage,
            "job_id": v.job_id,
            "job_kind": v.job_kind,
            "job_name": names.get(v.job_id),
            "model_file": v.model_file,
            "sha256": v.sha256,
            "size_bytes": v.size_bytes,
            "files": v.files,
            "description": v.description,
            "created_by": users.get(v.created_by) if v.created_by is not None else None,
            "created_at": iso(v.created_at),
        }
        for v in versions
    ]


def _history_json(session: Session, versions: list[ModelVersion]) -> list[dict[str, Any]]:
    numbers = {v.id: v.version for v in versions}
    events = registry.stage_history(session, numbers)
    users = _usernames(session, (e.user_id for e in events))
    return [_event_json(e, numbers[e.version_id], users) for e in events]


def version_json(session: Session, version: ModelVersion, history: bool = False) -> dict[str, Any]:
    model = session.get(RegisteredModel, version.model_id)
    assert model is not None
    out = _versions_json(session, {model.id: model.name}, [version])[0]
    if history:
        out["history"] = _history_json(session, [version])
    return out


def _summary(
    model: RegisteredModel, versions: list[ModelVersion], owners: dict[int, str]
) -> dict[str, Any]:
    return {
        "name": model.name,
        "owner": owners.get(model.owner_id) if model.owner_id is not None else None,
        "description": model.description,
        "created_at": iso(model.created_at),
        "latest_version": max((v.version for v in versions), default=None),
        "version_count": len(versions),
        "production": next((v.version for v in versions if v.stage == "production"), None),
        "staging": [v.version for v in versions if v.stage == "staging"],
    }


def models_json(session: Session, models: list[RegisteredModel]) -> list[dict[str, Any]]:
    """Summaries of these models (their versions read in one query)."""
    by_model: dict[int, list[ModelVersion]] = {m.id: [] for m in models}
    for v in registry.versions_of(session, by_model):
        by_model[v.model_id].append(v)
    owners = _usernames(session, (m.owner_id for m in models))
    return [_summary(m, by_model[m.id], owners) for m in models]


def model_detail_json(session: Session, model: RegisteredModel) -> dict[str, Any]:
    versions = registry.versions_of(session, [model.id])
    out = _summary(model, versions, _usernames(session, [model.owner_id]))
    out["versions"] = _versions_json(session, {model.id: model.name}, versions)
    out["history"] = _history_json(session, versions)
    return out
