"""Request inputs at the API's edge: query strings, path ids and JSON bodies.

Query strings are pydantic models: unknown or repeated parameters and bad values are
400s naming the parameter. The same models describe the parameters in the OpenAPI
document (server/openapi.py), and spectree validates them with these models before a
documented view runs; `parse_query` hands the view that result.

JSON bodies go through `json_body`, which refuses what the database or the JSON
encoder cannot hold before any model sees it (NUL bytes, unpaired surrogates, numbers
beyond 64 bits, absurd nesting), so such input is a 4xx naming the field, never a 500.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal, TypeVar

from flask import request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.errors import ApiError
from shared.job_states import ALL_STATES
from shared.spec import JobKindName

M = TypeVar("M", bound=BaseModel)

JobStateName = Literal["queued", "running", "succeeded", "failed", "cancelled"]
assert set(JobStateName.__args__) == set(ALL_STATES)  # type: ignore[attr-defined]

# Ids are BIGINT (64-bit signed) on PostgreSQL; a larger number in a URL or a body is
# not an id that can exist, and would overflow the driver's parameter instead.
MAX_ID = 2**63 - 1

# No control characters in query strings: PostgreSQL refuses NUL in text, and none of
# these parameters (names, keys, filenames) has a use for the rest.
_NO_CONTROL_CHARS = r"^[^\x00-\x1f\x7f]*$"
QueryText = Annotated[str, Field(pattern=_NO_CONTROL_CHARS)]

# A job spec is at most a few levels deep (dataset.params.features.0); anything far
# deeper is an attack on the recursion limit of whatever walks it next.
MAX_JSON_DEPTH = 32
_UNSTORABLE_CHARS = re.compile("[\x00\ud800-\udfff]")


class QueryModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoQuery(QueryModel):
    """An endpoint that takes no query parameters."""


class JobListQuery(QueryModel):
    state: JobStateName | None = Field(default=None, description="only jobs in this state")
    kind: JobKindName | None = Field(default=None, description="only this kind")
    model: QueryText | None = Field(default=None, max_length=64, description="model name")
    dataset: QueryText | None = Field(default=None, max_length=64, description="dataset name")
    owner: QueryText | None = Field(
        default=None, max_length=64, description="username (admins; members see their own)"
    )
    tag: QueryText | None = Field(
        default=None, max_length=64, description="only jobs with this tag"
    )
    q: QueryText | None = Field(
        default=None,
        max_length=200,
        description="a case-insensitive substring of the name (`%` and `_` match themselves)",
    )
    sort: Literal["newest", "oldest", "name"] = Field(
        default="newest", description="newest or oldest first (by id), or by name then id"
    )
    limit: int = Field(default=50, ge=1, le=200, description="page size")
    before: int | None = Field(
        default=None,
        ge=1,
        le=2**62,
        description="sort=newest only: keyset cursor, `next_before` of the last page",
    )
    cursor: QueryText | None = Field(
        default=None,
        max_length=1000,
        description="keyset cursor for any sort: `next_cursor` or `prev_cursor` of a page",
    )


class MetricsQuery(QueryModel):
    keys: QueryText | None = Field(
        default=None, max_length=2000, description="comma-separated metric keys; all when absent"
    )
    max_points: int = Field(
        default=2000, ge=2, le=100_000, description="downsample each series to at most this"
    )


class LogQuery(QueryModel):
    tail: int = Field(default=200, ge=1, le=10_000, description="last N lines")


class TokenListQuery(QueryModel):
    all: bool = Field(default=False, description="every user's tokens (admins only)")


class UploadListQuery(QueryModel):
    all: bool = Field(default=False, description="every user's uploads (admins only)")
    limit: int = Field(default=200, ge=1, le=1000, description="at most this many, newest first")


class UploadColumnsQuery(QueryModel):
    q: QueryText = Field(
        default="", max_length=255, description="part of a column name (case-insensitive)"
    )
    limit: int = Field(default=50, ge=1, le=500, description="at most this many columns")


class UploadQuery(QueryModel):
    filename: QueryText | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        description="the name to keep for a raw `text/csv` body (a multipart file has its own)",
    )


class BundleQuery(QueryModel):
    filename: QueryText | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        description="the name to keep for a raw archive body (a multipart file has its own)",
    )


class BundleListQuery(QueryModel):
    all: bool = Field(default=False, description="every user's bundles (admins only)")
    sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="only the bundle with this content (lowercase hex SHA-256 of the "
        "archive): how a client learns it need not upload again",
    )
    limit: int = Field(default=200, ge=1, le=1000, description="at most this many, newest first")


def query_error(exc: ValidationError) -> ApiError:
    """A failed query model validation as the API's 400, naming every bad parameter."""
    fields = {}
    for err in exc.errors(include_url=False):
        name = ".".join(str(p) for p in err["loc"]) or "query"
        if err["type"] == "extra_forbidden":
            fields[name] = "unknown query parameter"
        elif err["type"] == "string_pattern_mismatch":
            fields[name] = "must not contain control characters"
        else:
            fields[name] = err["msg"]
    return ApiError(400, "invalid_parameter", "invalid query parameters", fields)


def check_repeated_parameters() -> None:
    repeated = [k for k, values in request.args.lists() if len(values) > 1]
    if repeated:
        raise ApiError(
            400,
            "invalid_parameter",
            "query parameters may be given once",
            {k: "given more than once" for k in repeated},
        )


def parse_query(model: type[M]) -> M:
    """Validate request.args against `model`; a 400 names every bad parameter.

    A view documented with spectree validation already had its query validated by the
    same model (server/openapi.py); that result is returned rather than parsed twice.
    """
    validated = getattr(getattr(request, "context", None), "query", None)
    if isinstance(validated, model):
        return validated
    check_repeated_parameters()
    try:
        return model.model_validate(request.args.to_dict())
    except ValidationError as exc:
        raise query_error(exc) from None


def check_path_ids() -> None:
    """before_request: an integer id in the URL that cannot be a row id is a 404.

    Flask's `int` converter takes any number of digits; past 64 bits the database
    driver would fail on the parameter (a 500) instead of finding nothing.
    """
    for name, value in (request.view_args or {}).items():
        if isinstance(value, int) and value > MAX_ID:
            noun = name.removesuffix("_id")
            raise ApiError(
                404, "not_found", f"{noun} {value} does not exist", {name: f"no such {noun}"}
            )


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON does not, and neither do we.
    raise ValueError(f"{name} is not valid JSON")


def _unstorable(data: Any) -> dict[str, str]:
    """Dotted paths of values no column or JSON encoder can keep, with the reason."""
    problems: dict[str, str] = {}
    # Iterative, so a deep document cannot exhaust the interpreter's stack here.
    stack: list[tuple[tuple[str, ...], Any]] = [((), data)]
    while stack:
        path, value = stack.pop()
        field = ".".join(path) or "body"
        if len(path) > MAX_JSON_DEPTH:
            problems.setdefault(field, f"nested deeper than {MAX_JSON_DEPTH} levels")
            continue
        if isinstance(value, dict):
            for key, item in value.items():
                if _UNSTORABLE_CHARS.search(key):
                    problems.setdefault(
                        ".".join((*path, key.encode("unicode_escape").decode())),
                        "field names must not contain NUL or unpaired surrogate characters",
                    )
                    continue
                stack.append(((*path, key), item))
        elif isinstance(value, list):
            stack.extend(((*path, str(i)), item) for i, item in enumerate(value))
        elif isinstance(value, str):
            if _UNSTORABLE_CHARS.search(value):
                problems.setdefault(field, "must not contain NUL or unpaired surrogate characters")
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int):
            if abs(value) > MAX_ID:
                problems.setdefault(field, f"integer out of range (at most {MAX_ID} in magnitude)")
        elif isinstance(value, float) and not math.isfinite(value):
            problems.setdefault(field, "number out of range")
    return problems


def json_body(code: str = "invalid_body", message: str = "invalid request body") -> Any:
    """The request body parsed as strict JSON (any JSON value; the caller's model checks it).

    415 unless the Content-Type is application/json; 413 past MAX_CONTENT_LENGTH (werkzeug, while
    reading); 400 when it does not parse; 422 (`code`, `message`) naming each value that
    could not be stored.
    """
    # Exactly application/json (a charset parameter is fine): the one type documented.
    if request.mimetype != "application/json":
        raise ApiError(
            415,
            "unsupported_media_type",
            "send the body as JSON",
            {"Content-Type": "must be application/json"},
        )
    raw = request.get_data(cache=True)
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(
            400,
            "invalid_json",
            "request body is nested too deeply",
            {"body": f"at most {MAX_JSON_DEPTH} levels of nesting"},
        ) from None
    except ValueError as exc:  # JSONDecodeError, a bad encoding, NaN/Infinity
        raise ApiError(
            400,
            "invalid_json",
            "request body is not valid JSON",
            {"body": f"not valid JSON: {exc}"},
        ) from None
    problems = _unstorable(data)
    if problems:
        raise ApiError(422, code, message, problems)
    return data
