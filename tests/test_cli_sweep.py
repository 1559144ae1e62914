"""`trainyard sweep` against a live server: create from YAML, list, show (trials best
first, parameters as columns), cancel, resume; a bad space prints the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from server.cli import main
from shared.settings import Settings
from shared.sweep_controller import tick
from tests.conftest import TestUsers

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)

SPEC = """
name: lr-grid
method: grid
metric: val_accuracy
parallelism: 2
base:
  kind: train
  dataset: {name: digits}
  model: {name: mlp}
  optimizer: {name: adam}  # the objects the space reaches into
  epochs: 2
space:
  optimizer.lr: choice([0.001, 0.01])
  model.params.activation: choice([relu, gelu])
"""


@pytest.fixture
def cli(live_server: str, users: TestUsers):  # type: ignore[no-untyped-def]
    def run(*args: str) -> Result:
        # A wide terminal: rich fits the table to the width and would elide headers.
        env = {"TRAINYARD_URL": live_server, "TRAINYARD_TOKEN": users.alice.token,
               "COLUMNS": "200"}  # fmt: skip
        return CliRunner().invoke(main, list(args), env=env)

    return run


def test_create_list_show_cancel_resume(cli, tmp_path: Path, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    spec = tmp_path / "sweep.yaml"
    spec.write_text(SPEC)
    made = cli("sweep", "create", str(spec))
    assert made.exit_code == 0, made.output
    assert "Created sweep 1 (grid, up to 4 trials, 2 at a time, max val_accuracy)" in made.output
    tick(settings, 1, "test", lambda job: None)  # the reconciler's controller, once
    listed = cli("sweep", "list")
    assert listed.exit_code == 0 and "lr-grid" in listed.output and "0/4" in listed.output
    shown = cli("sweep", "show", "1")
    assert shown.exit_code == 0, shown.output
    for column in ("optimizer.lr", "model.params.activation", "queued", "0.001", "relu"):
        assert column in shown.output, (column, shown.output)
    assert cli("sweep", "cancel", "1").output.strip() == "Sweep 1 cancelled."
    assert "cancelled" in cli("sweep", "show", "1").output
    again = cli("sweep", "cancel", "1")
    assert again.exit_code == 1 and "is cancelled" in again.output
    assert cli("sweep", "resume", "1").output.strip() == "Sweep 1 resumed."


def test_a_bad_space_is_refused_naming_the_parameter(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = tmp_path / "bad.yaml"
    spec.write_text(SPEC.replace("choice([0.001, 0.01])", "choice([0.001, 100])"))
    result = cli("sweep", "create", str(spec))
    assert result.exit_code == 1
    assert "space.optimizer.lr" in result.output
    assert cli("sweep", "list").output.strip() == "No sweeps."
