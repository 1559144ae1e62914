"""Query strings as pydantic models: unknown or repeated parameters and bad values are 400s.

The same models describe the parameters in the OpenAPI document.
"""

from __future__ import annotations

from typing import Literal, TypeVar

from flask import request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.errors import ApiError
from shared.state_machine import ALL_STATES

M = TypeVar("M", bound=BaseModel)

JobStateName = Literal["queued", "running", "succeeded", "failed", "cancelled"]
assert set(JobStateName.__args__) == set(ALL_STATES)  # type: ignore[attr-defined]


class QueryModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoQuery(QueryModel):
    """An endpoint that takes no query parameters."""


class JobListQuery(QueryModel):
    state: JobStateName | None = Field(default=None, description="only jobs in this state")
    kind: Literal["train", "evaluate"] | None = None
    model: str | None = Field(default=None, max_length=64, description="model name")
    dataset: str | None = Field(default=None, max_length=64, description="dataset name")
    owner: str | None = Field(
        default=None, max_length=64, description="username (admins; members see their own)"
    )
    limit: int = Field(default=50, ge=1, le=200, description="page size")
    before: int | None = Field(
        default=None, ge=1, le=2**62, description="keyset cursor: `next_before` of the last page"
    )


class MetricsQuery(QueryModel):
    keys: str | None = Field(
        default=None, max_length=2000, description="comma-separated metric keys; all when absent"
    )
    max_points: int = Field(
        default=2000, ge=2, le=100_000, description="downsample each series to at most this"
    )


class LogQuery(QueryModel):
    tail: int = Field(default=200, ge=1, le=10_000, description="last N lines")


class TokenListQuery(QueryModel):
    all: bool = Field(default=False, description="every user's tokens (admins only)")


def parse_query(model: type[M]) -> M:
    """Validate request.args against `model`; a 400 names every bad parameter."""
    repeated = [k for k, values in request.args.lists() if len(values) > 1]
    if repeated:
        raise ApiError(
            400,
            "invalid_parameter",
            "query parameters may be given once",
            {k: "given more than once" for k in repeated},
        )
    try:
        return model.model_validate(request.args.to_dict())
    except ValidationError as exc:
        fields = {}
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]) or "query"
            fields[name] = (
                "unknown query parameter" if err["type"] == "extra_forbidden" else err["msg"]
            )
        raise ApiError(400, "invalid_parameter", "invalid query parameters", fields) from None
