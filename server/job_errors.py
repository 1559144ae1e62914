"""A job's error and log as the viewer may see them (shared/redaction.py).

Members see a failed job's message without server paths and its log with tracebacks
folded away and paths redacted; admins see everything, and a failed job's `error` gets
a `detail` field: the full message with the traceback. The worker already stores the
message redacted; redacting again here covers rows and logs written before it did.
"""

from __future__ import annotations

from typing import Any

from flask import current_app, g, has_request_context

from shared.orm import Job
from shared.redaction import ERROR_DETAIL, redactor_for
from shared.settings import Settings


def viewer_is_admin() -> bool:
    """Whether the request's user (API token or login session) is an admin."""
    if not has_request_context():
        return False
    user = g.get("user")
    if user is None:
        from flask_login import current_user

        user = current_user
    return bool(getattr(user, "is_admin", False))


def _settings() -> Settings:
    return current_app.config["TRAINYARD_SETTINGS"]


def error_json(job: Job, admin: bool, settings: Settings | None = None) -> dict[str, Any] | None:
    """The `error` object of a job's JSON (API, stream), or None when it has none."""
    if not (job.error_type or (job.state == "failed" and job.error_message)):
        return None
    if admin:
        detail = (job.result or {}).get(ERROR_DETAIL)
        return {"type": job.error_type, "message": job.error_message, "detail": detail}
    return {"type": job.error_type, "message": shown_message(job.error_message, settings)}


def shown_message(message: str | None, settings: Settings | None = None) -> str | None:
    """A stored error message as a member may see it."""
    if not message:
        return message
    return redactor_for(settings or _settings()).text(message)


def public_result(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """A job's result without the error detail (shown as `error.detail`, to admins)."""
    if not result or ERROR_DETAIL not in result:
        return result
    rest = {k: v for k, v in result.items() if k != ERROR_DETAIL}
    return rest or None


def log_lines(lines: list[str], admin: bool, settings: Settings | None = None) -> list[str]:
    """Job-log lines as the viewer may see them."""
    if admin:
        return lines
    return redactor_for(settings or _settings()).log_lines(lines)
