"""Log in and out with a username and password; the session cookie is Flask-Login's."""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import flash, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from flask_login import current_user, login_user, logout_user
from flask_wtf import FlaskForm
from limits import parse
from wtforms import PasswordField, StringField
from wtforms.validators import DataRequired, Length

from server.auth import principal, submit_limits
from server.database import get_session
from server.web import bp
from shared import accounts

# Slows password guessing per username and per client address without locking anyone out
# for long (a lockout would let anyone disable an account by failing on purpose).
LOGIN_ATTEMPTS = parse("10/minute")


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


def _too_many_attempts(username: str) -> bool:
    limits = submit_limits()
    client = request.remote_addr or "unknown"
    by_user = limits.hit(LOGIN_ATTEMPTS, "login-user", username.lower())
    by_client = limits.hit(LOGIN_ATTEMPTS, "login-client", client)
    return not (by_user and by_client)


@bp.route("/login", methods=["GET", "POST"])
def login() -> ResponseReturnValue:
    if current_user.is_authenticated:
        return redirect(_safe_next(request.args.get("next")))
    form = LoginForm()
    status = 200
    if form.validate_on_submit():
        username = form.username.data or ""
        if _too_many_attempts(username):
            form.password.errors.append("Too many attempts; wait a minute and try again.")
            status = 429
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
                login_user(principal(user))
                flash(f"Logged in as {user.username}.", "info")
                return redirect(_safe_next(request.args.get("next")))
    elif request.method == "POST":
        status = 400
    return render_template("login.html", form=form), status


class LogoutForm(FlaskForm):
    pass


@bp.post("/logout")
def logout() -> ResponseReturnValue:
    # A POST with the CSRF token: a GET logout could be triggered by any page's <img>.
    if LogoutForm().validate_on_submit():
        logout_user()
        flash("Logged out.", "info")
    return redirect(url_for("web.login"))
