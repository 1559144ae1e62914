"""The caller's account and API tokens: GET /api/v1/me, /api/v1/tokens."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify
from flask.typing import ResponseReturnValue
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server import api_schemas as schemas
from server import quotas
from server.auth import api_user, authenticate_api_request
from server.database import get_session
from server.errors import ApiError
from server.openapi import operation
from server.params import NoQuery, TokenListQuery, check_path_ids, json_body, parse_query
from server.serialize import iso
from shared import accounts
from shared.orm import ApiToken, User

bp = Blueprint("tokens_v1", __name__, url_prefix="/api/v1")
bp.before_request(authenticate_api_request)
bp.before_request(check_path_ids)


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
@operation(tag="account", ok={200: schemas.Me})
def me() -> ResponseReturnValue:
    """Who the credentials belong to."""
    parse_query(NoQuery)
    user = api_user()
    return jsonify(
        {
            "id": user.id,
            "username": user.username,
            "role": user.role,
            "may_run_code": user.may_run_code,
        }
    )


@bp.get("/tokens")
@operation(
    tag="account",
    query=TokenListQuery,
    ok={200: schemas.Tokens},
    errors={403: "`all=true` is for admins."},
)
def list_tokens() -> ResponseReturnValue:
    """The caller's API tokens (every user's with `all=true`, admins only)."""
    query = parse_query(TokenListQuery)
    if query.all and not api_user().is_admin:
        raise ApiError(
            403, "forbidden", "only admins can list every user's tokens", {"all": "admins only"}
        )
    rows = accounts.list_tokens(get_session(), None if query.all else _current_user_row())
    return jsonify({"tokens": [token_to_json(t, u) for t, u in rows]})


@bp.post("/tokens")
@operation(
    tag="account",
    json=TokenCreate,
    ok={201: schemas.TokenCreated},
    errors={
        409: "The caller already has TRAINYARD_MAX_TOKENS_PER_USER unrevoked tokens.",
        413: "",
        415: "",
        422: "",
        429: "More token creations than TRAINYARD_TOKEN_RATE_LIMIT allows.",
    },
    validate=False,  # the body goes through json_body's checks first
)
def create_token() -> ResponseReturnValue:
    """Create an API token for the caller; the secret is in this answer only."""
    parse_query(NoQuery)
    try:
        body = TokenCreate.model_validate(json_body("invalid_body", "invalid token request"))
    except ValidationError as exc:
        fields = {".".join(str(p) for p in e["loc"]) or "body": e["msg"] for e in exc.errors()}
        raise ApiError(422, "invalid_body", "invalid token request", fields) from None
    quotas.check_token_allowed(api_user())
    session = get_session()
    user = _current_user_row()
    new = accounts.create_token(session, user, body.name)
    session.commit()
    # The only time the secret is ever returned.
    return jsonify({**token_to_json(new.token, user), "token": new.secret}), 201


@bp.delete("/tokens/<int:token_id>")
@operation(tag="account", ok={200: schemas.Token}, errors=(404, 413))
def revoke_token(token_id: int) -> ResponseReturnValue:
    """Revoke a token (admins: anyone's; members: their own)."""
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
