"""The HTTP client the job commands use, and how its errors reach the terminal.

The client commands talk to the API only, never to the database, so they work from any
machine that can reach the server: nothing here imports SQLAlchemy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import IO, Any, TypeVar

import click
import requests

# Job states as the API reports them. Not taken from shared.state_machine: that pulls in
# SQLAlchemy, which a client that only speaks HTTP has no use for.

# Exit codes beyond click's own (2 is also click's usage error: both mean "nothing ran").
EXIT_API_ERROR = 1
EXIT_UNREACHABLE = 2

F = TypeVar("F", bound=Callable[..., Any])


class ApiError(Exception):
    """A 4xx/5xx answer, in the API's one error shape (server/errors.py)."""

    def __init__(self, status: int, code: str, message: str, fields: dict[str, str] | None = None):
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields or {}
        # Whether the request carried a token: a 401 then means "refused", not "missing".
        self.token_sent = False
        super().__init__(f"{message} ({code}, HTTP {status})")

    @classmethod
    def from_response(cls, resp: requests.Response) -> ApiError:
        try:
            body = resp.json()
            err = body["error"]
            return cls(
                resp.status_code,
                str(err.get("code") or "error"),
                str(err.get("message") or resp.reason),
                {str(k): str(v) for k, v in (err.get("fields") or {}).items()},
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            # Not our error shape: a proxy's page, or a crash before the error handler.
            text = " ".join(resp.text.split())[:200]
            return cls(resp.status_code, "http_error", text or resp.reason or "no body")


class ApiUnreachable(Exception):
    """No HTTP answer at all: nothing listening, DNS, timeout."""


class ApiClient:
    """JSON over HTTP to /api/v1, with `Authorization: Bearer <token>` when given a token."""

    def __init__(
        self,
        base_url: str,
        timeout: tuple[float, float] = (3.05, 30.0),
        *,
        token: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        # One session: `watch` polls twice a second and keep-alive saves a handshake each time.
        self._session = requests.Session()
        self.token = check_token(token) if token else None
        if self.token:
            self._session.headers["Authorization"] = f"Bearer {self.token}"

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        return self._request(
            "GET", path, params={k: v for k, v in (params or {}).items() if v is not None}
        )

    def post(self, path: str, body: Any = None) -> Any:
        return self._request("POST", path, json=body)

    def delete(self, path: str) -> Any:
        return self._request("DELETE", path)

    def post_file(
        self, path: str, file: IO[bytes], filename: str, content_type: str = "text/csv"
    ) -> Any:
        """POST a file as a raw body (a CSV, a code bundle), streamed (never read into
        memory here)."""
        return self._request(
            "POST",
            path,
            params={"filename": filename},
            data=file,
            headers={"Content-Type": content_type},
            timeout=(self.timeout[0], 600.0),
        )

    def download(self, path: str, out: IO[bytes]) -> None:
        """GET a file (not JSON) into `out`, streamed; errors as from any request."""
        resp = self._request("GET", path, stream=True, timeout=(self.timeout[0], 600.0), raw=True)
        with resp:
            for chunk in resp.iter_content(chunk_size=1 << 16):
                out.write(chunk)

    def _request(self, method: str, path: str, *, raw: bool = False, **kwargs: Any) -> Any:
        url = f"{self.base_url}/api/v1{path}"
        kwargs.setdefault("timeout", self.timeout)
        try:
            resp = self._session.request(method, url, **kwargs)
        except requests.ConnectionError as exc:
            reason = "connection refused" if "refused" in str(exc).lower() else "cannot connect"
            raise ApiUnreachable(
                f"cannot reach Trainyard at {self.base_url} ({reason}). Is it running? "
                "Start it with `trainyard up`, or point --url / TRAINYARD_URL at it."
            ) from None
        except requests.Timeout:
            raise ApiUnreachable(
                f"Trainyard at {self.base_url} did not answer within {self.timeout[1]:.0f} s"
            ) from None
        if resp.status_code >= 400:
            error = ApiError.from_response(resp)
            error.token_sent = self.token is not None
            raise error
        if raw:
            return resp
        try:
            return resp.json()
        except ValueError:
            raise ApiError(
                resp.status_code, "bad_response", f"{url} did not answer with JSON"
            ) from None


def api_command(func: F) -> F:
    """Turn client errors into a message and an exit code instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ApiUnreachable as exc:
            click.echo(f"error: {exc}", err=True)
            raise click.exceptions.Exit(EXIT_UNREACHABLE) from None
        except ApiError as exc:
            echo_api_error(exc)
            if exc.status == 401:
                click.echo(unauthorized_hint(exc.token_sent), err=True)
            raise click.exceptions.Exit(EXIT_API_ERROR) from None

    return wrapper  # type: ignore[return-value]


def check_token(token: str) -> str:
    """The token without surrounding whitespace; refused if it cannot be an HTTP header."""
    token = token.strip()
    # requests would fail deep inside with a traceback; a token is URL-safe ASCII anyway.
    if not token.isascii() or not token.isprintable() or " " in token:
        raise ValueError("an API token is printable ASCII without spaces")
    return token


def unauthorized_hint(token_sent: bool) -> str:
    """What to do about a 401: where a token comes from."""
    # Imported here: the settings are only needed on this path.
    from server.cli.settings import cli_settings

    path = cli_settings().cli_token_path.resolve()
    why = (
        "the server refused the API token (revoked, or its user disabled?)"
        if token_sent
        else "no API token was sent"
    )
    return (
        f"hint: {why}; set TRAINYARD_TOKEN (create one with "
        f"`trainyard token create --user NAME`) or run `trainyard up`, which writes {path}"
    )


def echo_api_error(exc: ApiError) -> None:
    """One line for the error, then one per invalid field, so a bad spec is fixed in one go."""
    click.echo(f"error: {exc.message} ({exc.code}, HTTP {exc.status})", err=True)
    for field, message in exc.fields.items():
        click.echo(f"  {field}: {message}", err=True)
