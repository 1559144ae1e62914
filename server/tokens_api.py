"""The caller's account and API tokens: GET /api/v1/me, /api/v1/tokens."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request
from flask.typing import ResponseReturnValue
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.auth import api_user, authenticate_api_request
from server.database import get_session
from server.errors import ApiError
from server.params import NoQuery, TokenListQuery, parse_query
from server.serialize import iso
from shared import accounts
from shared.models import ApiToken, User

bp = Blueprint("tokens_v1", __name__, url_prefix="/api/v1")
bp.before_request(authenticate_api_request)


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="", max_length=100, description="a label to tell tokens apart")


def token_to_json(token: ApiToken, user: User) -> dict[str, Any]:
    return {
        "id": token.id,
        "user": user.username,
        "name": token.name,
        "prefix": token.prefix,
        "created_at": iso(token.created_at),
        "last_used_at": iso(token.last_used_at),
        "revoked_at": iso(token.revoked_at),
    }


def _current_user_row() -> User:
    user = get_session().get(User, api_user().id)
    assert user is not None  # authenticated this request
    return user


@bp.get("/me")
def me() -> ResponseReturnValue:
    parse_query(NoQuery)
    user = api_user()
    return jsonify({"id": user.id, "username": user.username, "role": user.role})


@bp.get("/tokens")
def list_tokens() -> ResponseReturnValue:
    query = parse_query(TokenListQuery)
    if query.all and not api_user().is_admin:
        raise ApiError(
            403, "forbidden", "only admins can list every user's tokens", {"all": "admins only"}
        )
    rows = accounts.list_tokens(get_session(), None if query.all else _current_user_row())
    return jsonify({"tokens": [token_to_json(t, u) for t, u in rows]})


@bp.post("/tokens")
def create_token() -> ResponseReturnValue:
    parse_query(NoQuery)
    if not request.is_json:
        raise ApiError(
            415,
            "unsupported_media_type",
            "send the body as JSON",
            {"Content-Type": "must be application/json"},
        )
    try:
        body = TokenCreate.model_validate(request.get_json(silent=True) or {})
    except ValidationError as exc:
        fields = {".".join(str(p) for p in e["loc"]) or "body": e["msg"] for e in exc.errors()}
        raise ApiError(422, "invalid_body", "invalid token request", fields) from None
    session = get_session()
    user = _current_user_row()
    new = accounts.create_token(session, user, body.name)
    session.commit()
    # The only time the secret is ever returned.
    return jsonify({**token_to_json(new.token, user), "token": new.secret}), 201


@bp.delete("/tokens/<int:token_id>")
def revoke_token(token_id: int) -> ResponseReturnValue:
    parse_query(NoQuery)
    session = get_session()
    user = api_user()
    # Admins can revoke anyone's token (a leaked one); members only their own.
    token = accounts.revoke_token(session, token_id, None if user.is_admin else _current_user_row())
    if token is None:
        raise ApiError(
            404, "not_found", f"token {token_id} does not exist", {"token_id": "no such token"}
        )
    session.commit()
    owner = session.get(User, token.user_id)
    assert owner is not None
    return jsonify(token_to_json(token, owner))
