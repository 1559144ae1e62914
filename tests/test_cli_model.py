"""`trainyard model` against a live server: promote, list, show (versions and stage
history), stage; a job that cannot be registered prints the field and exits 1."""

from __future__ import annotations

import hashlib

import pytest
from click.testing import CliRunner, Result

from server.cli import main
from shared.settings import Settings
from tests.conftest import TestUsers
from tests.test_model_registry import finished_job, model_bytes

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.fixture
def cli(live_server: str, users: TestUsers):  # type: ignore[no-untyped-def]
    def run(*args: str) -> Result:
        # A wide terminal: rich fits the table to the width and would elide columns.
        env = {"TRAINYARD_URL": live_server, "TRAINYARD_TOKEN": users.alice.token,
               "COLUMNS": "200"}  # fmt: skip
        return CliRunner().invoke(main, list(args), env=env)

    return run


def test_promote_list_show_stage(cli, settings: Settings, db_url: str, users: TestUsers) -> None:  # type: ignore[no-untyped-def]
    first = finished_job(db_url, settings, users.alice.id)
    second = finished_job(db_url, settings, users.alice.id, kind="quantize")
    digest = hashlib.sha256(model_bytes(settings, first, "best.pt")).hexdigest()

    made = cli("model", "promote", str(first), "--name", "digits-cnn", "--stage", "production",
               "--description", "the baseline")  # fmt: skip
    assert made.exit_code == 0, made.output
    assert made.output.strip() == (
        f"Registered job {first} as digits-cnn version 1 (production): best.pt, 300 B, "
        f"sha256 {digest}"
    )
    assert cli("model", "promote", str(second), "-n", "digits-cnn").exit_code == 0

    listed = cli("model", "list")
    assert listed.exit_code == 0, listed.output
    row = next(line for line in listed.output.splitlines() if "digits-cnn" in line)
    assert row.split("│")[1:6] == [" digits-cnn ", " v1         ", " -       ", " v2     ",
                                   " 2        "]  # fmt: skip

    staged = cli("model", "stage", "digits-cnn", "2", "production", "--note", "smaller")
    assert staged.output.strip() == "digits-cnn version 2 is in production."
    shown = cli("model", "show", "digits-cnn")
    assert shown.exit_code == 0, shown.output
    assert "production: version 2" in shown.output
    # The version's description is its registration's note in the history.
    for expected in ("quantize", "model.pt", digest[:12], "none -> production", "smaller",
                     "the baseline",
                     "production -> archived", "replaced in production by version 2",
                     "registered (production)"):  # fmt: skip
        assert expected in shown.output, (expected, shown.output)


def test_refusals_print_the_field(cli, settings: Settings, db_url: str, users: TestUsers) -> None:  # type: ignore[no-untyped-def]
    failed = finished_job(db_url, settings, users.alice.id, state="failed")
    refused = cli("model", "promote", str(failed), "--name", "m")
    assert refused.exit_code == 1
    assert f"job_id: job {failed} is failed; only a succeeded job's model" in refused.output
    missing = cli("model", "show", "nothing-here")
    assert missing.exit_code == 1 and "name: no such model" in missing.output
    bad_stage = cli("model", "stage", "m", "1", "gold")
    assert bad_stage.exit_code == 2  # click's own usage error: the choice is checked first
    assert cli("model", "list").output.strip() == "No registered models."
