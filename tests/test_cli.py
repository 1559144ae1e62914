"""The `trainyard` CLI against a fake HTTP API, plus the process commands and `up`.

The client commands are tested against a stdlib HTTP server in a thread that answers
with canned API responses, so these tests need neither the Flask app nor a database.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from click.testing import CliRunner, Result

from server.cli import display, main, process_commands
from server.cli.local.children import local_children
from server.cli.local.run_dir import stop_leftovers
from server.cli.local.supervision_loop import StopSignals

REPO = Path(__file__).resolve().parents[1]


# ==================================================================== fake API


class FakeApi:
    """Routes (method, path) to a list of (status, body) answers; the last one repeats."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], list[tuple[int, Any]]] = {}
        self.requests: list[dict[str, Any]] = []
        self.url = ""

    def on(self, method: str, path: str, *answers: tuple[int, Any]) -> None:
        self.routes[(method, "/api/v1" + path)] = list(answers)

    def answer(self, method: str, path: str) -> tuple[int, Any]:
        answers = self.routes.get((method, path))
        if not answers:
            return 404, {
                "error": {"code": "not_found", "message": f"no route {path}", "fields": {}}
            }
        return answers.pop(0) if len(answers) > 1 else answers[0]


def _handler(api: FakeApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self, method: str) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            api.requests.append(
                {
                    "method": method,
                    "path": parts.path,
                    "query": {k: v[0] for k, v in parse_qs(parts.query).items()},
                    "body": json.loads(raw) if raw else None,
                    "headers": dict(self.headers),
                }
            )
            status, body = api.answer(method, parts.path)
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(status)
            ctype = "text/html" if isinstance(body, str) else "application/json"
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._serve("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._serve("POST")

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def api() -> Iterator[FakeApi]:
    fake = FakeApi()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()


def make_job(**overrides: Any) -> dict[str, Any]:
    job: dict[str, Any] = {
        "id": 7,
        "kind": "train",
        "name": "digits-cnn",
        "state": "queued",
        "queue": "cpu",
        "priority": 5,
        "model": "cnn",
        "dataset": "digits",
        "tags": ["baseline"],
        "spec": {"kind": "train", "dataset": {"name": "digits"}, "model": {"name": "cnn"}},
        "attempt": 0,
        "max_attempts": 3,
        "worker": None,
        "cancel_requested": False,
        "progress": None,
        "result": None,
        "error": None,
        "source_job_id": None,
        "created_at": "2026-11-28T10:00:00.123Z",
        "started_at": None,
        "finished_at": None,
        "updated_at": "2026-11-28T10:00:00.123Z",
    }
    job.update(overrides)
    return job


SUCCEEDED = make_job(
    state="succeeded",
    attempt=1,
    worker="trainyard-1@host",
    started_at="2026-11-28T10:00:01Z",
    finished_at="2026-11-28T10:00:13Z",
    result={
        "metrics": {
            "train_loss": 0.0412,
            "val_loss": 0.0633,
            "val_accuracy": 0.9861,
            "epochs_run": 10,
            "samples_per_s": 7212.5,
        }
    },
)
FAILED = make_job(
    state="failed",
    attempt=3,
    started_at="2026-11-28T10:00:01Z",
    finished_at="2026-11-28T10:00:02Z",
    error={"type": "RuntimeError", "message": "[cuda error] out of memory"},
)
RUNNING = make_job(
    state="running",
    attempt=1,
    started_at="2026-11-28T10:00:01Z",
    progress={
        "epoch": 3,
        "epochs": 10,
        "step": 120,
        "steps_total": 450,
        "samples_per_s": 7000.0,
        "eta_s": 83,
        "fraction": 0.27,
    },
)


def run(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> Result:
    # Wide, so table cells are not wrapped mid-word.
    return CliRunner().invoke(main, list(args), env={"COLUMNS": "200", **(env or {})}, input=stdin)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ==================================================================== submit


def test_submit_prints_the_new_job(api: FakeApi, tmp_path: Path) -> None:
    spec = {"kind": "train", "dataset": {"name": "digits"}, "model": {"name": "cnn"}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    api.on("POST", "/jobs", (201, make_job()))

    result = run("submit", str(tmp_path / "spec.json"), "--url", api.url)

    assert result.exit_code == 0, result.output
    assert "Submitted job 7 (queued, queue cpu)" in result.output
    [request] = api.requests
    assert request["body"] == spec


def test_submit_from_stdin_quiet_uses_trainyard_url(api: FakeApi) -> None:
    api.on("POST", "/jobs", (201, make_job(id=12)))
    result = run("submit", "-", "-q", stdin='{"kind": "train"}', env={"TRAINYARD_URL": api.url})
    assert result.exit_code == 0, result.output
    assert result.stdout == "12\n"
    assert api.requests[0]["body"] == {"kind": "train"}


def test_submit_validation_error_names_every_field(api: FakeApi, tmp_path: Path) -> None:
    (tmp_path / "spec.json").write_text('{"kind": "train"}')
    fields = {
        "model.params.hidden": "Input should be greater than or equal to 1",
        "optimizer.name": "unknown optimizer 'adamw'; choose one of: adam, sgd",
        "dataset": "field required",
    }
    error = {"code": "invalid_spec", "message": "the job spec is invalid", "fields": fields}
    api.on("POST", "/jobs", (422, {"error": error}))

    result = run("submit", str(tmp_path / "spec.json"), "--url", api.url)

    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0] == "error: the job spec is invalid (invalid_spec, HTTP 422)"
    for field, message in fields.items():
        assert f"  {field}: {message}" in lines
    assert "Traceback" not in result.output


def test_submit_rejects_invalid_json_locally(api: FakeApi, tmp_path: Path) -> None:
    (tmp_path / "spec.json").write_text('{"kind": ')
    result = run("submit", str(tmp_path / "spec.json"), "--url", api.url)
    assert result.exit_code == 1
    assert "is not valid JSON" in result.stderr
    assert api.requests == []


def test_submit_watch_follows_the_job(api: FakeApi, tmp_path: Path) -> None:
    (tmp_path / "spec.json").write_text('{"kind": "train"}')
    api.on("POST", "/jobs", (201, make_job()))
    api.on("GET", "/jobs/7", (200, RUNNING), (200, SUCCEEDED))
    result = run(
        "submit", str(tmp_path / "spec.json"), "--watch", "--interval", "0.05", "--url", api.url
    )
    assert result.exit_code == 0, result.output
    assert "Job 7 succeeded" in result.output


# ==================================================================== jobs, show, cancel


def test_jobs_table(api: FakeApi) -> None:
    evaluate = make_job(
        id=8,
        kind="evaluate",
        name="[eval] digits",
        model=None,
        dataset="digits",
        state="succeeded",
        spec={"kind": "evaluate", "source_job_id": 7},
        result={"metrics": {"accuracy": 0.975, "f1": 0.97}},
    )
    jobs = [evaluate, SUCCEEDED, RUNNING, FAILED]
    api.on("GET", "/jobs", (200, {"jobs": jobs, "next_before": 7}))

    result = run("jobs", "--state", "succeeded", "--limit", "3", "--url", api.url)

    assert result.exit_code == 0, result.output
    assert api.requests[0]["query"] == {"state": "succeeded", "limit": "3"}
    out = result.output
    for text in ("id", "kind", "state", "model", "dataset", "key metric", "created"):
        assert text in out
    assert "[eval] digits" in out  # not swallowed as rich markup
    assert "accuracy 0.975" in out
    assert "val_accuracy 0.9861" in out
    assert "epoch 3/10 (27%)" in out
    assert "RuntimeError" in out  # a failed job shows its error type instead
    assert "digits-cnn" in out and "2026-11-28 10:00:00" in out
    assert "trainyard jobs --before 7" in out


def test_jobs_empty_and_json(api: FakeApi) -> None:
    api.on("GET", "/jobs", (200, {"jobs": [], "next_before": None}))
    assert "No jobs." in run("jobs", "--url", api.url).output
    result = run("jobs", "--json", "--kind", "train", "--url", api.url)
    assert json.loads(result.output) == {"jobs": [], "next_before": None}
    assert api.requests[-1]["query"] == {"kind": "train", "limit": "20"}


def test_show_json_is_the_raw_job(api: FakeApi) -> None:
    api.on("GET", "/jobs/7", (200, SUCCEEDED))
    result = run("show", "7", "--json", "--url", api.url)
    assert result.exit_code == 0
    assert json.loads(result.output) == SUCCEEDED


def test_show_pretty(api: FakeApi) -> None:
    api.on("GET", "/jobs/7", (200, FAILED))
    result = run("show", "7", "--url", api.url)
    assert result.exit_code == 0, result.output
    assert "failed" in result.output
    assert "RuntimeError: [cuda error] out of memory" in result.output
    assert "3/3" in result.output  # attempts
    assert '"kind": "train"' in result.output  # the spec


def test_show_missing_job(api: FakeApi) -> None:
    api.on(
        "GET", "/jobs/99", (404, {"error": {"code": "not_found", "message": "job 99 not found"}})
    )
    result = run("show", "99", "--url", api.url)
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: job 99 not found (not_found, HTTP 404)"


def test_non_json_server_error(api: FakeApi) -> None:
    api.on("GET", "/jobs/7", (502, "<html><body>Bad Gateway</body></html>"))
    result = run("show", "7", "--url", api.url)
    assert result.exit_code == 1
    assert "HTTP 502" in result.stderr and "Bad Gateway" in result.stderr


def test_cancel(api: FakeApi) -> None:
    api.on("POST", "/jobs/7/cancel", (200, make_job(state="running", cancel_requested=True)))
    result = run("cancel", "7", "--url", api.url)
    assert result.exit_code == 0
    assert (
        api.requests[0]["method"] == "POST" and api.requests[0]["path"] == "/api/v1/jobs/7/cancel"
    )
    assert "cancel requested" in result.output

    api.on("POST", "/jobs/8/cancel", (200, make_job(id=8, state="cancelled")))
    assert "Job 8 is cancelled" in run("cancel", "8", "--url", api.url).output


# ==================================================================== watch


def test_watch_succeeded_exits_0_with_metrics(api: FakeApi) -> None:
    api.on("GET", "/jobs/7", (200, make_job()), (200, RUNNING), (200, SUCCEEDED))
    result = run("watch", "7", "--interval", "0.05", "--url", api.url)
    assert result.exit_code == 0, result.output
    assert len(api.requests) == 3
    assert "Job 7 succeeded after 0:12" in result.output
    assert "val_accuracy" in result.output and "0.9861" in result.output
    assert "epochs_run" in result.output


def test_watch_failed_exits_1_with_the_error(api: FakeApi) -> None:
    api.on("GET", "/jobs/7", (200, FAILED))
    result = run("watch", "7", "--url", api.url)
    assert result.exit_code == 1
    assert "RuntimeError: [cuda error] out of memory" in result.output


def test_watch_cancelled_exits_1(api: FakeApi) -> None:
    api.on("GET", "/jobs/7", (200, make_job(state="cancelled")))
    assert run("watch", "7", "--url", api.url).exit_code == 1


def test_progress_text() -> None:
    assert (
        display.progress_text(RUNNING["progress"])
        == "epoch 3/10 · step 120/450 · 7,000 samples/s · ETA 1:23"
    )
    assert display.progress_text(None) == ""


# ==================================================================== unreachable


def test_connection_refused_is_one_line_and_exit_2() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for args in (["jobs"], ["show", "1"], ["watch", "1"], ["cancel", "1"]):
        result = run(*args, "--url", url)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.count("\n") == 1
        assert f"cannot reach Trainyard at {url} (connection refused)" in result.stderr
        assert "Traceback" not in result.output


# ==================================================================== process commands


def test_help_works() -> None:
    for args in (
        ["--help"],
        ["up", "--help"],
        ["worker", "--help"],
        ["web", "--help"],
        ["db", "upgrade", "--help"],
    ):
        result = run(*args)
        assert result.exit_code == 0, (args, result.output)


def test_importing_the_cli_does_not_import_torch_or_worker() -> None:
    code = (
        "import sys, server.cli; "
        "assert 'torch' not in sys.modules, 'torch'; "
        "assert 'worker' not in sys.modules, 'worker'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


@pytest.fixture
def exec_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[str], dict[str, str] | None]]:
    calls: list[tuple[list[str], dict[str, str] | None]] = []
    monkeypatch.setattr(
        process_commands, "_exec", lambda argv, env=None: calls.append((list(argv), env))
    )
    return calls


REDIS_ENV = {"TRAINYARD_REDIS_URL": "redis://127.0.0.1:6379/0"}


def test_worker_defaults_to_cpu_without_a_gpu(
    exec_calls: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process_commands, "gpu_visible", lambda: False)
    assert run("worker", env=REDIS_ENV).exit_code == 0
    [(argv, env)] = exec_calls
    assert argv[:6] == [sys.executable, "-m", "celery", "-A", "worker.celery_worker:app", "worker"]
    assert argv[argv.index("-Q") + 1] == "cpu"
    # The worker decides its concurrency: one job per GPU slot, else TRAINYARD_WORKER_SLOTS.
    assert "--concurrency" not in argv
    assert argv[argv.index("--prefetch-multiplier") + 1] == "1"
    assert argv[argv.index("--loglevel") + 1] == "INFO"
    assert argv[argv.index("-n") + 1] == f"trainyard-{os.getpid()}@%h"
    assert env is not None and "TRAINYARD_WORKER_GPUS" not in env


def test_worker_gpu_default_and_options(exec_calls: list, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process_commands, "gpu_visible", lambda: True)
    assert run("worker", env=REDIS_ENV).exit_code == 0
    assert exec_calls[-1][0][exec_calls[-1][0].index("-Q") + 1] == "gpu"

    result = run("worker", "--queues", "gpu, cpu", "-c", "2", "--name", "w1@%h", env=REDIS_ENV)
    assert result.exit_code == 0, result.output
    argv, env = exec_calls[-1]
    assert argv[argv.index("-Q") + 1] == "gpu,cpu"
    assert argv[argv.index("--concurrency") + 1] == "2"
    assert argv[argv.index("-n") + 1] == "w1@%h"


def test_worker_gpu_options(exec_calls: list, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process_commands, "gpu_visible", lambda: False)
    # Named GPUs mean a GPU worker even where nvidia-smi sees none (the worker warns).
    result = run("worker", "--gpus", "0,1", "--gpus-per-slot", "2", env=REDIS_ENV)
    assert result.exit_code == 0, result.output
    argv, env = exec_calls[-1]
    assert argv[argv.index("-Q") + 1] == "gpu"
    assert env is not None and env["TRAINYARD_WORKER_GPUS"] == "0,1"
    assert env["TRAINYARD_GPUS_PER_SLOT"] == "2"

    monkeypatch.setattr(process_commands, "gpu_visible", lambda: True)
    assert run("worker", "--gpus", "none", env=REDIS_ENV).exit_code == 0
    argv, env = exec_calls[-1]
    assert argv[argv.index("-Q") + 1] == "cpu" and env["TRAINYARD_WORKER_GPUS"] == "none"

    calls = len(exec_calls)
    for bad in ("0,0", "gpu0", "1,,2", ""):
        result = run("worker", "--gpus", bad, env=REDIS_ENV)
        assert result.exit_code == 2 and "--gpus" in result.output, (bad, result.output)
    result = run("worker", "--gpus-per-slot", "0", env=REDIS_ENV)
    assert result.exit_code == 2 and "--gpus-per-slot" in result.output
    assert len(exec_calls) == calls


def test_worker_rejects_unknown_queue_and_missing_redis(exec_calls: list) -> None:
    result = run("worker", "--queues", "gpu,cpuu", env=REDIS_ENV)
    assert result.exit_code == 2 and "cpuu" in result.output
    result = run("worker", "--queues", "cpu", env={"TRAINYARD_REDIS_URL": ""})
    assert result.exit_code == 1 and "TRAINYARD_REDIS_URL" in result.output
    assert exec_calls == []


def test_web_execs_gunicorn(exec_calls: list) -> None:
    result = run("web", "--host", "0.0.0.0", "--port", "9000", "--workers", "3", env=REDIS_ENV)
    assert result.exit_code == 0, result.output
    [(argv, _)] = exec_calls
    assert argv[:4] == [sys.executable, "-m", "gunicorn", "server.wsgi:app"]
    assert argv[argv.index("-b") + 1] == "0.0.0.0:9000"
    assert argv[argv.index("--workers") + 1] == "3"
    assert argv[argv.index("--timeout") + 1] == "60"
    # gthread underneath; job streams and header reading off the request threads.
    assert argv[argv.index("--worker-class") + 1] == process_commands.WORKER_CLASS
    assert argv[argv.index("--threads") + 1] == str(process_commands.WEB_THREADS)


def test_gpu_visible(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-1234)'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert process_commands.gpu_visible()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # hides every GPU, as for CUDA
    assert not process_commands.gpu_visible()

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    monkeypatch.setattr(process_commands.os.path, "exists", lambda p: False)
    assert not process_commands.gpu_visible()
    monkeypatch.setattr(process_commands.os.path, "exists", lambda p: p == "/dev/nvidia0")
    assert process_commands.gpu_visible()


def test_db_upgrade_uses_the_settings_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # shared.migrate may not exist yet in this checkout; the CLI only needs its function.
    calls: list[str] = []
    fake = ModuleType("shared.migrate")
    fake.upgrade_database = calls.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "shared.migrate", fake)

    result = run(
        "db",
        "upgrade",
        env={"TRAINYARD_HOME": str(tmp_path / "home"), "TRAINYARD_DATABASE_URL": ""},
    )
    assert result.exit_code == 0, result.output
    assert calls == [f"sqlite:///{(tmp_path / 'home' / 'trainyard.db').resolve()}"]

    url = "postgresql+psycopg://u:secret@db:5432/t"
    result = run("db", "upgrade", env={"TRAINYARD_DATABASE_URL": url})
    assert calls[-1] == url
    assert "secret" not in result.output


def test_local_children() -> None:
    children = local_children(host="127.0.0.1", port=8123, env={"X": "1"}, gpu=True)
    by_name = {c.name: c for c in children}
    assert set(by_name) == {"web", "worker", "reconciler"}
    assert list(by_name["reconciler"].argv)[1:] == ["-m", "server.cli", "reconcile"]
    web_argv = list(by_name["web"].argv)
    assert web_argv[1:4] == ["-m", "server.cli", "web"] and "8123" in web_argv
    worker_argv = list(by_name["worker"].argv)
    assert worker_argv[worker_argv.index("--queues") + 1] == "gpu,cpu"
    assert worker_argv[worker_argv.index("--concurrency") + 1] == "1"
    for child in children:
        # Each child's argv must parse as a real `trainyard` command line.
        ctx = main.make_context("trainyard", list(child.argv[3:]), resilient_parsing=False)
        name, command, rest = main.resolve_command(ctx, list(child.argv[3:]))
        assert command is not None
        command.make_context(name, rest)
    cpu_only = local_children(host="127.0.0.1", port=8123, env={}, gpu=False)
    worker_argv = list(cpu_only[1].argv)
    assert worker_argv[worker_argv.index("--queues") + 1] == "cpu"


def _up_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINYARD_")}
    return {**env, "TRAINYARD_HOME": str(home), "COLUMNS": "200"}


def test_up_refuses_a_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "server.cli", "up", "--port", str(port)],
            cwd=REPO, env=_up_env(tmp_path), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert proc.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "redis").exists()  # failed before starting anything


def test_up_refuses_a_second_up_on_the_same_home(tmp_path: Path) -> None:
    import fcntl

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "up.json").write_text(json.dumps({"pid": 4242}))
    with open(run_dir / "up.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running `up` holds it
        proc = subprocess.run(
            [sys.executable, "-m", "server.cli", "up", "--port", str(free_port())],
            cwd=REPO, env=_up_env(tmp_path), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert proc.returncode == 1
    assert "another `trainyard up` (pid 4242) is already running" in proc.stderr


def test_leftover_children_of_a_killed_up_are_stopped(tmp_path: Path) -> None:
    script = "import time; time.sleep(60)"
    # Looks like one of our children (a "server.cli" argument), in its own group as they are.
    ours = subprocess.Popen([sys.executable, "-c", script, "server.cli"], start_new_session=True)
    stranger = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    # Until a child has exec'd, its command line is still pytest's: under load that took
    # long enough for stop_leftovers to judge the child a stranger.
    deadline = time.monotonic() + 30
    for proc in (ours, stranger):
        cmdline = Path(f"/proc/{proc.pid}/cmdline")
        while script.encode() not in cmdline.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)
    try:
        (tmp_path / "up.json").write_text(
            json.dumps({"pid": 1, "children": {"web": ours.pid, "worker": stranger.pid}})
        )
        stop_leftovers(tmp_path)
        assert ours.wait(5) is not None
        assert stranger.poll() is None  # not ours: left alone
        assert not (tmp_path / "up.json").exists()
    finally:
        for proc in (ours, stranger):
            proc.kill()
            proc.wait()


def test_stop_signals_restores_handlers() -> None:
    before = signal.getsignal(signal.SIGTERM)
    stop = StopSignals()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while stop.received is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.received == signal.SIGTERM
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) == before
