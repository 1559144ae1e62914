"""Base class for every user-facing schema (JobSpec parts, model and dataset params)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Unknown fields are errors: a typo in a spec must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


class NoParams(StrictModel):
    """For catalog entries that take no parameters."""


class CatalogError(ValueError):
    """A spec that parses but cannot work: `field` is the dotted name to blame."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message
