"""Log in and out with a username and password; the session cookie is Flask-Login's.

Failed logins slow down the address that fails (server/login_throttle.py); logging out
ends every session of the user (server/auth.py, users.session_version)."""

from __future__ import annotations

import math
from urllib.parse import urlsplit

from flask import flash, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from flask_login import current_user, logout_user
from flask_wtf import FlaskForm
from wtforms import PasswordField, StringField
from wtforms.validators import DataRequired, Length

from server.auth import end_session, start_session
from server.database import get_session
from server.login_throttle import login_throttle
from server.web import bp
from shared import accounts
from shared.orm import User


class LoginForm(FlaskForm):
    username = StringField("Username", validators=[DataRequired(), Length(max=64)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=1024)])


def _safe_next(target: str | None) -> str:
    # Only same-site paths: an open redirect would turn the login page into a phishing aid.
    # No control characters either: browsers drop tabs and newlines from a URL (so
    # "/\t/evil.example" is "//evil.example" to them), and a CR/LF in the Location header
    # made Werkzeug raise, turning a crafted ?next= into a 500.
    if target and any(ord(c) < 0x20 or ord(c) == 0x7F for c in target):
        return url_for("web.home")
    if target and target.startswith("/") and not target.startswith("//"):
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc and "\\" not in target:
            return target
    return url_for("web.home")


def _wait_text(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    return f"{math.ceil(seconds / 60)} minutes"


@bp.route("/login", methods=["GET", "POST"])
def login() -> ResponseReturnValue:
    if current_user.is_authenticated:
        return redirect(_safe_next(request.args.get("next")))
    form = LoginForm()
    status = 200
    headers: dict[str, str] = {}
    if form.validate_on_submit():
        username = form.username.data or ""
        address = request.remote_addr or "unknown"
        throttle = login_throttle()
        wait = throttle.attempt(username, address)
        if wait is not None:
            form.password.errors.append(
                f"Too many failed logins from your address; try again in {_wait_text(wait)}."
            )
            status = 429
            headers["Retry-After"] = str(wait)
        else:
            session = get_session()
            # A name no account can have (a NUL byte, which PostgreSQL refuses in a query
            # parameter and answered with a 500) is a failed login like any other.
            plausible = accounts.USERNAME_PATTERN.fullmatch(username) is not None
            password = form.password.data or ""
            user = accounts.authenticate(session, username, password) if plausible else None
            if user is None:
                # One message for "no such user" and "wrong password": no username probing.
                form.password.errors.append("Wrong username or password.")
                status = 401
            else:
                session.commit()  # authenticate may have upgraded the hash
                throttle.succeeded(username, address)
                start_session(user)
                flash(f"Logged in as {user.username}.", "info")
                return redirect(_safe_next(request.args.get("next")))
    elif request.method == "POST":
        status = 400
    return render_template("login.html", form=form), status, headers


class LogoutForm(FlaskForm):
    pass


@bp.post("/logout")
def logout() -> ResponseReturnValue:
    # A POST with the CSRF token: a GET logout could be triggered by any page's <img>.
    if not LogoutForm().validate_on_submit():
        if current_user.is_authenticated:
            flash(
                "The page had expired, so you are still logged in: reload it and log out again.",
                "error",
            )
        return redirect(url_for("web.login"))
    if current_user.is_authenticated:
        session = get_session()
        user = session.get(User, current_user.id)
        if user is not None:
            end_session(user)  # every session of the user, not only this cookie
            session.commit()
    logout_user()  # a session the loader already refused
    flash("Logged out.", "info")
    return redirect(url_for("web.login"))
