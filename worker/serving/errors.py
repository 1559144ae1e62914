"""The one error a request can end in, answered in the API's shape:
{"error": {"code", "message", "fields": {field: message}}} (server/errors.py)."""

from __future__ import annotations


class ServeError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        fields: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.fields = fields or {}
        self.headers = headers or {}

    def body(self) -> dict[str, object]:
        return {"error": {"code": self.code, "message": self.message, "fields": self.fields}}


def invalid(field: str, problem: str) -> ServeError:
    """A 422 naming the field, as the API's validation errors are."""
    return ServeError(422, "invalid_input", "the inputs do not fit the model", {field: problem})
