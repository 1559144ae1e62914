"""Users' limits and permissions, for admins: GET/PATCH /api/v1/users/<username>/limits
and /api/v1/users/<username>/permissions (can_run_code: may submit script jobs).

The limits themselves and how an override is stored are shared/limits.py's;
`trainyard user limits` changes the same users.limits column from the server host.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, jsonify
from flask.typing import ResponseReturnValue
from pydantic import ValidationError

from server import api_schemas as schemas
from server.auth import api_user, authenticate_api_request
from server.database import get_session
from server.errors import ApiError
from server.openapi import operation
from server.params import NoQuery, json_body, parse_query
from shared import accounts
from shared.limits import (
    LimitsError,
    apply_changes,
    effective_limits,
    overrides_by_name,
    role_limits,
)
from shared.orm import User

bp = Blueprint("users_v1", __name__, url_prefix="/api/v1/users")
bp.before_request(authenticate_api_request)


def _admin_only() -> None:
    if not api_user().is_admin:
        raise ApiError(
            403, "forbidden", "only admins can see or change users' limits and permissions", {}
        )


def _user(username: str) -> User:
    # A name no account can have is not looked up (a NUL byte would fail in PostgreSQL).
    valid = accounts.USERNAME_PATTERN.fullmatch(username) is not None
    user = accounts.find_user(get_session(), username) if valid else None
    if user is None:
        raise ApiError(
            404, "not_found", f"user {username!r} does not exist", {"username": "no such user"}
        )
    return user


def limits_to_json(user: User) -> dict[str, Any]:
    settings = current_app.config["TRAINYARD_SETTINGS"]
    return {
        "username": user.username,
        "role": user.role,
        "limits": effective_limits(settings, user.role, user.limits),
        "role_defaults": role_limits(settings, user.role),
        "overrides": overrides_by_name(user.limits),
    }


@bp.get("/<username>/limits")
@operation(tag="account", ok={200: schemas.UserLimits}, errors=(403, 404))
def get_limits(username: str) -> ResponseReturnValue:
    """A user's limits (admins only): in force, the role's defaults, the overrides."""
    parse_query(NoQuery)
    _admin_only()
    return jsonify(limits_to_json(_user(username)))


@bp.patch("/<username>/limits")
@operation(
    tag="account",
    json=schemas.LimitsChange,
    ok={200: schemas.UserLimits},
    errors=(403, 404, 413, 415, 422),
    validate=False,  # the body goes through json_body's checks first
)
def change_limits(username: str) -> ResponseReturnValue:
    """Raise or lower a user's limits (admins only).

    `{"max_params": 5e9, "max_epochs": null}`: each limit named is set, null puts it
    back to the role's default; limits not named keep their value.
    """
    parse_query(NoQuery)
    _admin_only()
    body = json_body("invalid_limits", "invalid limits")
    if not isinstance(body, dict):
        raise ApiError(
            422, "invalid_limits", "invalid limits", {"body": "a JSON object of limit: value"}
        )
    user = _user(username)
    try:
        user.limits = apply_changes(user.limits, body)
    except LimitsError as exc:
        raise ApiError(422, "invalid_limits", "invalid limits", {exc.field: exc.message}) from None
    get_session().commit()
    return jsonify(limits_to_json(user))


def permissions_to_json(user: User) -> dict[str, Any]:
    return {
        "username": user.username,
        "role": user.role,
        "can_run_code": bool(user.can_run_code),
        "may_run_code": user.role == "admin" or bool(user.can_run_code),
    }


@bp.get("/<username>/permissions")
@operation(tag="account", ok={200: schemas.UserPermissions}, errors=(403, 404))
def get_permissions(username: str) -> ResponseReturnValue:
    """A user's permissions (admins only)."""
    parse_query(NoQuery)
    _admin_only()
    return jsonify(permissions_to_json(_user(username)))


@bp.patch("/<username>/permissions")
@operation(
    tag="account",
    json=schemas.PermissionsChange,
    ok={200: schemas.UserPermissions},
    errors=(403, 404, 413, 415, 422),
    validate=False,  # the body goes through json_body's checks first
)
def change_permissions(username: str) -> ResponseReturnValue:
    """Grant or take back a user's permissions (admins only).

    `can_run_code` lets a member submit script jobs: their own code, run by the workers
    with the workers' OS user and network (README, "Script jobs: trust model").
    """
    parse_query(NoQuery)
    _admin_only()
    try:
        change = schemas.PermissionsChange.model_validate(
            json_body("invalid_body", "invalid permissions")
        )
    except ValidationError as exc:
        fields = {".".join(str(p) for p in e["loc"]) or "body": e["msg"] for e in exc.errors()}
        raise ApiError(422, "invalid_body", "invalid permissions", fields) from None
    user = _user(username)
    if change.can_run_code is not None:
        accounts.set_can_run_code(user, change.can_run_code)
    get_session().commit()
    return jsonify(permissions_to_json(user))
