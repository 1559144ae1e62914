"""The error every Trainyard HTTP answer ends in, whichever process serves it (the web's
API, the prediction server): {"error": {"code", "message", "fields": {field: message}}}.
Here so that server/ and worker/ share one class without importing each other."""

from __future__ import annotations


class HttpError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        fields: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields or {}
        self.headers = headers or {}

    def body(self) -> dict[str, object]:
        return {"error": {"code": self.code, "message": self.message, "fields": self.fields}}
