"""Per-bundle environments (worker/script_env.py), built by the real pip from packages
this test writes itself: a directory of wheels and sdists that pip is pointed at with
PIP_NO_INDEX and PIP_FIND_LINKS, as a host with a local mirror would be. No network."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest

from shared.settings import Settings, load_settings
from worker.failures import classify
from worker.script_env import (
    LAST_USED,
    READY,
    ScriptEnvError,
    check_requirements,
    env_python,
    pip_environment,
    prune_envs,
    python_for_bundle,
)
from worker.training.errors import JobCancelled, UserError

# A package the worker's venv has and nothing in Trainyard or its tests imports: a
# requirement pins a different version of it, which must win in the bundle's environment
# and leave the worker's copy alone.
OVERRIDDEN = "pyparsing"


def write_wheel(directory: Path, name: str, version: str, code: str) -> Path:
    """A pure-Python wheel, its RECORD hashes and all, as pip requires."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": code,
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: trainyard-tests\nRoot-Is-Purelib: true\n"
            "Tag: py3-none-any\n"
        ),
    }
    path = directory / f"{name}-{version}-py3-none-any.whl"
    record = []
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            data = text.encode()
            archive.writestr(member, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append(f"{member},sha256={digest.decode()},{len(data)}")
        record.append(f"{dist_info}/RECORD,,")
        archive.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    return path


def write_sdist(directory: Path, name: str, version: str, setup_prelude: str) -> Path:
    """A setup.py sdist whose setup.py runs `setup_prelude` first (pip runs it to build)."""
    root = f"{name}-{version}"
    files = {
        f"{root}/setup.py": (
            f"{setup_prelude}\nfrom setuptools import setup\n"
            f"setup(name={name!r}, version={version!r}, packages=[{name!r}])\n"
        ),
        f"{root}/PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{root}/{name}/__init__.py": "",
    }
    path = directory / f"{root}.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for member, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(member)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("find-links")
    for version in ("1.0", "2.0"):
        write_wheel(directory, "tinypkg", version, f"VERSION = {version!r}\n")
    write_wheel(directory, OVERRIDDEN, "99.0", "__version__ = '99.0'\nFROM_BUNDLE_ENV = True\n")
    return directory


@pytest.fixture
def offline_pip(monkeypatch: pytest.MonkeyPatch, packages: Path) -> Path:
    """The host's pip configuration, as an operator would set it: no index, a local
    directory of packages."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(packages))
    return packages


def make_bundle(path: Path, requirements: str | None) -> Path:
    path.mkdir(parents=True)
    (path / "train.py").write_text("print('hello')\n")
    if requirements is not None:
        (path / "requirements.txt").write_text(requirements)
    return path


def settings_for(tmp_path: Path, **overrides: object) -> Settings:
    return load_settings(home=tmp_path / "home", **overrides)


def envs_root(settings: Settings) -> Path:
    return settings.home.resolve() / "script-envs"


def env_dirs(settings: Settings) -> list[Path]:
    root = envs_root(settings)
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []


def run_in(python: Path, code: str) -> str:
    done = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_bundle_without_requirements_runs_with_the_workers_python(tmp_path: Path) -> None:
    notes: list[str] = []
    bundle = make_bundle(tmp_path / "bundle", None)
    settings = settings_for(tmp_path)
    assert python_for_bundle(bundle, settings, notes.append) == Path(sys.executable)
    assert notes == []
    assert not envs_root(settings).exists()


def test_a_requirements_file_naming_no_package_needs_no_env(tmp_path: Path) -> None:
    notes: list[str] = []
    bundle = make_bundle(tmp_path / "bundle", "# nothing yet\n\n--prefer-binary\n")
    settings = settings_for(tmp_path)
    assert python_for_bundle(bundle, settings, notes.append) == Path(sys.executable)
    assert notes == ["requirements.txt names no package: running with the worker's Python"]
    assert not envs_root(settings).exists()


def test_env_is_layered_on_the_workers_and_reused(tmp_path: Path, offline_pip: Path) -> None:
    notes: list[str] = []
    bundle = make_bundle(
        tmp_path / "bundle", f"# pinned for the test\ntinypkg==2.0\n{OVERRIDDEN}==99.0\n"
    )
    settings = settings_for(tmp_path)
    worker_version = importlib.metadata.version(OVERRIDDEN)

    python = python_for_bundle(bundle, settings, notes.append)

    [env_dir] = env_dirs(settings)
    assert python == env_python(env_dir)
    assert any("building environment" in n and "(2 requirements)" in n for n in notes)
    assert any("built in" in n for n in notes)
    found = json.loads(
        run_in(
            python,
            "import json, sys, tinypkg, torch, worker.sdk, pyparsing\n"
            "print(json.dumps({'tinypkg': tinypkg.VERSION, 'torch': torch.__version__,"
            " 'sdk': worker.sdk.__file__, 'overridden': pyparsing.__file__,"
            " 'prefix': sys.prefix}))",
        )
    )
    assert found["tinypkg"] == "2.0"
    assert found["torch"]  # from the worker's layer: the environment has no torch of its own
    assert Path(found["sdk"]).resolve() == (Path(__file__).parents[1] / "worker/sdk.py").resolve()
    # The requirement's version wins over the worker's, in the environment only.
    assert Path(found["overridden"]).is_relative_to(env_dir)
    assert Path(found["prefix"]) == env_dir
    assert importlib.metadata.version(OVERRIDDEN) == worker_version
    assert not list(env_dir.glob("lib/python*/site-packages/torch"))

    # Again: nothing is built (the ready marker is the first build's) and pip is not run.
    ready = (env_dir / READY).stat()
    notes.clear()
    started = time.monotonic()
    assert python_for_bundle(bundle, settings, notes.append) == python
    assert time.monotonic() - started < 1.0
    assert len(notes) == 1 and notes[0].startswith(f"reusing environment {env_dir.name}")
    assert (env_dir / READY).stat().st_mtime_ns == ready.st_mtime_ns
    assert (env_dir / LAST_USED).stat().st_mtime >= ready.st_mtime


def test_changed_requirements_build_a_new_env(tmp_path: Path, offline_pip: Path) -> None:
    settings = settings_for(tmp_path)
    first = python_for_bundle(
        make_bundle(tmp_path / "one", "tinypkg==1.0\n"), settings, lambda _: None
    )
    second = python_for_bundle(
        make_bundle(tmp_path / "two", "tinypkg==2.0\n"), settings, lambda _: None
    )
    assert first != second
    assert run_in(first, "import tinypkg; print(tinypkg.VERSION)").strip() == "1.0"
    assert run_in(second, "import tinypkg; print(tinypkg.VERSION)").strip() == "2.0"
    # A comment or blank line is not a different environment.
    same = python_for_bundle(
        make_bundle(tmp_path / "three", "\n# same as one\ntinypkg==1.0  # pinned\n"),
        settings,
        lambda _: None,
    )
    assert same == first


def test_concurrent_jobs_build_the_env_once(tmp_path: Path, offline_pip: Path) -> None:
    settings = settings_for(tmp_path)
    bundles = [make_bundle(tmp_path / f"b{i}", "tinypkg==1.0\n") for i in range(3)]
    start = threading.Barrier(len(bundles))
    notes: list[list[str]] = [[] for _ in bundles]
    results: list[Path | BaseException] = [Path()] * len(bundles)

    def job(i: int) -> None:
        start.wait()
        try:
            results[i] = python_for_bundle(bundles[i], settings, notes[i].append)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            results[i] = exc

    threads = [threading.Thread(target=job, args=(i,)) for i in range(len(bundles))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert all(isinstance(r, Path) for r in results), results
    assert len(set(results)) == 1
    builds = [n for job_notes in notes for n in job_notes if n.startswith("building")]
    assert len(builds) == 1, notes
    # The others waited for the build and then reused it.
    assert sum(any(n.startswith("reusing") for n in job_notes) for job_notes in notes) == 2
    assert len(env_dirs(settings)) == 1


def test_a_missing_package_fails_the_job_with_pips_error(tmp_path: Path, offline_pip: Path) -> None:
    settings = settings_for(tmp_path)
    bundle = make_bundle(tmp_path / "bundle", "tinypkg==1.0\nno-such-package-here==1.2\n")

    with pytest.raises(ScriptEnvError) as caught:
        python_for_bundle(bundle, settings, lambda _: None)

    message = str(caught.value)
    assert "No matching distribution found for no-such-package-here==1.2" in message
    assert len(message.splitlines()) <= 41  # the tail of pip's output, not all of it
    assert env_dirs(settings) == []
    # The job's own failure: not retried, recorded under its own name.
    assert isinstance(caught.value, UserError)
    failure = classify(caught.value)
    assert not failure.retriable and failure.error_type == "ScriptEnvError"


def test_pip_gets_the_hosts_pip_settings_and_no_secrets(
    tmp_path: Path, offline_pip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dumped = tmp_path / "pip-env.json"
    write_sdist(
        offline_pip,
        "envdump",
        "1.0",
        f"import json, os\njson.dump(sorted(os.environ), open({str(dumped)!r}, 'w'))",
    )
    # A host that builds sdists without fetching build tools: with the worker's setuptools.
    monkeypatch.setenv("PIP_NO_BUILD_ISOLATION", "0")
    monkeypatch.setenv("TRAINYARD_SECRET_KEY", "s" * 32)
    monkeypatch.setenv("TRAINYARD_DATABASE_URL", "postgresql://user:password@db/trainyard")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-pip")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    settings = settings_for(tmp_path)

    python = python_for_bundle(make_bundle(tmp_path / "b", "envdump\n"), settings, lambda _: None)

    names = json.loads(dumped.read_text())
    assert not [n for n in names if n.startswith(("TRAINYARD_", "AWS_", "PYTHONPATH"))]
    assert {"PIP_NO_INDEX", "PIP_FIND_LINKS", "PIP_NO_BUILD_ISOLATION", "PATH"} <= set(names)
    run_in(python, "import envdump")


def test_pip_environment_drops_settings_that_install_elsewhere() -> None:
    env = pip_environment(
        {
            "PIP_INDEX_URL": "https://mirror.example/simple",
            "PIP_TARGET": "/elsewhere",
            "PIP_USER": "1",
            "LC_ALL": "C.UTF-8",
            "HTTPS_PROXY": "http://proxy:3128",
            "TRAINYARD_REDIS_URL": "redis://secret",
            "S3_TOKEN": "x",
        }
    )
    assert env == {
        "PIP_INDEX_URL": "https://mirror.example/simple",
        "LC_ALL": "C.UTF-8",
        "HTTPS_PROXY": "http://proxy:3128",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ("-e .", "-e"),
        ("--editable=git+https://example.com/x.git#egg=x", "--editable"),
        ("./vendor/pkg", "local paths"),
        ("/opt/wheels/pkg-1.0-py3-none-any.whl", "local paths"),
        ("pkg-1.0-py3-none-any.whl", "local paths"),
        ("../sibling", "local paths"),
        ("pkg @ file:///opt/pkg", "file: URLs"),
        ("file:///opt/pkg.tar.gz", "file: URLs"),
        ("-r other.txt", "-r"),
        ("--constraint c.txt", "--constraint"),
        ("--index-url https://evil.example/simple", "--index-url"),
        ("-ihttps://evil.example/simple", "-i"),
        ("--extra-index-url=https://evil.example/simple", "--extra-index-url"),
        ("--trusted-host evil.example", "--trusted-host"),
        ("-f https://evil.example/wheels", "-f"),
        ("pkg @ https://example.com/${PIP_INDEX_URL}", "environment variables"),
        ("--no-deps", "--no-deps"),
        ("pkg==1.0 --install-option=--prefix=/x", "--install-option"),
    ],
)
def test_refused_requirement_lines(tmp_path: Path, line: str, named: str) -> None:
    with pytest.raises(ScriptEnvError, match="line 2") as caught:
        check_requirements(f"numpy\n{line}\n")
    assert named in str(caught.value)
    # Refused before anything is built.
    settings = settings_for(tmp_path)
    with pytest.raises(ScriptEnvError):
        python_for_bundle(make_bundle(tmp_path / "b", f"numpy\n{line}\n"), settings, print)
    assert env_dirs(settings) == []


def test_accepted_requirement_lines() -> None:
    text = (
        "\ufeff# comment\n"
        "numpy>=1.26,<3  # trailing comment\n"
        "\n"
        "requests[socks]==2.32.0 ; python_version >= '3.10'\n"
        "mylib @ https://files.example.com/mylib-1.0-py3-none-any.whl\n"
        "git+https://github.com/example/tool.git@v1#egg=tool\n"
        "--prefer-binary\n"
        "--only-binary :all:\n"
        "torch==2.13.0 \\\n"
        "    --hash=sha256:0123\n"
    )
    assert check_requirements(text.encode().decode("utf-8-sig")) == [
        "numpy>=1.26,<3",
        "requests[socks]==2.32.0 ; python_version >= '3.10'",
        "mylib @ https://files.example.com/mylib-1.0-py3-none-any.whl",
        "git+https://github.com/example/tool.git@v1#egg=tool",
        "--prefer-binary",
        "--only-binary :all:",
        "torch==2.13.0     --hash=sha256:0123",
    ]


def test_an_unfinished_env_is_removed_and_built_again(tmp_path: Path, offline_pip: Path) -> None:
    settings = settings_for(tmp_path)
    bundle = make_bundle(tmp_path / "b", "tinypkg==1.0\n")
    python = python_for_bundle(bundle, settings, lambda _: None)
    [env_dir] = env_dirs(settings)
    # As a worker killed in the middle of pip leaves it: no ready marker.
    (env_dir / READY).unlink()
    (env_dir / "leftover").write_text("half")
    notes: list[str] = []

    assert python_for_bundle(bundle, settings, notes.append) == python

    assert any("did not finish" in n for n in notes) and any("building" in n for n in notes)
    assert not (env_dir / "leftover").exists() and (env_dir / READY).exists()
    assert run_in(python, "import tinypkg; print(tinypkg.VERSION)").strip() == "1.0"


def fake_env(root: Path, key: str, last_used: float) -> Path:
    """An environment as the pruner sees one, without paying for a build."""
    env_dir = root / key
    (env_dir / "bin").mkdir(parents=True)
    (env_dir / "bin" / "python").write_text("")
    (env_dir / READY).write_text("{}")
    (env_dir / LAST_USED).write_text("")
    os.utime(env_dir / LAST_USED, (last_used, last_used))
    return env_dir


def test_pruning_keeps_the_newest_and_never_one_in_use(tmp_path: Path, offline_pip: Path) -> None:
    settings = settings_for(tmp_path, script_envs_kept=2)
    root = envs_root(settings)
    in_use = python_for_bundle(
        make_bundle(tmp_path / "b", "tinypkg==1.0\n"), settings, lambda _: None
    )
    in_use_dir = in_use.parent.parent
    now = time.time()
    os.utime(in_use_dir / LAST_USED, (now - 4000, now - 4000))  # the oldest of all
    old = fake_env(root, "a" * 20, now - 3000)
    newer = fake_env(root, "b" * 20, now - 2000)
    newest = fake_env(root, "c" * 20, now - 1000)
    half_built = root / ("d" * 20)
    half_built.mkdir()

    # A job running in the oldest environment: its Python holds the lock shared.
    job = subprocess.Popen(
        [str(in_use), "-c", "import sys, tinypkg; print('up', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert job.stdout is not None and job.stdout.readline() == "up\n"
        assert sorted(prune_envs(root, keep=2)) == ["a" * 20, "d" * 20]
        assert in_use_dir.exists() and newer.exists() and newest.exists()
        assert not old.exists() and not half_built.exists()
        assert not (root / f"{'a' * 20}.lock").exists()
    finally:
        job.communicate("", timeout=30)
    assert prune_envs(root, keep=2) == [in_use_dir.name]  # once the job is gone
    assert not in_use_dir.exists()

    # One handed out within the grace period is kept even past `keep`.
    os.utime(newer / LAST_USED)
    os.utime(newest / LAST_USED)
    assert prune_envs(root, keep=1) == []
    assert prune_envs(root, keep=1, grace_seconds=0) == [newer.name]


def test_building_a_new_env_prunes_the_least_recently_used(
    tmp_path: Path, offline_pip: Path
) -> None:
    settings = settings_for(tmp_path, script_envs_kept=2)
    root = envs_root(settings)
    root.mkdir(parents=True)
    now = time.time()
    oldest = fake_env(root, "a" * 20, now - 7200)
    kept = fake_env(root, "b" * 20, now - 3600)
    notes: list[str] = []

    python_for_bundle(make_bundle(tmp_path / "b", "tinypkg==2.0\n"), settings, notes.append)

    assert not oldest.exists() and kept.exists()
    assert any("removed 1 least recently used environment" in n for n in notes)
    assert len(env_dirs(settings)) == 2


@pytest.fixture
def slow_sdist(offline_pip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A package whose build hangs; its setup.py writes its pid first."""
    pid_file = tmp_path / "build.pid"
    write_sdist(
        offline_pip,
        "slowbuild",
        "1.0",
        f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(120)",
    )
    monkeypatch.setenv("PIP_NO_BUILD_ISOLATION", "0")
    return pid_file


def wait_for_pid(pid_file: Path) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if pid_file.exists() and pid_file.read_text():
            return int(pid_file.read_text())
        time.sleep(0.1)
    raise AssertionError("the build never started")


def is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie nobody reaped yet is gone for our purposes.
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"


def gone_soon(pid: int) -> bool:
    """Whether `pid` is gone within a few seconds: a SIGKILLed process takes a moment."""
    deadline = time.monotonic() + 10
    while is_running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not is_running(pid)


def test_an_install_past_its_time_limit_fails_and_stops_pips_builds(
    tmp_path: Path, slow_sdist: Path
) -> None:
    settings = settings_for(tmp_path, script_env_install_seconds=5)
    bundle = make_bundle(tmp_path / "b", "slowbuild\n")

    with pytest.raises(ScriptEnvError, match="took longer than 5 s"):
        python_for_bundle(bundle, settings, lambda _: None)

    assert env_dirs(settings) == []
    # On a busy machine pip may not have reached the build in 5 s; when it did, the
    # build went with it (the cancel test below always gets that far).
    if slow_sdist.exists():
        assert gone_soon(wait_for_pid(slow_sdist))


def test_a_cancelled_job_stops_the_install(tmp_path: Path, slow_sdist: Path) -> None:
    settings = settings_for(tmp_path)
    bundle = make_bundle(tmp_path / "b", "slowbuild\n")

    with pytest.raises(JobCancelled):
        python_for_bundle(bundle, settings, lambda _: None, cancelled=lambda: slow_sdist.exists())

    assert gone_soon(wait_for_pid(slow_sdist))
    assert env_dirs(settings) == []


def test_pip_dies_with_a_killed_worker(
    tmp_path: Path, offline_pip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGKILLed worker takes its pip along: no pip goes on writing into an
    environment the next build starts afresh."""
    pids = tmp_path / "pids.json"
    write_sdist(
        offline_pip,
        "hangbuild",
        "1.0",
        "import json, os, time\n"
        f"json.dump([os.getpid(), os.getppid()], open({str(pids)!r}, 'w'))\n"
        "time.sleep(120)",
    )
    monkeypatch.setenv("PIP_NO_BUILD_ISOLATION", "0")
    bundle = make_bundle(tmp_path / "b", "hangbuild\n")
    home = tmp_path / "home"
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path\n"
            "from shared.settings import load_settings\n"
            "from worker.script_env import python_for_bundle\n"
            "python_for_bundle(Path(sys.argv[1]), load_settings(home=Path(sys.argv[2])), print)",
            str(bundle),
            str(home),
        ]
    )
    try:
        deadline = time.monotonic() + 90
        while not (pids.exists() and pids.read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)
        build_pid, pip_pid = json.loads(pids.read_text())
        assert is_running(pip_pid)
    finally:
        worker.kill()
        worker.wait()
    assert gone_soon(pip_pid)
    os.kill(build_pid, 9)  # pip's own build process is left to its fate; not ours to keep
    [env_dir] = env_dirs(load_settings(home=home))
    assert not (env_dir / READY).exists()  # the next job removes it and builds again
