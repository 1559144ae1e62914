"""Settings for the CLI: shared.settings, with a bad variable reported as a usage error."""

from __future__ import annotations

import click
from pydantic import ValidationError

from shared.settings import Settings, load_settings


def cli_settings() -> Settings:
    """The TRAINYARD_* settings; a pydantic traceback would bury which variable is wrong."""
    try:
        return load_settings()
    except ValidationError as exc:
        raise click.ClickException(f"invalid TRAINYARD_* environment variable:\n{exc}") from None
