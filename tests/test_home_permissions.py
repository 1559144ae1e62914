"""`trainyard up` keeps TRAINYARD_HOME private (issue 11, "Leaks"): an existing home
open to others draws a warning at start; a new one is made 0700. That a real `up` under
umask 022 keeps everything it and its children create private is checked by
tests/test_up.py's run (one `up` start serves both).
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from server.cli.local.private_home import make_home_private
from tests.test_up import REPO

pytestmark = pytest.mark.integration


def test_up_warns_when_an_existing_home_is_open_to_others(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "trainyard.db").write_text("")
    os.chmod(home, 0o755)
    os.chmod(home / "trainyard.db", 0o644)
    # The port is taken, so `up` stops right after its checks: the warning comes first.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINYARD_")}
        env["TRAINYARD_HOME"] = str(home)
        done = subprocess.run(
            [sys.executable, "-m", "server.cli", "up", "--port", str(busy.getsockname()[1])],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert f"TRAINYARD_HOME {home} is open to other users" in output
    assert f"{home} (0755)" in output and f"{home / 'trainyard.db'} (0644)" in output
    assert f"chmod -R go-rwx {home}" in output
    # Warned, not changed behind the owner's back.
    assert stat.S_IMODE(home.stat().st_mode) == 0o755


def test_a_private_home_draws_no_warning(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        assert make_home_private(tmp_path / "new" / "home") is None
        assert os.umask(0o022) == 0o077  # `up`'s children inherit this
        assert stat.S_IMODE((tmp_path / "new" / "home").stat().st_mode) == 0o700
        assert make_home_private(tmp_path / "new" / "home") is None
    finally:
        os.umask(old)
