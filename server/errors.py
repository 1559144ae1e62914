"""One JSON error shape for every API failure: {"error": {"code", "message", "fields"}}."""

from __future__ import annotations

import logging

from flask import Flask, jsonify, render_template, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound, RequestEntityTooLarge

from shared.artifact_store import ArtifactStoreError
from shared.http_error import HttpError

log = logging.getLogger(__name__)


class ApiError(HttpError):
    """An API failure; answered by the handlers below."""


def error_response(
    status: int,
    code: str,
    message: str,
    fields: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> ResponseReturnValue:
    body = {"error": {"code": code, "message": message, "fields": fields or {}}}
    return jsonify(body), status, headers or {}


def _wants_html() -> bool:
    """A browser asking for a page (not the API, not the health check) gets an HTML page."""
    path = request.path
    if path.startswith("/api/") or path == "/healthz" or path.startswith("/static/"):
        return False
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "text/html"


_TITLES = {400: "Bad request", 403: "Not allowed", 404: "Not found", 405: "Not allowed",
           409: "Conflict", 413: "Too large", 429: "Slow down", 500: "Something broke"}  # fmt: skip


def _page_or_json(
    status: int,
    code: str,
    message: str,
    fields: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> ResponseReturnValue:
    if _wants_html():
        try:
            title = _TITLES.get(status, "Error")
            page = render_template("error.html", status=status, title=title, message=message)
            return page, status, headers or {}
        except Exception:  # noqa: BLE001 - e.g. the database is down: fall back to JSON
            log.exception("error page failed to render")
    return error_response(status, code, message, fields, headers)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> ResponseReturnValue:
        return _page_or_json(exc.status, exc.code, exc.message, exc.fields, exc.headers)

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(exc: RequestEntityTooLarge) -> ResponseReturnValue:
        limit = request.max_content_length
        return error_response(
            413,
            "body_too_large",
            f"request body is larger than {limit} bytes",
            {"body": f"at most {limit} bytes"},
        )

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> ResponseReturnValue:
        code = (exc.name or "error").lower().replace(" ", "_")
        # Keep what the exception says about itself (Allow on a 405), not its HTML type.
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
        return _page_or_json(
            exc.code or 500, code, exc.description or exc.name, _routing_fields(exc), headers
        )

    @app.errorhandler(ArtifactStoreError)
    def _store_down(exc: ArtifactStoreError) -> ResponseReturnValue:
        # The bucket is unreachable or refused us: nothing the client did; try later.
        log.warning("artifact store: %s", exc)
        return _page_or_json(
            503, "storage_unavailable", "the artifact store is unavailable; try again shortly",
            None, {"Retry-After": "10"},
        )  # fmt: skip

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> ResponseReturnValue:
        # The one place a bug becomes a 500: logged with its traceback, never shown.
        log.exception("unhandled error")
        return _page_or_json(500, "internal_error", "internal server error; see the server log")


def _routing_fields(exc: HTTPException) -> dict[str, str] | None:
    """Name what a routing failure is about: the URL (a malformed or unknown id, an
    unknown path) or the method, like every other 4xx names its field."""
    if request.url_rule is not None:
        return None  # raised by a view, which said what it meant in the description
    if isinstance(exc, MethodNotAllowed):
        allowed = ", ".join(sorted(exc.valid_methods or ()))
        return {"method": f"{request.method} is not allowed here; use {allowed}"}
    if isinstance(exc, NotFound):
        return {"path": "no resource at this path (ids in paths are positive integers)"}
    return None
