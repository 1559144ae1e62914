"""`trainyard up` keeps TRAINYARD_HOME private (issue 11, "Leaks"): run as a real
process under umask 022, the home is 0700 and everything it and its children create
(SQLite database and its WAL/SHM, secret key, CLI token, admin password, uploads,
checkpoints, job logs, the embedded Redis's files) is readable by the owner only; an
existing home open to others draws a warning at start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from server.cli.local.private_home import make_home_private
from tests.helpers import train_spec
from tests.test_up import REPO, Up, _free_port

pytestmark = pytest.mark.integration

CSV = "a,b,label\n" + "".join(f"{i},{i % 7},{i % 2}\n" for i in range(40))


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def walk(root: Path) -> list[Path]:
    found = [root]
    for parent, dirs, files in os.walk(root):
        found += [Path(parent, name) for name in dirs + files]
    return found


def open_to_others(root: Path) -> list[str]:
    out = []
    for path in walk(root):
        with contextlib.suppress(FileNotFoundError):  # a temporary file renamed meanwhile
            mode = path.lstat().st_mode
            if not stat.S_ISLNK(mode) and mode & 0o077:
                out.append(f"{path.relative_to(root)} {stat.S_IMODE(mode):04o}")
    return out


def wait_finished(base: str, headers: dict[str, str], job_id: int, up: Up) -> dict:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        job = requests.get(f"{base}/api/v1/jobs/{job_id}", headers=headers, timeout=5).json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    pytest.fail(f"job {job_id} did not finish:\n{up.output()}")


def test_up_under_umask_022_keeps_every_file_private(tmp_path: Path) -> None:
    home = tmp_path / "home"
    port = _free_port()
    with umask(0o022):  # what most shells have: files 0644, directories 0755
        up = Up(home, port, tmp_path / "up.log")
    try:
        up.wait_healthy()
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {(home / 'cli-token').read_text().strip()}"}
        upload = requests.post(f"{base}/api/v1/uploads", headers=headers, timeout=30,
                               files={"file": ("points.csv", CSV.encode(), "text/csv")})  # fmt: skip
        assert upload.status_code == 201, upload.text
        spec = train_spec(model={"name": "mlp", "params": {"hidden": 8, "layers": 1}}, epochs=1)
        resp = requests.post(f"{base}/api/v1/jobs", headers=headers, json=spec, timeout=30)
        assert resp.status_code == 201, resp.text
        job = wait_finished(base, headers, resp.json()["id"], up)
        assert job["state"] == "succeeded", job

        # While it runs: the database's WAL and SHM files exist and are private too.
        names = {p.name for p in walk(home)}
        assert {"trainyard.db", "secret-key", "cli-token", "admin-password", "job.log"} <= names
        assert {"trainyard.db-wal", "trainyard.db-shm"} <= names, sorted(names)
        assert any(n.endswith(".pt") for n in names) and any(p.parent.name == "uploads"
                                                            for p in walk(home))  # fmt: skip
        assert list((home / "redis").iterdir())
        assert open_to_others(home) == []
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
    finally:
        if up.proc.poll() is None:
            up.proc.send_signal(signal.SIGTERM)
            try:
                up.proc.wait(30)
            except subprocess.TimeoutExpired:
                up.kill_everything()
    assert open_to_others(home) == [], up.output()


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
