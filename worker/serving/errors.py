"""The one error a request can end in, answered in the API's shape:
{"error": {"code", "message", "fields": {field: message}}} (server/errors.py)."""

from __future__ import annotations

from shared.http_error import HttpError


class ServeError(HttpError):
    """A prediction request's failure."""


def invalid(field: str, problem: str) -> ServeError:
    """A 422 naming the field, as the API's validation errors are."""
    return ServeError(422, "invalid_input", "the inputs do not fit the model", {field: problem})
