"""Script jobs on the worker (worker/script_job.py, worker/script_launch.py, worker/sdk.py):
the SDK in and outside Trainyard, the launcher's limits and death signal, and whole jobs
with real child processes, in-process and through a real `celery worker`, on each
database."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from sqlalchemy import func, select

from shared.celery_app import make_celery, publish_job
from shared.db import transaction
from shared.job_files import log_path
from shared.orm import Job, MetricPoint
from shared.settings import Settings
from shared.state_machine import request_cancel
from tests.conftest import ON_POSTGRESQL, REPO, SQLITE_ONLY
from tests.script_jobs import add_bundle, insert_script_job
from worker import script_launch, shutdown
from worker.job_log import JobLog
from worker.runner import checkpoint_dir, run_job
from worker.script_job import Channel, ScriptOutput
from worker.training import ListSink

# -- helpers ---------------------------------------------------------------------------


def job_row(settings: Settings, job_id: int) -> Job:
    with transaction(settings.resolved_database_url) as s:
        job = s.get(Job, job_id)
        assert job is not None
        s.expunge(job)
        return job


def points(settings: Settings, job_id: int, key: str | None = None) -> int:
    stmt = select(func.count()).select_from(MetricPoint).where(MetricPoint.job_id == job_id)
    if key is not None:
        stmt = stmt.where(MetricPoint.key == key)
    with transaction(settings.resolved_database_url) as s:
        return int(s.execute(stmt).scalar_one())


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def in_thread(job_id: int, settings: Settings) -> tuple[threading.Thread, list[str]]:
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(run_job(job_id, settings)))
    thread.start()
    return thread, outcome


def gone(pid: int) -> bool:
    """Whether `pid` is dead: no such process, or a zombie its new parent did not reap."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def job_log_text(settings: Settings, job_id: int) -> str:
    return log_path(settings, job_id).read_text()


def sdk_env(**extra: str) -> dict[str, str]:
    """A child environment without any TRAINYARD_* variable, Trainyard importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINYARD_")}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def run_python(code: str, cwd: Path, env: dict[str, str], **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
        text=True, timeout=60, **kw,
    )  # fmt: skip


# -- the SDK ---------------------------------------------------------------------------


def test_the_sdk_imports_nothing_heavy_and_prints_outside_trainyard(tmp_path: Path) -> None:
    got = run_python(
        """
        import sys
        from worker import sdk
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "shared", "server"))
        print("heavy", heavy)
        sdk.log("loss", 0.5, step=3, epoch=1)
        sdk.progress(epoch=1, epochs=2)
        sdk.finish({"accuracy": 0.9})
        path = sdk.save_checkpoint(b"state")
        print("saved", path, path.read_bytes(), sdk.params, sdk.resume_from, sdk.should_stop())
        """,
        tmp_path,
        sdk_env(),
    )
    assert got.returncode == 0, got.stderr
    assert got.stdout.splitlines() == [
        "heavy []",
        "[trainyard] loss=0.5 step=3 epoch=1",
        "[trainyard] progress epoch=1 epochs=2",
        '[trainyard] finish {"accuracy": 0.9}',
        "saved checkpoints/last.pt b'state' {} None False",
    ]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["last.pt"]  # no temp left


def test_the_sdk_writes_whole_json_lines_to_the_channel_from_many_threads(tmp_path: Path) -> None:
    params = tmp_path / "params.json"
    params.write_text('{"lr": 0.01}')
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(
            """
            import os, signal, threading
            from worker import sdk
            assert sdk.params == {"lr": 0.01}, sdk.params
            def worker(n):
                for i in range(500):
                    sdk.log(f"t{n}", i * 1.5, step=i)
            threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
            [t.start() for t in threads]
            [t.join() for t in threads]
            sdk.progress(epoch=2, epochs=3, samples_per_s=12.5)
            sdk.save_checkpoint(lambda p: p.write_text("by a writer"), name="sub/model.bin")
            os.kill(os.getpid(), signal.SIGTERM)  # what the runner sends: no exit
            sdk.finish({"val_accuracy": 0.75, "stopped": sdk.should_stop()})
            """
        )],
        cwd=tmp_path, pass_fds=(write_fd,), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=sdk_env(
            TRAINYARD_CHANNEL_FD=str(write_fd), TRAINYARD_PARAMS_FILE=str(params),
            TRAINYARD_CHECKPOINT_DIR=str(tmp_path / "ckpt"),
        ),
    )  # fmt: skip
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as channel:
        lines = channel.read().splitlines()
    assert proc.wait(60) == 0, proc.stdout.read()  # type: ignore[union-attr]
    messages = [json.loads(line) for line in lines]
    metrics = [m for m in messages if m["type"] == "metric"]
    assert len(metrics) == 2000
    for n in range(4):
        assert [m["step"] for m in metrics if m["key"] == f"t{n}"] == list(range(500))
    assert messages[-2:] == [
        {"type": "progress", "epoch": 2, "epochs": 3, "samples_per_s": 12.5},
        {"type": "finish", "metrics": {"val_accuracy": 0.75, "stopped": True}},
    ]
    assert (tmp_path / "ckpt" / "sub" / "model.bin").read_text() == "by a writer"
    assert [p.name for p in (tmp_path / "ckpt" / "sub").iterdir()] == ["model.bin"]


def test_save_checkpoint_refuses_names_outside_the_directory(tmp_path: Path) -> None:
    got = run_python(
        """
        from worker import sdk
        for name in ("../x.pt", "/tmp/x.pt", ""):
            try:
                sdk.save_checkpoint(b"x", name=name)
            except ValueError as exc:
                print("refused", repr(name))
        """,
        tmp_path,
        sdk_env(),
    )
    assert got.stdout.split("\n")[:3] == ["refused '../x.pt'", "refused '/tmp/x.pt'", "refused ''"]


# -- the launcher ----------------------------------------------------------------------


def launcher_env(bundle: Path, **extra: str) -> dict[str, str]:
    env = sdk_env()
    env.update({
        script_launch.DIR_VAR: str(bundle),
        script_launch.PARENT_VAR: str(os.getpid()),
        script_launch.IMPORT_PATH_VAR: str(REPO),
        **extra,
    })  # fmt: skip
    return env


def write_files(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return root


REPORT = """
    import json, os, resource, sys
    print(json.dumps({
        "argv": sys.argv, "cwd": os.getcwd(), "name": __name__,
        "data": resource.getrlimit(resource.RLIMIT_DATA),
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
        "launch_vars": sorted(k for k in os.environ if k.startswith("TRAINYARD_LAUNCH")),
        "repo_on_path": any(os.path.abspath(p or ".") == os.environ["REPO"] for p in sys.path),
        "pythonpath": os.environ.get("PYTHONPATH"),
    }))
    sys.exit(int(os.environ.get("EXIT", "0")))
"""


def launch(bundle: Path, entry: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker.script_launch", entry, *args], cwd=REPO,
        env=launcher_env(bundle, REPO=str(REPO), **env), capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip


def test_the_launcher_sets_limits_strips_its_variables_and_runs_a_file(tmp_path: Path) -> None:
    bundle = write_files(tmp_path / "code", {"src/train.py": REPORT})
    _, hard_files = resource.getrlimit(resource.RLIMIT_NOFILE)
    got = launch(
        bundle, "src/train.py", "--lr", "0.1",
        EXIT="3", PYTHONPATH=f"{REPO}{os.pathsep}{bundle}",
        **{script_launch.MEMORY_VAR: str(3 << 30), script_launch.OPEN_FILES_VAR: "100"},
    )  # fmt: skip
    assert got.returncode == 3, got.stderr
    report = json.loads(got.stdout)
    assert report["argv"] == ["src/train.py", "--lr", "0.1"]
    assert report["cwd"] == str(bundle) and report["name"] == "__main__"
    assert report["data"] == [3 << 30, 3 << 30]  # hard too: the script cannot raise it
    assert report["nofile"] == [min(100, hard_files)] * 2
    assert report["launch_vars"] == [] and not report["repo_on_path"]
    assert report["pythonpath"] == str(bundle)


def test_the_launcher_calls_a_function_and_honours_its_exit(tmp_path: Path) -> None:
    bundle = write_files(
        tmp_path / "code",
        {
            "pkg/__init__.py": "",
            "pkg/jobs.py": """
                import sys
                def main():
                    print("called with", sys.argv)
                    raise SystemExit(5)
                def fine():
                    print("fine")
            """,
        },
    )
    got = launch(bundle, "pkg.jobs:main", "a", "b")
    assert (got.returncode, got.stdout) == (5, "called with ['pkg.jobs:main', 'a', 'b']\n")
    assert launch(bundle, "pkg.jobs:fine").returncode == 0


def test_an_uncaught_exception_exits_1_with_its_traceback(tmp_path: Path) -> None:
    bundle = write_files(tmp_path / "code", {"train.py": "raise KeyError('no such column')"})
    got = launch(bundle, "train.py")
    assert got.returncode == 1
    assert "KeyError: 'no such column'" in got.stderr and 'File "' in got.stderr


def test_the_launcher_exits_at_once_when_its_parent_is_not_the_expected_one(tmp_path: Path) -> None:
    bundle = write_files(tmp_path / "code", {"train.py": "print('ran')"})
    got = launch(bundle, "train.py", **{script_launch.PARENT_VAR: "1"})
    assert (got.returncode, got.stdout) == (script_launch.ORPHANED_EXIT, "")


def test_the_script_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: SIGKILL the parent and the kernel kills the script."""
    bundle = write_files(tmp_path / "code", {"train.py": "import time; time.sleep(1000)"})
    env = launcher_env(bundle)
    starter = textwrap.dedent(
        f"""
        import os, subprocess, sys, time
        env = {env!r}
        env[{script_launch.PARENT_VAR!r}] = str(os.getpid())
        child = subprocess.Popen([sys.executable, "-m", "worker.script_launch", "train.py"],
                                 env=env, cwd={str(REPO)!r}, start_new_session=True)
        print(child.pid, flush=True)
        time.sleep(1000)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", starter], stdout=subprocess.PIPE, text=True)
    script_pid = int(parent.stdout.readline())  # type: ignore[union-attr]
    # The script is running (not the launcher still starting up).
    wait_until(
        lambda: (
            "train.py" in " ".join(psutil.Process(script_pid).cmdline())
            and psutil.Process(script_pid).status() != psutil.STATUS_ZOMBIE
        ),
        30,
        "the launcher to start",
    )
    time.sleep(0.5)  # past the prctl call
    parent.kill()
    parent.wait()
    wait_until(lambda: gone(script_pid), 10, "the script to die with its parent")


# -- the channel and the output, as units ----------------------------------------------


def test_the_channel_stores_good_messages_and_counts_bad_ones(tmp_path: Path) -> None:
    sink = ListSink()
    with JobLog(tmp_path / "job.log", 1, 1) as job_log:
        channel = Channel(sink, job_log)
        for line in [
            b'{"type":"metric","key":"loss","value":0.5,"step":1,"epoch":1}',
            b'{"type":"metric","key":"loss","value":NaN,"step":2}',
            b"not json",
            b'{"type":"metric","key":"' + b"k" * 65 + b'","value":1,"step":1}',
            b'{"type":"metric","key":"loss","value":"high","step":3}',
            b'{"type":"metric","key":"loss","value":1,"step":-1}',
            b'{"type":"metric","key":"loss","value":1,"step":true}',
            b'{"type":"progress","epoch":1,"epochs":4,"note":{"nested":1}}',
            b'{"type":"progress","epoch":2,"epochs":4,"eta_s":Infinity}',
            b'{"type":"hello"}',
            b"[1, 2]",
            b'{"type":"finish","metrics":{"val_accuracy":0.8,"bad":NaN,"m":[[1,2],[3,4]]}}',
            b"",
        ]:
            channel.line(line)
        channel.close()
    assert [(k, v, s, e) for k, v, s, e in sink.points][:1] == [("loss", 0.5, 1, 1)]
    assert len(sink.points) == 2  # the NaN is the sink's to drop
    assert sink.progress_updates == [{"epoch": 2, "epochs": 4, "eta_s": None}]
    assert channel.finish_metrics == {"val_accuracy": 0.8, "bad": None, "m": [[1, 2], [3, 4]]}
    assert channel.last_values == {"loss": 0.5} and channel.bad_lines == 8
    log_text = (tmp_path / "job.log").read_text()
    assert "ignored a line on the script's channel: not JSON" in log_text
    assert "ignored 8 lines on the script's channel in all" in log_text


def test_the_output_keeps_the_head_and_the_tail_and_says_what_it_left_out(tmp_path: Path) -> None:
    with JobLog(tmp_path / "job.log", 1, 1) as job_log:
        output = ScriptOutput(job_log, head_bytes=100, tail_bytes=60)
        for i in range(100):
            output.line(f"line {i:03}".encode())  # 8 bytes and a newline each
        output.line(b"10%\r50%\r100%")
        output.close()
    lines = [line.split("] ", 1)[1] for line in (tmp_path / "job.log").read_text().splitlines()]
    head = [f"line {i:03}" for i in range(11)]  # 99 bytes
    tail = [f"line {i:03}" for i in range(95, 100)] + ["100%"]  # 5 * 9 + 13 bytes
    omitted = 100 * 9 + 13 - 99 - (5 * 9 + 13)
    assert lines == [*head, f"... {omitted} bytes of the script's output omitted "
                     "(TRAINYARD_SCRIPT_LOG_MAX_BYTES, TRAINYARD_SCRIPT_LOG_TAIL_BYTES)", *tail]  # fmt: skip
    assert list(output.last_lines)[-2:] == ["line 099", "100%"]


# -- whole jobs, in-process ------------------------------------------------------------

TRAIN = """
    import json, sys
    from worker import sdk
    print("params", json.dumps(sdk.params), "args", sys.argv[1:])
    for epoch in range(1, 6):
        sdk.log("train_loss", 1.0 / epoch, step=epoch, epoch=epoch)
        sdk.log("val_accuracy", epoch / 10, step=epoch, epoch=epoch)
        sdk.progress(epoch=epoch, epochs=5)
    sdk.save_checkpoint(b"weights")
    sdk.finish({"val_accuracy": 0.5, "precision": 0.4, "per_class": [0.1, 0.2]})
"""


def test_a_script_job_stores_its_metrics_and_result(settings: Settings) -> None:
    bundle = add_bundle(settings, {"train.py": TRAIN})
    job_id = insert_script_job(settings, bundle, args=["--lr", "0.1"], params={"depth": 3})
    assert run_job(job_id, settings) == "succeeded"
    job = job_row(settings, job_id)
    assert job.result["metrics"] == {"val_accuracy": 0.5, "precision": 0.4, "per_class": [0.1, 0.2]}
    assert job.checkpoint_path == str(checkpoint_dir(settings, job_id, 1))
    assert (Path(job.checkpoint_path) / "last.pt").read_bytes() == b"weights"
    assert job.progress == {"epoch": 5, "epochs": 5}
    assert points(settings, job_id, "train_loss") == points(settings, job_id, "val_accuracy") == 5
    log_text = job_log_text(settings, job_id)
    assert "params {\"depth\": 3} args ['--lr', '0.1']" in log_text
    assert "epoch 5/5: train_loss=0.2 val_accuracy=0.5" in log_text  # as a built-in job
    assert "the script exited with code 0; 10 metric points" in log_text
    # The attempt's work directory (the unpacked bundle) is gone; the archive is cached.
    assert not list((settings.home / "script-work").iterdir())
    assert len(list((settings.home / "bundle-cache").iterdir())) == 1


@SQLITE_ONLY
def test_without_finish_the_result_is_the_last_value_of_each_key(settings: Settings) -> None:
    script = """
        from worker import sdk
        for step in range(3):
            sdk.log("loss", 3 - step, step=step)
        sdk.log("accuracy", 0.25, step=0)
    """
    job_id = insert_script_job(settings, add_bundle(settings, {"train.py": script}))
    assert run_job(job_id, settings) == "succeeded"
    job = job_row(settings, job_id)
    assert job.result["metrics"] == {"loss": 1.0, "accuracy": 0.25}
    assert job.checkpoint_path is None  # it saved nothing


@SQLITE_ONLY
def test_a_failing_script_fails_at_once_with_its_last_lines(settings: Settings) -> None:
    script = """
        import sys
        for i in range(50):
            print(f"line {i}")
        print("about to fail", file=sys.stderr)
        raise RuntimeError("boom in the script")
    """
    job_id = insert_script_job(settings, add_bundle(settings, {"train.py": script}))
    assert run_job(job_id, settings) == "failed"
    job = job_row(settings, job_id)
    assert (job.state, job.attempt, job.error_type) == ("failed", 1, "ScriptFailed")
    message = job.error_message
    assert message.startswith("the script exited with code 1; its last lines:\n"), message
    assert "line 49\nabout to fail\nTraceback" in message
    assert message.endswith("RuntimeError: boom in the script")
    assert "line 30" not in message  # the last 20 lines only
    assert "line 0" in job_log_text(settings, job_id)  # the whole output is in the log


@SQLITE_ONLY
def test_the_child_environment_holds_none_of_the_workers_secrets(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = {
        "TRAINYARD_DATABASE_URL": settings.resolved_database_url,
        "TRAINYARD_REDIS_URL": settings.require_redis_url(),
        "TRAINYARD_SECRET_KEY": settings.resolved_secret_key,
        "AWS_ACCESS_KEY_ID": "AKIATESTSCRIPTJOB01",
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSCRIPTJOB",
        "TRAINYARD_API_TOKEN": "ty_secret_api_token_for_the_cli",
        "DATABASE_URL": settings.resolved_database_url,
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    script = """
        import json, os
        from worker import sdk
        sdk.save_checkpoint(json.dumps(dict(os.environ)).encode(), name="env.json")
    """
    job_id = insert_script_job(settings, add_bundle(settings, {"train.py": script}))
    assert run_job(job_id, settings) == "succeeded"
    env = json.loads((checkpoint_dir(settings, job_id, 1) / "env.json").read_text())
    for name, secret in secrets.items():
        leaks = [k for k, v in env.items() if secret in v]
        assert not leaks, f"{name}'s value is in the child's {leaks}"
    assert not [k for k in env if k.startswith(("AWS_", "TRAINYARD_LAUNCH_"))]
    contract = {k for k in env if k.startswith("TRAINYARD_")}
    assert contract == {
        "TRAINYARD_JOB_ID", "TRAINYARD_ATTEMPT", "TRAINYARD_CHECKPOINT_DIR",
        "TRAINYARD_PARAMS_FILE", "TRAINYARD_DEVICE", "TRAINYARD_CHANNEL_FD",
    }  # fmt: skip
    assert (env["TRAINYARD_JOB_ID"], env["TRAINYARD_ATTEMPT"], env["TRAINYARD_DEVICE"]) == (
        str(job_id),
        "1",
        "cpu",
    )


STOPPABLE = """
    import subprocess, time
    from worker import sdk
    child = subprocess.Popen(["sleep", "1000"])
    sdk.save_checkpoint(str(child.pid).encode(), name="grandchild.pid")
    step = 0
    while not sdk.should_stop():
        step += 1
        sdk.log("loss", 1.0, step=step)
        time.sleep(0.05)
    print("stopping at step", step)
    sdk.save_checkpoint(str(step).encode(), name="last.pt")
"""


def grandchild(settings: Settings, job_id: int) -> int:
    path = checkpoint_dir(settings, job_id, 1) / "grandchild.pid"
    return int(wait_until(lambda: path.is_file() and path.read_text(), 30, "the script to start"))


@SQLITE_ONLY
def test_cancel_stops_the_script_within_seconds_and_kills_its_children(settings: Settings) -> None:
    job_id = insert_script_job(settings, add_bundle(settings, {"train.py": STOPPABLE}))
    thread, outcome = in_thread(job_id, settings)
    sleeper = grandchild(settings, job_id)
    wait_until(lambda: points(settings, job_id, "loss") > 0, 30, "the first points")
    with transaction(settings.resolved_database_url) as s:
        request_cancel(s, job_id)
    asked = time.monotonic()
    thread.join(30)
    assert outcome == ["cancelled"]
    assert time.monotonic() - asked < 5  # a heartbeat (1 s) and a poll
    job = job_row(settings, job_id)
    assert job.state == "cancelled"
    # The script checkpointed on the way out, and that checkpoint is the job's.
    assert job.checkpoint_path == str(checkpoint_dir(settings, job_id, 1))
    assert int((Path(job.checkpoint_path) / "last.pt").read_text()) > 0
    assert gone(sleeper)
    assert "stopping at step" in job_log_text(settings, job_id)


@SQLITE_ONLY
def test_a_script_that_ignores_the_stop_is_killed_after_its_grace(settings: Settings) -> None:
    script = """
        import signal, time
        from worker import sdk
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sdk.log("loss", 1.0, step=0)
        while True:
            time.sleep(0.1)
    """
    bundle = add_bundle(settings, {"train.py": script})
    job_id = insert_script_job(settings, bundle, stop_grace_s=1)
    thread, outcome = in_thread(job_id, settings)
    wait_until(lambda: points(settings, job_id, "loss") > 0, 30, "the script to start")
    with transaction(settings.resolved_database_url) as s:
        request_cancel(s, job_id)
    asked = time.monotonic()
    thread.join(30)
    assert outcome == ["cancelled"] and time.monotonic() - asked < 6
    log_text = job_log_text(settings, job_id)
    assert "asking the script to stop (SIGTERM); killed after 1 s" in log_text
    assert "the script did not stop within 1 s: killing it" in log_text
    assert "was killed by signal 9 (SIGKILL)" in log_text


@SQLITE_ONLY
def test_a_time_limit_stops_the_script(settings: Settings) -> None:
    # No SDK: SIGTERM's default action ends it.
    script = "import time\nprint('working', flush=True)\ntime.sleep(1000)\n"
    job_id = insert_script_job(settings, add_bundle(settings, {"train.py": script}),
                               max_runtime_s=2)  # fmt: skip
    started = time.monotonic()
    assert run_job(job_id, settings) == "failed"
    assert time.monotonic() - started < 10
    job = job_row(settings, job_id)
    assert (job.error_type, job.error_message) == (
        "TimeLimitExceeded",
        "time limit of 2 s exceeded",
    )
    assert "was killed by signal 15 (SIGTERM)" in job_log_text(settings, job_id)


@ON_POSTGRESQL
def test_a_thousand_metrics_a_second_lose_no_points_and_the_lease_goes_on(
    settings: Settings,
) -> None:
    script = """
        import time
        from worker import sdk
        start = time.monotonic()
        for i in range(5000):
            sdk.log("m", i * 0.5, step=i)
            if i % 100 == 99:  # 1,000 a second, in bursts of 100
                time.sleep(max(0.0, start + (i + 1) / 1000 - time.monotonic()))
        sdk.finish({"sent": 5000, "seconds": time.monotonic() - start})
    """
    job_id = insert_script_job(settings, add_bundle(settings, {"train.py": script}))
    thread, outcome = in_thread(job_id, settings)
    leases = set()
    while thread.is_alive():
        job = job_row(settings, job_id)
        if job.state == "running" and job.lease_expires_at is not None:
            leases.add(job.lease_expires_at)
        time.sleep(0.2)
    assert outcome == ["succeeded"]
    assert points(settings, job_id, "m") == 5000
    with transaction(settings.resolved_database_url) as s:
        steps = s.scalars(
            select(MetricPoint.step).where(MetricPoint.job_id == job_id, MetricPoint.key == "m")
        ).all()
    assert sorted(steps) == list(range(5000))
    result = job_row(settings, job_id).result["metrics"]
    # Writing to the channel never held the script up (a full pipe would).
    assert result["seconds"] < 7, result
    # Renewed every heartbeat (1 s) while the points flowed.
    assert len(leases) >= 4, sorted(leases)


@SQLITE_ONLY
def test_a_bundle_that_is_gone_fails_the_job(settings: Settings) -> None:
    bundle = add_bundle(settings, {"train.py": "print(1)"})
    job_id = insert_script_job(settings, bundle)
    from shared.orm import CodeBundle

    with transaction(settings.resolved_database_url) as s:
        s.delete(s.get(CodeBundle, bundle))
    assert run_job(job_id, settings) == "failed"
    job = job_row(settings, job_id)
    assert (job.error_type, job.error_message) == (
        "UserError",
        f"code bundle {bundle} no longer exists",
    )


@SQLITE_ONLY
def test_a_later_attempt_gets_the_earlier_attempts_checkpoints(settings: Settings) -> None:
    script = """
        import os
        from worker import sdk
        print("resume", sdk.resume_from and sorted(os.listdir(sdk.resume_from)))
        if sdk.resume_from is None:
            sdk.save_checkpoint(b"1", name="state.txt")
            raise SystemExit(0)
        sdk.finish({"resumed_from": (sdk.resume_from / "state.txt").read_text()})
    """
    bundle = add_bundle(settings, {"train.py": script})
    job_id = insert_script_job(settings, bundle)
    assert run_job(job_id, settings) == "succeeded"
    # As the reconciler would after a lost worker: the same job again, attempt 2.
    with transaction(settings.resolved_database_url) as s:
        job = s.get(Job, job_id)
        job.state, job.finished_at, job.max_attempts = "queued", None, 3
    assert run_job(job_id, settings) == "succeeded"
    job = job_row(settings, job_id)
    assert job.attempt == 2 and job.result["metrics"] == {"resumed_from": "1"}
    assert "resuming from the checkpoints in" in job_log_text(settings, job_id)


# -- through a real celery worker ------------------------------------------------------


@pytest.mark.integration
@ON_POSTGRESQL
def test_a_script_job_through_a_real_worker(
    settings: Settings, start_worker, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYWORKER")
    script = TRAIN.replace(
        'sdk.save_checkpoint(b"weights")',
        "import os\n    sdk.save_checkpoint(json.dumps(dict(os.environ)).encode(), name='env.json')",
    )
    job_id = insert_script_job(settings, add_bundle(settings, {"train.py": script}))
    worker = start_worker()
    app = make_celery(settings)
    publish_job(app, job_id, "script", "cpu")
    job = wait_until(
        lambda: (j := job_row(settings, job_id)).state in ("succeeded", "failed") and j,
        90, "the job to end",
    )  # fmt: skip
    assert job.state == "succeeded", (job.error_message, worker.log_tail())
    assert job.result["metrics"]["val_accuracy"] == 0.5
    assert points(settings, job_id, "val_accuracy") == 5
    env = json.loads((checkpoint_dir(settings, job_id, 1) / "env.json").read_text())
    worker_secrets = [
        settings.resolved_database_url, settings.require_redis_url(),
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYWORKER",
    ]  # fmt: skip
    assert not [k for k, v in env.items() if any(s in v for s in worker_secrets)]


@SQLITE_ONLY
def test_with_a_bucket_the_bundle_and_the_resume_dir_come_from_it(s3_settings: Settings) -> None:
    """Another host's attempt: nothing of the job on this disk, all of it in the bucket."""
    settings = s3_settings
    script = """
        from worker import sdk
        if sdk.resume_from is None:
            sdk.save_checkpoint(b"epoch 3", name="nested/state.txt")
            raise SystemExit(0)
        sdk.finish({"resumed_with": (sdk.resume_from / "nested" / "state.txt").read_text()})
    """
    job_id = insert_script_job(settings, add_bundle(settings, {"train.py": script}))
    assert run_job(job_id, settings) == "succeeded"
    job = job_row(settings, job_id)
    assert job.checkpoint_path and job.checkpoint_path.startswith("s3://")
    # Uploaded, then dropped from this disk; and the bundle cache goes too.
    assert not checkpoint_dir(settings, job_id, 1).exists()
    shutil.rmtree(settings.home / "bundle-cache")
    with transaction(settings.resolved_database_url) as s:
        row = s.get(Job, job_id)
        row.state, row.finished_at, row.max_attempts = "queued", None, 3
    assert run_job(job_id, settings) == "succeeded"
    assert job_row(settings, job_id).result["metrics"] == {"resumed_with": "epoch 3"}


@SQLITE_ONLY
def test_a_worker_shutdown_hands_the_script_job_back_with_its_checkpoint(
    settings: Settings,
) -> None:
    job_id = insert_script_job(settings, add_bundle(settings, {"train.py": STOPPABLE}))
    thread, outcome = in_thread(job_id, settings)
    sleeper = grandchild(settings, job_id)
    wait_until(lambda: points(settings, job_id, "loss") > 0, 30, "the first points")
    shutdown.request_shutdown()
    try:
        thread.join(30)
    finally:
        shutdown.reset_for_tests()
    assert outcome == ["requeued"]
    job = job_row(settings, job_id)
    assert (job.state, job.error_message) == ("queued", "worker shutting down; requeued")
    assert (checkpoint_dir(settings, job_id, 1) / "last.pt").is_file() and gone(sleeper)


@SQLITE_ONLY
def test_a_lost_lease_kills_the_script_at_once(settings: Settings) -> None:
    bundle = add_bundle(settings, {"train.py": STOPPABLE})
    job_id = insert_script_job(settings, bundle, stop_grace_s=600)
    thread, outcome = in_thread(job_id, settings)
    sleeper = grandchild(settings, job_id)
    with transaction(settings.resolved_database_url) as s:
        s.get(Job, job_id).attempt = 2  # another attempt owns the job now
    thread.join(30)
    assert outcome == ["lost"] and gone(sleeper)
    log_text = job_log_text(settings, job_id)
    assert "lease lost: killing the script at once" in log_text
    assert "stopping at step" not in log_text  # no grace: it was not asked


@SQLITE_ONLY
def test_a_script_over_its_memory_limit_fails_saying_so(settings: Settings) -> None:
    script = """
        import resource
        print("limit", resource.getrlimit(resource.RLIMIT_DATA))
        hog = bytearray(1_000_000_000)
    """
    bundle = add_bundle(settings, {"train.py": script})
    job_id = insert_script_job(settings, bundle, resources={"memory_gb": 0.5})
    assert run_job(job_id, settings) == "failed"
    job = job_row(settings, job_id)
    assert job.error_type == "ScriptFailed"
    assert job.error_message.startswith(
        "the script exited with code 1 (out of memory: its limit is 477 MiB); its last lines:"
    ), job.error_message
    assert job.error_message.endswith("MemoryError")
    assert "limit (500000000, 500000000)" in job_log_text(settings, job_id)


@SQLITE_ONLY
def test_a_bundle_with_requirements_runs_in_its_own_environment(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """worker/script_env.py builds the venv (from a local wheel: no network); the
    launcher and the SDK run in it."""
    from tests.test_script_env import write_wheel

    (tmp_path / "wheels").mkdir()
    write_wheel(tmp_path / "wheels", "tinyscriptdep", "1.0", "VALUE = 'from the wheel'\n")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "wheels"))
    script = """
        import sys, tinyscriptdep
        from worker import sdk
        sdk.finish({"dep": tinyscriptdep.VALUE, "prefix": sys.prefix})
    """
    files = {"train.py": script, "requirements.txt": "tinyscriptdep==1.0\n"}
    job_id = insert_script_job(settings, add_bundle(settings, files))
    assert run_job(job_id, settings) == "succeeded", job_row(settings, job_id).error_message
    metrics = job_row(settings, job_id).result["metrics"]
    assert metrics["dep"] == "from the wheel"
    assert Path(metrics["prefix"]).parent == (settings.home / "script-envs").resolve()
