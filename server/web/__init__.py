"""The HTML side: server-rendered pages for logged-in users (login lives in login.py)."""

from __future__ import annotations

from flask import Blueprint

bp = Blueprint("web", __name__)

# Route modules register on `bp` when imported; app.py imports this package.
from server.web import (  # noqa: E402,F401
    compare,
    derive_form,
    filters,
    job_page,
    leaderboard,
    login,
    pages,
    registry_pages,
    script_submit,
    submit,
    sweep_pages,
    uploads_page,
    webhook_pages,
    workers,
)
