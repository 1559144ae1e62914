"""The Python a script job runs with: the worker's own, or one built for its bundle.

A bundle with a `requirements.txt` at its top gets a virtual environment of its own,
built once per host for each requirements text (plus the worker's Python, so a worker
upgrade builds afresh) under `<home>/script-envs/<key>/`, and reused by every later job
with the same text. The environment is layered on the worker's: it has no packages of
its own except what the requirements add or override, and a module it runs at start-up
(`_trainyard_layer.py`, from a .pth file) appends the worker's site-packages after its
own, so torch, numpy and `worker.sdk` come from the worker while a pinned package in the
requirements wins. (`venv --system-site-packages` run from inside the worker's venv
would give the *base* interpreter's packages, not the worker venv's: hence the .pth.)

pip is the worker's own, run by the environment's Python (which finds it through the
layer, just as `pip --python <env>` would, but as one process: see _PIP_LAUNCHER), so
environments need no pip of their own, and it reads the host's pip configuration
(pip.conf, PIP_* variables): a private index is configured once per host, not per bundle. A bundle cannot point pip elsewhere (index
options, local paths, editable installs and nested files are refused, see
`check_requirements`), and pip sees none of the worker's other environment.

Locks (fcntl, one `<key>.lock` file beside each environment): building holds it
exclusively; every process running the environment's Python holds it shared (taken by
`_trainyard_layer.py`); the pruner removes the least recently used environments beyond
`script_envs_kept` only when it gets the lock exclusively without waiting, so an
environment in use is never removed. A `ready` marker is written last: a directory
without it is a build that died half-way and is removed before building again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import venv
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO

from shared.settings import Settings
from worker.training.errors import JobCancelled, UserError

ENVS_DIRNAME = "script-envs"
REQUIREMENTS = "requirements.txt"
READY = "ready"
# Touched each time a job is handed the environment: the pruner's "last used".
LAST_USED = "last-used"
_LAYER_MODULE = "_trainyard_layer"
# pip's output kept in the error of a failed install.
_TAIL_LINES = 40
_TAIL_LINE_CHARS = 500
# An environment handed to a job this recently is never pruned: between the hand-out and
# the moment the job's Python takes its shared lock there is nothing else to see.
PRUNE_GRACE_SECONDS = 600.0
_KEY_CHARS = 20
_KEY_RE = re.compile(rf"^[0-9a-f]{{{_KEY_CHARS}}}$")

# What of the worker's environment pip gets: where it finds its configuration, cache,
# proxies and certificates, and the host's PIP_* settings. Nothing else (no TRAINYARD_*
# secret, no cloud credentials) is any of pip's business.
_PIP_ENV_NAMES = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "XDG_CONFIG_HOME",
        "XDG_CONFIG_DIRS",
        "XDG_CACHE_HOME",
        "NETRC",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "all_proxy",
    }
)
_PIP_ENV_PREFIXES = ("PIP_", "LC_")
# PIP_* settings that would install somewhere other than the environment being built.
_PIP_ENV_DROPPED = frozenset({"PIP_TARGET", "PIP_PREFIX", "PIP_ROOT", "PIP_USER", "PIP_PYTHON"})

# Options a bundle's requirements.txt may use: they change what is picked, not where
# from. Per-requirement options come after the requirement on its line.
_ALLOWED_OPTIONS = frozenset(
    {"--pre", "--prefer-binary", "--only-binary", "--no-binary", "--require-hashes"}
)
_ALLOWED_REQUIREMENT_OPTIONS = frozenset({"--hash", "--config-settings"})
_OPTIONS_WITH_VALUE = frozenset({"--only-binary", "--no-binary", "--hash", "--config-settings"})
_REFUSED_OPTIONS = {
    ("-e", "--editable"): "editable installs point at the bundle's directory, which "
    "lasts one attempt; name the package, or keep its code in the bundle (the bundle is "
    "on the script's import path)",
    ("-r", "--requirement", "-c", "--constraint"): "nested requirement and constraint "
    "files are not part of the text that names the environment; put every line in "
    "requirements.txt",
    (
        "-i",
        "--index-url",
        "--extra-index-url",
        "-f",
        "--find-links",
        "--no-index",
        "--trusted-host",
    ): "the worker host's pip configuration says where packages come from (an extra "
    "index in a bundle could shadow the host's private packages)",
}
_ARCHIVE_SUFFIXES = (".whl", ".zip", ".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tar.xz", ".txz")
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Runs pip in the environment's Python so that it dies with the worker (PR_SET_PDEATHSIG
# survives the exec): a pip left running by a SIGKILLed worker would go on writing into
# the directory that the next build of the same environment starts afresh. Not
# `pip --python`: that runs the installing pip as a child of the first, which would
# outlive it. argv[1] is the worker's pid: if it died before the prctl, nobody is there
# to kill us.
_PIP_LAUNCHER = """\
import ctypes, os, signal, sys
prctl = getattr(ctypes.CDLL(None), "prctl", None)
if prctl is not None:
    prctl(1, signal.SIGKILL, 0, 0, 0)
if os.getppid() != int(sys.argv[1]):
    sys.exit("trainyard: the worker is gone")
os.execv(sys.executable, [sys.executable, "-m", "pip", *sys.argv[2:]])
"""
# pip's own comment rule: '#' at the start of a line or after whitespace.
_COMMENT_RE = re.compile(r"(^|\s+)#.*$")


class ScriptEnvError(UserError):
    """The bundle's requirements cannot be installed (refused, or pip failed or timed
    out). The job's own problem: the same requirements would fail on the next attempt."""


def python_for_bundle(
    bundle_dir: Path,
    settings: Settings,
    note: Callable[[str], None],
    *,
    cancelled: Callable[[], bool] | None = None,
) -> Path:
    """The interpreter to run `bundle_dir`'s script with.

    `note` receives progress lines for the job log. `cancelled`, when given, is polled
    while pip runs; once it says True pip is stopped and JobCancelled raised. Raises
    ScriptEnvError when the requirements are refused or pip fails; whatever goes wrong,
    no half-built environment is left behind.
    """
    requirements_file = bundle_dir / REQUIREMENTS
    if not requirements_file.is_file():
        return Path(sys.executable)
    lines = check_requirements(_read_requirements(requirements_file))
    if not any(not line.startswith("-") for line in lines):
        note(f"{REQUIREMENTS} names no package: running with the worker's Python")
        return Path(sys.executable)
    key = env_key(lines)
    root = settings.home.resolve() / ENVS_DIRNAME
    root.mkdir(parents=True, exist_ok=True)
    env_dir = root / key
    lock_path = root / f"{key}.lock"

    # Shared first: any number of jobs may check a ready environment at once, and a job
    # already running in it (holding it shared) does not hold up the next one.
    with _locked(lock_path, fcntl.LOCK_SH, lambda: _waiting(note, key)):
        if _reuse(env_dir, note):
            return env_python(env_dir)
    with _locked(lock_path, fcntl.LOCK_EX, lambda: _waiting(note, key)):
        # Another job may have built it while we waited for the lock.
        if _reuse(env_dir, note):
            return env_python(env_dir)
        _build(env_dir, lock_path, lines, settings, note, cancelled)
        _touch(env_dir / LAST_USED)
    try:
        removed = prune_envs(root, settings.script_envs_kept)
    except OSError as exc:  # housekeeping: the job has its environment either way
        note(f"could not remove old environments: {exc}")
    else:
        if removed:
            names = ", ".join(removed)
            note(f"removed {len(removed)} least recently used environment(s): {names}")
    return env_python(env_dir)


def check_requirements(text: str) -> list[str]:
    """The requirement lines of a requirements.txt, comments and blank lines dropped and
    continuations joined; ScriptEnvError for a line the worker refuses to give pip: one
    that points pip somewhere the host did not configure (an index, a local path, an
    editable install, another file) or expands a variable (pip would fill it from its
    own environment, which holds the host's index credentials)."""
    lines: list[str] = []
    for number, raw in _logical_lines(text):
        line = _COMMENT_RE.sub("", raw).strip()
        if not line:
            continue
        problem = _line_problem(line)
        if problem:
            raise ScriptEnvError(f"{REQUIREMENTS} line {number}: {line!r}: {problem}")
        lines.append(line)
    return lines


def env_key(lines: list[str]) -> str:
    """The environment's name: its requirements and the Python that runs it. The worker's
    prefix is in it so that a worker installed elsewhere (or upgraded into a new venv)
    does not layer onto an environment built for another."""
    digest = hashlib.sha256()
    for part in ("trainyard-script-env 1", sys.version, sys.prefix, *lines):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:_KEY_CHARS]


def env_python(env_dir: Path) -> Path:
    return env_dir / "bin" / "python"


def prune_envs(root: Path, keep: int, *, grace_seconds: float = PRUNE_GRACE_SECONDS) -> list[str]:
    """Remove environments beyond the `keep` most recently used, and builds that died
    half-way. Skips any environment a process is running in or building (its lock is
    held) and any handed out within `grace_seconds`. Returns the keys removed."""
    ready: list[tuple[float, str]] = []
    broken: list[str] = []
    for entry in _env_dirs(root):
        if _is_ready(entry):
            ready.append((_last_used(entry), entry.name))
        else:
            broken.append(entry.name)
    ready.sort(reverse=True)
    candidates = [key for _, key in ready[keep:]] + broken
    removed = []
    for key in candidates:
        if _remove_unused(root, key, grace_seconds):
            removed.append(key)
    return removed


def pip_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """What of `environ` pip is run with (see _PIP_ENV_NAMES)."""
    env = {
        name: value
        for name, value in environ.items()
        if (name in _PIP_ENV_NAMES or name.startswith(_PIP_ENV_PREFIXES))
        and name not in _PIP_ENV_DROPPED
    }
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


# -- requirements lines ---------------------------------------------------------------


def _read_requirements(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ScriptEnvError(f"{REQUIREMENTS} is not UTF-8 text: {exc}") from None


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, text) with backslash continuations joined, as pip reads."""
    parts: list[str] = []
    start = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not parts:
            start = number
        if line.endswith("\\") and not _COMMENT_RE.search(line):
            parts.append(line[:-1])
            continue
        parts.append(line)
        yield start, "".join(parts)
        parts = []
    if parts:
        yield start, "".join(parts)


def _line_problem(line: str) -> str | None:
    if "${" in line:
        return "environment variables are not expanded in a bundle's requirements"
    tokens = line.split()
    if tokens[0].startswith("-"):
        return _options_problem(tokens, _ALLOWED_OPTIONS)
    # As pip splits a line: the requirement, then its per-requirement options.
    first_option = next((i for i, t in enumerate(tokens) if t.startswith("-")), len(tokens))
    problem = _requirement_problem(" ".join(tokens[:first_option]))
    return problem or _options_problem(tokens[first_option:], _ALLOWED_REQUIREMENT_OPTIONS)


def _options_problem(tokens: list[str], allowed: frozenset[str]) -> str | None:
    skip_value = False
    for token in tokens:
        if skip_value:
            skip_value = False
            continue
        name = _option_name(token)
        for names, why in _REFUSED_OPTIONS.items():
            if name in names:
                return f"{name} is not allowed: {why}"
        if name not in allowed:
            return f"{name or token} is not allowed in a bundle's {REQUIREMENTS}"
        skip_value = name in _OPTIONS_WITH_VALUE and "=" not in token
    return None


def _option_name(token: str) -> str:
    if token.startswith("--"):
        return token.split("=", 1)[0]
    if token.startswith("-"):
        return token[:2]  # -e./x, -ihttps://... : pip accepts the value attached
    return ""


def _requirement_problem(requirement: str) -> str | None:
    name, at, reference = requirement.partition("@")
    if at and not _looks_local(name):
        target = reference.strip()  # PEP 508 direct reference: name @ url
    elif _URL_RE.match(requirement):
        target = requirement
    else:
        if _looks_local(requirement.split(";", 1)[0]):
            return (
                "local paths are not allowed: the environment is shared by every bundle "
                "with the same requirements, so it cannot depend on one bundle's files; "
                "put the package on the host's index or keep its code in the bundle"
            )
        return None
    if target.lower().startswith("file:"):
        return "file: URLs are not allowed: a bundle's requirements name packages by name or URL"
    return None


def _looks_local(text: str) -> bool:
    text = re.sub(r"\[[^\]]*\]", "", text).strip()  # extras: ./pkg[cli]
    return (
        text.startswith((".", "/", "~"))
        or "/" in text
        or "\\" in text
        or text.lower().endswith(_ARCHIVE_SUFFIXES)
    )


# -- building -------------------------------------------------------------------------


def _build(
    env_dir: Path,
    lock_path: Path,
    lines: list[str],
    settings: Settings,
    note: Callable[[str], None],
    cancelled: Callable[[], bool] | None,
) -> None:
    """Create the environment at `env_dir` (the caller holds its lock exclusively).
    Built in place, not in a temporary directory renamed at the end: a venv's scripts
    carry their absolute path."""
    if env_dir.exists():
        note(f"removing environment {env_dir.name}: an earlier build did not finish")
        _remove_tree(env_dir)
    count = f"{len(lines)} requirement{'s' if len(lines) != 1 else ''}"
    note(f"building environment {env_dir.name} for requirements.txt ({count})…")
    started = time.monotonic()
    try:
        _create_layered_venv(env_dir, lock_path)
        (env_dir / REQUIREMENTS).write_text("\n".join(lines) + "\n")
        _pip_install(env_dir, settings.script_env_install_seconds, cancelled)
        seconds = time.monotonic() - started
        _write_ready(env_dir, lines, seconds)
    except BaseException:
        # Whatever stopped it (pip's failure, a full disk, the worker shutting down),
        # no half environment stays behind for the next job to trip over.
        _remove_tree(env_dir)
        raise
    note(f"environment {env_dir.name} built in {seconds:.1f} s")


def _create_layered_venv(env_dir: Path, lock_path: Path) -> None:
    # In-process: venv creates from sys._base_executable, the interpreter the worker's
    # own venv was made from, and without pip it runs nothing.
    venv.EnvBuilder(with_pip=False, symlinks=True, clear=False).create(env_dir)
    # The venv scheme (3.11+) whatever the host's default is (Debian's posix_local
    # would name dist-packages under local/).
    scheme = "venv" if "venv" in sysconfig.get_scheme_names() else "posix_prefix"
    paths = {"base": str(env_dir), "platbase": str(env_dir)}
    site_dir = Path(sysconfig.get_path("purelib", scheme, vars=paths))
    if not site_dir.is_dir():
        raise ScriptEnvError(f"the new environment has no site-packages at {site_dir}")
    worker_dirs = list(dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")))
    (site_dir / f"{_LAYER_MODULE}.py").write_text(_layer_module(worker_dirs, lock_path))
    (site_dir / f"{_LAYER_MODULE}.pth").write_text(f"import {_LAYER_MODULE}\n")


def _layer_module(worker_dirs: list[str], lock_path: Path) -> str:
    return f'''"""Written by Trainyard (worker/script_env.py): the worker's packages come after this
environment's own, and every process running here holds the environment's lock shared,
so the pruner leaves it alone while a job uses it."""

import fcntl
import os
import site

for _dir in {worker_dirs!r}:
    site.addsitedir(_dir)  # also runs the .pth files there (the editable install's)

try:
    _lock_fd = os.open({str(lock_path)!r}, os.O_RDONLY)
    # Non-blocking: while the environment is being built its builder holds the lock
    # exclusively, and pip runs in this interpreter.
    fcntl.flock(_lock_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
except OSError:
    pass
'''


def _pip_install(env_dir: Path, timeout: float, cancelled: Callable[[], bool] | None) -> None:
    command = [
        str(env_python(env_dir)),
        "-c",
        _PIP_LAUNCHER,
        str(os.getpid()),
        "install",
        "--no-input",
        "--progress-bar",
        "off",
        "--no-warn-script-location",
        "--root-user-action",
        "ignore",
        "-r",
        str(env_dir / REQUIREMENTS),
    ]
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=pip_environment(os.environ),
            cwd=env_dir,
            start_new_session=True,  # so a timeout stops pip's build subprocesses too
        )
        try:
            returncode = _wait(process, timeout, cancelled)
        finally:
            if process.poll() is None:
                _kill_group(process)
        if returncode == 0:
            return
        tail = _tail(output)
    if returncode is None:
        raise ScriptEnvError(
            f"installing {REQUIREMENTS} took longer than {timeout:g} s "
            f"(TRAINYARD_SCRIPT_ENV_INSTALL_SECONDS); pip's last lines:\n{tail}"
        )
    raise ScriptEnvError(f"installing {REQUIREMENTS} failed (pip exit {returncode}):\n{tail}")


def _wait(
    process: subprocess.Popen[bytes], timeout: float, cancelled: Callable[[], bool] | None
) -> int | None:
    """pip's exit status, or None when it ran past `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return process.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            pass
        if cancelled is not None and cancelled():
            raise JobCancelled("cancelled while installing requirements.txt")
        if time.monotonic() >= deadline:
            return None


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _tail(output: IO[bytes]) -> str:
    output.seek(0)
    lines: deque[str] = deque(maxlen=_TAIL_LINES)
    for raw in output:
        line = raw.decode("utf-8", "replace").rstrip()
        if line:
            lines.append(line[:_TAIL_LINE_CHARS])
    return "\n".join(lines) or "(pip printed nothing)"


def _write_ready(env_dir: Path, lines: list[str], seconds: float) -> None:
    info = {
        "built_at": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "install_seconds": round(seconds, 1),
        "python": sys.version.split()[0],
        "worker_prefix": sys.prefix,
        "requirements": len(lines),
    }
    tmp = env_dir / f".{READY}.tmp"
    tmp.write_text(json.dumps(info) + "\n")
    os.replace(tmp, env_dir / READY)


# -- state on disk --------------------------------------------------------------------


def _reuse(env_dir: Path, note: Callable[[str], None]) -> bool:
    """Hand out `env_dir` if it is built (the caller holds its lock)."""
    if not _is_ready(env_dir):
        return False
    _touch(env_dir / LAST_USED)
    note(f"reusing environment {env_dir.name} for requirements.txt ({_describe(env_dir)})")
    return True


def _is_ready(env_dir: Path) -> bool:
    return (env_dir / READY).is_file() and env_python(env_dir).exists()


def _describe(env_dir: Path) -> str:
    try:
        info = json.loads((env_dir / READY).read_text())
        return f"built {info['built_at']} in {info['install_seconds']} s"
    except (OSError, ValueError, KeyError):
        return "built earlier"


def _last_used(env_dir: Path) -> float:
    for name in (LAST_USED, READY):
        with contextlib.suppress(OSError):
            return (env_dir / name).stat().st_mtime
    return 0.0


def _touch(path: Path) -> None:
    path.touch()
    os.utime(path)  # touch() on an existing file may keep its mtime on some systems


def _env_dirs(root: Path) -> list[Path]:
    try:
        return [p for p in root.iterdir() if _KEY_RE.match(p.name) and p.is_dir()]
    except FileNotFoundError:
        return []


def _remove_unused(root: Path, key: str, grace_seconds: float) -> bool:
    lock_path = root / f"{key}.lock"
    env_dir = root / key
    try:
        fd = _acquire(lock_path, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # a job is running in it, or someone is building or checking it
    try:
        if _is_ready(env_dir) and time.time() - _last_used(env_dir) < grace_seconds:
            return False
        _remove_tree(env_dir)
        # Removed while held: a process that opened the old file sees it is gone after
        # locking (_acquire) and opens the new one.
        lock_path.unlink(missing_ok=True)
        return not env_dir.exists()
    finally:
        os.close(fd)


def _remove_tree(env_dir: Path) -> None:
    # The marker first: a removal cut short leaves a directory that reads as unfinished.
    (env_dir / READY).unlink(missing_ok=True)
    shutil.rmtree(env_dir, ignore_errors=True)


@contextlib.contextmanager
def _locked(path: Path, operation: int, on_wait: Callable[[], None]) -> Iterator[None]:
    try:
        fd = _acquire(path, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        on_wait()
        fd = _acquire(path, operation)
    try:
        yield
    finally:
        os.close(fd)


def _acquire(path: Path, operation: int) -> int:
    """An fd of `path` locked with `operation`, retried when the pruner removed the file
    between our open and our lock (we would hold a lock on a file nobody else sees)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, operation)
            held = os.fstat(fd)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
        except BaseException:
            os.close(fd)
            raise
        if current is not None and (current.st_ino, current.st_dev) == (held.st_ino, held.st_dev):
            return fd
        os.close(fd)


def _waiting(note: Callable[[str], None], key: str) -> None:
    note(f"waiting for another job building environment {key}…")
