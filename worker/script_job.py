"""Script jobs on the worker: a team's own code, run as a child process under the job's lease.

worker/runner.py claims the job, keeps the lease, records the outcome; for a ScriptSpec
its `_execute` calls `run_script`, which:

1. fetches the code bundle's archive (by the CodeBundle row's SHA-256, cached per host
   under <home>/bundle-cache/) and unpacks it, re-checked (shared/code_bundle.py), into
   a work directory of this attempt, <home>/script-work/job-<id>-attempt-<n>/, removed
   when the attempt ends;
2. gets the interpreter (worker/script_env.py: the worker's own, or a venv for the
   bundle's requirements.txt) and writes the params file;
3. starts `python -m worker.script_launch ENTRY ARGS` (limits, death signal: see that
   module) in a process group of its own, with an allowlisted environment: the worker's
   settings (database and Redis URLs, secret key, store credentials, tokens) never
   reach it; the script talks to the worker only through the channel below;
4. reads two pipes, one thread each: the channel (JSON lines from worker/sdk.py or any
   script following the contract: metric, progress, finish), fed into the attempt's
   fenced, batched metric sink; and the script's stdout and stderr (one pipe, so their
   order is kept) into the job log, bounded: the first `script_log_max_bytes`, then
   only the last `script_log_tail_bytes` at the end, after a line saying how much was
   left out;
5. polls the child and the lease's `should_stop` every POLL_S: a stop (cancel, time
   limit, shutdown, drain, preemption) sends SIGTERM to the script, which the SDK
   turns into should_stop() (checkpoint and exit), and SIGKILL to the whole group
   after spec.stop_grace_s; a lost lease kills the group at once (another attempt may
   be running the job). Whatever happens, the group is killed when the attempt ends.

Outcomes: exit 0 -> the result metrics (finish()'s, else the last value of each logged
key); a stop that was asked for -> JobCancelled (the runner records cancelled, time
limit or hand-back as for built-in jobs); any other exit -> ScriptFailed, a UserError
(failed, no retry) whose message ends with the script's last output lines.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import select
import shutil
import signal
import site
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import worker
from shared.artifact_store import ArtifactStore, bundle_key, store_for
from shared.celery_app import HARD_LIMIT_GRACE_S
from shared.code_bundle import BundleError, BundleLimits, sha256_file, unpack_bundle
from shared.dataset_cache import DATASET_DIRS
from shared.db import transaction
from shared.metric_catalog import MAX_KEY_CHARS, finite_number
from shared.orm import CodeBundle
from shared.settings import Settings
from shared.spec import ScriptSpec
from shared.state_machine import Claim
from worker import script_launch, script_leftovers
from worker.artifact_sync import StoreUnavailable, store_errors
from worker.job_log import JobLog
from worker.lease import StopReason
from worker.memory_limit import current_budget, format_bytes
from worker.script_env import python_for_bundle
from worker.training import JobCancelled, Sink, UserError

log = logging.getLogger(__name__)

BUNDLE_CACHE = "bundle-cache"
SCRIPT_WORK = "script-work"
POLL_S = 0.1
# After the group is killed, how long the readers may take to drain their pipes (a
# process that left the group may hold one open for ever).
DRAIN_S = 5.0
# How many of the script's last output lines a failure's message carries, and at most
# how many characters of them (the runner keeps 4000 of the message).
ERROR_LINES = 20
ERROR_TAIL_CHARS = 3000
# One output line longer than this is cut (a progress bar without newlines, binary).
MAX_LINE_CHARS = 10_000
# A channel line longer than this is not a message (a finish() with a huge object).
MAX_MESSAGE_BYTES = 1 << 20
MAX_PROGRESS_FIELDS = 32
MAX_PROGRESS_TEXT = 200
MAX_STEP = 2**63 - 1
MAX_EPOCH = 2**31 - 1
# The group leader's exit as an error message names the signal; SIGKILL that the
# runner did not send is most likely the kernel's OOM killer.
_OOM_HINTS = ("MemoryError", "can't allocate memory", "Cannot allocate memory")

# Variables of the worker's environment a script gets as they are. Everything else
# (TRAINYARD_* settings, AWS_*, REDIS_*, DATABASE_URL, PIP_*, tokens) stays behind.
ENV_ALLOWLIST = (
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ",
    "CUDA_DEVICE_ORDER",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)  # fmt: skip
ENV_PREFIX_ALLOWLIST = ("LC_",)


class ScriptFailed(UserError):
    """The script exited with an error or was killed without being asked to stop: the
    job's own failure, which another attempt would repeat (worker/failures.py)."""


# ---------------------------------------------------------------- the bundle


@dataclass(frozen=True)
class BundleRef:
    id: int
    sha256: str
    archive_format: str


def load_bundle(settings: Settings, bundle_id: int) -> BundleRef:
    with transaction(settings.resolved_database_url) as session:
        row = session.get(CodeBundle, bundle_id)
        if row is None:
            raise UserError(f"code bundle {bundle_id} no longer exists")
        return BundleRef(row.id, row.sha256, row.archive_format)


def cached_archive(store: ArtifactStore, settings: Settings, bundle: BundleRef) -> Path:
    """The bundle's archive on this host's disk: from the per-host cache when its bytes
    still hash to the bundle's SHA-256, else downloaded (atomically) into the cache."""
    path = settings.home / BUNDLE_CACHE / f"{bundle.sha256}.{bundle.archive_format}"
    if path.is_file() and sha256_file(path) == bundle.sha256:
        return path
    key = bundle_key(bundle.sha256, bundle.archive_format)
    with store_errors(f"downloading code bundle {bundle.id} from {store.url}"):
        found = store.get_file(key, path)
    if not found:
        raise UserError(f"code bundle {bundle.id}'s archive is missing from the artifact store")
    if sha256_file(path) != bundle.sha256:
        path.unlink(missing_ok=True)
        raise StoreUnavailable(f"{key} in {store.url} does not match its SHA-256")
    return path


def work_dir(settings: Settings, job_id: int, attempt: int) -> Path:
    return settings.home / SCRIPT_WORK / f"job-{int(job_id)}-attempt-{int(attempt)}"


# ---------------------------------------------------------------- the environment


@dataclass(frozen=True)
class ChildLimits:
    memory_bytes: int | None
    memory_note: str  # why there is none, or where the number comes from
    open_files: int

    def describe(self) -> str:
        memory = (
            f"memory limit {format_bytes(self.memory_bytes)} ({self.memory_note})"
            if self.memory_bytes is not None
            else f"no memory limit ({self.memory_note})"
        )
        return f"script limits: {memory}, open files {self.open_files}"


def child_limits(spec: ScriptSpec, settings: Settings, device_type: str) -> ChildLimits:
    """RLIMIT_DATA for the script: resources.memory_gb within the slot's budget.

    The worker process itself runs a script job without a limit: its memory is the
    runner's (a few threads and buffers), and a limit there would be inherited through
    fork and exec by the launcher before it sets the script's own."""
    budget = current_budget()
    asked = int(spec.resources.memory_gb * 1e9) if spec.resources.memory_gb else None
    if device_type == "cuda":
        # Same reason as worker/memory_limit.py: the CUDA driver maps private writable
        # memory unrelated to the job's size, and fails inside itself when refused.
        return ChildLimits(None, "not applied on CUDA devices", settings.script_open_files)
    sources = [(asked, "resources.memory_gb"), (budget.limit_bytes, budget.source)]
    present = [(n, why) for n, why in sources if n]
    if not present:
        return ChildLimits(None, budget.source, settings.script_open_files)
    limit, why = min(present)
    return ChildLimits(limit, why, settings.script_open_files)


def _import_path() -> str | None:
    """The directory `worker` is imported from, when that is not a site-packages
    directory the child's interpreter finds by itself (a checkout, an editable install)."""
    root = str(Path(worker.__file__).resolve().parent.parent)
    known = [*site.getsitepackages(), site.getusersitepackages()]
    return None if root in {str(Path(p).resolve()) for p in known} else root


def visible_devices(spec: ScriptSpec) -> str | None:
    """CUDA_VISIBLE_DEVICES for the script: the slot's GPUs (worker/slots.py), the
    first resources.gpus of them, which are the ones a built-in job would train on."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or spec.resources.gpus < 1:
        return visible
    return ",".join(visible.split(",")[: spec.resources.gpus])


@dataclass(frozen=True)
class ScriptRun:
    """One attempt of a script job: what it runs, where, and what it is handed."""

    spec: ScriptSpec
    claim: Claim
    work: Path  # removed when the attempt ends
    checkpoint_dir: Path  # the attempt's artifact directory: kept and uploaded
    resume_dir: Path | None
    device_type: str  # "cuda" or "cpu"
    limits: ChildLimits

    @property
    def code_dir(self) -> Path:
        return self.work / "code"

    @property
    def tmp_dir(self) -> Path:
        # Also how a dead worker's leftovers are recognised (worker/script_leftovers.py).
        return self.work / script_leftovers.TMP_NAME

    @property
    def params_file(self) -> Path:
        return self.work / "params.json"


def script_env(run: ScriptRun, settings: Settings, channel_fd: int) -> dict[str, str]:
    """The child's whole environment: the allowlist, the contract's TRAINYARD_*
    variables and the launcher's own (which it removes before the script runs)."""
    spec, claim, limits = run.spec, run.claim, run.limits
    env = {
        name: value
        for name, value in os.environ.items()
        if name in ENV_ALLOWLIST or name.startswith(ENV_PREFIX_ALLOWLIST)
    }
    visible = visible_devices(spec)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    if settings.torch_threads:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(name, str(settings.torch_threads))
    import_path = _import_path()
    env.update(
        TMPDIR=str(run.tmp_dir),
        PYTHONPATH=os.pathsep.join([p for p in (import_path, str(run.code_dir)) if p]),
        # Output reaches the job log as it is printed, and the last lines before a
        # crash are not lost in a buffer.
        PYTHONUNBUFFERED="1",
        TRAINYARD_JOB_ID=str(claim.job_id),
        TRAINYARD_ATTEMPT=str(claim.attempt),
        TRAINYARD_CHECKPOINT_DIR=str(run.checkpoint_dir),
        TRAINYARD_PARAMS_FILE=str(run.params_file),
        TRAINYARD_DEVICE=run.device_type,
        TRAINYARD_CHANNEL_FD=str(channel_fd),
    )
    if run.resume_dir is not None:
        env["TRAINYARD_RESUME_DIR"] = str(run.resume_dir)
    if spec.dataset is not None:
        env["TRAINYARD_DATASET"] = spec.dataset.name
        dataset_dir = settings.resolved_data_dir / DATASET_DIRS[spec.dataset.name]
        env["TRAINYARD_DATASET_DIR"] = str(dataset_dir)
    env[script_launch.PARENT_VAR] = str(os.getpid())
    env[script_launch.DIR_VAR] = str(run.code_dir)
    env[script_launch.OPEN_FILES_VAR] = str(limits.open_files)
    if limits.memory_bytes is not None:
        env[script_launch.MEMORY_VAR] = str(limits.memory_bytes)
    if import_path:
        env[script_launch.IMPORT_PATH_VAR] = import_path
    return env


# ---------------------------------------------------------------- output and channel


class ScriptOutput:
    """The script's output lines into the job log: the first `head_bytes` as they come,
    then a rolling window of the last `tail_bytes`, written at `close` after a line
    saying how many bytes were left out. The last few lines are kept for the error."""

    def __init__(self, job_log: JobLog, head_bytes: int, tail_bytes: int) -> None:
        self._job_log = job_log
        self._head_left = head_bytes
        self._tail_bytes = tail_bytes
        self._tail: deque[tuple[str, int]] = deque()
        self._tail_size = 0
        self._omitted = 0
        self._lock = threading.Lock()
        self.last_lines: deque[str] = deque(maxlen=ERROR_LINES)

    def line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace").rstrip("\r")
        if "\r" in text:  # a progress bar redrawn in place: its last state
            text = text.rsplit("\r", 1)[1]
        if len(text) > MAX_LINE_CHARS:
            text = f"{text[:MAX_LINE_CHARS]} [... {len(text) - MAX_LINE_CHARS} characters cut]"
        size = len(raw) + 1
        with self._lock:
            self.last_lines.append(text)
            if not self._tail and size <= self._head_left:
                self._head_left -= size
                self._job_log.event(text)
                return
            self._tail.append((text, size))
            self._tail_size += size
            while self._tail_size > self._tail_bytes and len(self._tail) > 1:
                _, dropped = self._tail.popleft()
                self._tail_size -= dropped
                self._omitted += dropped

    def close(self) -> None:
        with self._lock:
            if self._omitted:
                self._job_log.event(
                    f"... {self._omitted} bytes of the script's output omitted "
                    "(TRAINYARD_SCRIPT_LOG_MAX_BYTES, TRAINYARD_SCRIPT_LOG_TAIL_BYTES)"
                )
            for text, _ in self._tail:
                self._job_log.event(text)
            self._tail.clear()


class BadMessage(ValueError):
    pass


class Channel:
    """The script's JSON-lines messages into the sink; remembers what the result needs."""

    def __init__(self, sink: Sink, job_log: JobLog) -> None:
        self._sink = sink
        self._job_log = job_log
        self.finish_metrics: dict[str, Any] | None = None
        self.last_values: dict[str, float] = {}
        self.points = 0
        self.bad_lines = 0

    def line(self, raw: bytes) -> None:
        if not raw.strip():
            return
        try:
            if len(raw) > MAX_MESSAGE_BYTES:
                raise BadMessage(f"longer than {MAX_MESSAGE_BYTES} bytes")
            try:
                message = json.loads(raw)
            except ValueError as exc:
                raise BadMessage(f"not JSON ({exc})") from None
            self.handle(message)
        except BadMessage as exc:
            self.bad_lines += 1
            if self.bad_lines == 1:
                self._job_log.event(
                    f"ignored a line on the script's channel: {exc}; later ones are counted"
                )

    def handle(self, message: Any) -> None:
        if not isinstance(message, dict):
            raise BadMessage("not a JSON object")
        kind = message.get("type")
        if kind == "metric":
            self._metric(message)
        elif kind == "progress":
            self._sink.progress(_progress_fields(message))
        elif kind == "finish":
            metrics = message.get("metrics")
            if not isinstance(metrics, dict):
                raise BadMessage('a "finish" message needs "metrics": an object')
            self.finish_metrics = _json_safe(metrics)
        else:
            raise BadMessage(f"unknown type {kind!r} (metric, progress, finish)")

    def _metric(self, message: dict[str, Any]) -> None:
        key, value = message.get("key"), message.get("value")
        step, epoch = message.get("step"), message.get("epoch")
        if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_CHARS:
            raise BadMessage(f'a metric needs "key": a string of 1 to {MAX_KEY_CHARS} characters')
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadMessage(f"metric {key!r}: value must be a number")
        if not _is_int(step) or not 0 <= step <= MAX_STEP:
            raise BadMessage(f"metric {key!r}: step must be a non-negative integer")
        if epoch is not None and (not _is_int(epoch) or not 0 <= epoch <= MAX_EPOCH):
            raise BadMessage(f"metric {key!r}: epoch must be a non-negative integer or null")
        self._sink.log(key, float(value), step, epoch)
        self.points += 1
        number = finite_number(value)
        if number is not None:
            self.last_values[key] = number

    def close(self) -> None:
        if self.bad_lines > 1:
            self._job_log.event(f"ignored {self.bad_lines} lines on the script's channel in all")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _progress_fields(message: dict[str, Any]) -> dict[str, Any]:
    fields = {k: v for k, v in message.items() if k != "type"}
    if len(fields) > MAX_PROGRESS_FIELDS:
        raise BadMessage(f"progress has more than {MAX_PROGRESS_FIELDS} fields")
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if len(key) > MAX_KEY_CHARS:
            raise BadMessage(f"progress field name longer than {MAX_KEY_CHARS} characters")
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        elif isinstance(value, str):
            value = value[:MAX_PROGRESS_TEXT]
        elif value is not None and not isinstance(value, (bool, int, float)):
            raise BadMessage(f"progress field {key!r} must be a number, string, true/false or null")
        out[key] = value
    return out


def _json_safe(value: Any) -> Any:
    """`value` with non-finite numbers as null: the result column is JSON, which has
    no NaN (PostgreSQL refuses the token)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


class LineReader(threading.Thread):
    """Reads a pipe and hands each line (without its newline) to `on_line`, until end
    of file, or until `give_up` is set while the pipe has nothing to read."""

    def __init__(self, fd: int, on_line: Callable[[bytes], None], name: str,
                 max_line: int) -> None:  # fmt: skip
        super().__init__(name=name, daemon=True)
        self._fd = fd
        self._on_line = on_line
        self._max_line = max_line
        self.give_up = threading.Event()
        self.failed_lines = 0

    def run(self) -> None:
        buffer = b""
        while not self.give_up.is_set():
            ready, _, _ = select.select([self._fd], [], [], 0.2)
            if not ready:
                continue
            chunk = os.read(self._fd, 1 << 16)
            if not chunk:
                break
            buffer += chunk
            if b"\n" not in chunk and len(buffer) <= self._max_line:
                continue
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                self._deliver(line)
            if len(buffer) > self._max_line:
                self._deliver(buffer)  # too long to wait for its end
                buffer = b""
        if buffer:
            self._deliver(buffer)

    def _deliver(self, line: bytes) -> None:
        # A line that cannot be handled is lost, not the pipe: a reader that stopped
        # would leave the script blocked on a full pipe.
        try:
            self._on_line(line)
        except Exception:  # noqa: BLE001 - logged once per reader
            if self.failed_lines == 0:
                log.warning("%s: a line could not be handled", self.name, exc_info=True)
            self.failed_lines += 1


# ---------------------------------------------------------------- running it


def run_script(
    spec: ScriptSpec,
    settings: Settings,
    claim: Claim,
    sink: Sink,
    should_stop: Callable[[], bool],
    job_log: JobLog,
    *,
    device_type: str,
    resume_dir: Path | None,
    checkpoint_dir: Path,
    stop_reason: Callable[[], StopReason | None] = lambda: None,
) -> dict[str, Any]:
    """Run the script to its end; returns the result metrics (see the module docstring
    for what it raises). `checkpoint_dir`: this attempt's artifact directory."""
    store = store_for(settings)
    bundle = load_bundle(settings, spec.bundle_id)
    archive = cached_archive(store, settings, bundle)
    run = ScriptRun(
        spec, claim, work_dir(settings, claim.job_id, claim.attempt), checkpoint_dir,
        resume_dir, device_type, child_limits(spec, settings, device_type),
    )  # fmt: skip
    shutil.rmtree(run.work, ignore_errors=True)  # a killed worker's leftover of this attempt
    swept = script_leftovers.sweep(run.work.parent)
    if swept:
        job_log.event(f"killed {swept} process(es) a dead worker's script job left on this host")
    try:
        run.tmp_dir.mkdir(parents=True)
        script_leftovers.claim_dir(run.work)
        try:
            manifest = unpack_bundle(archive, run.code_dir, BundleLimits.from_settings(settings))
        except BundleError as exc:
            raise UserError(f"code bundle {bundle.id} cannot be unpacked: {exc.message}") from None
        job_log.event(
            f"code bundle {bundle.id} ({bundle.sha256[:12]}, {manifest.file_count} files) unpacked"
        )
        python = python_for_bundle(run.code_dir, settings, job_log.event, cancelled=should_stop)
        run.params_file.write_text(json.dumps(spec.params), encoding="utf-8")
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        job_log.event(run.limits.describe())
        return _run_child(run, settings, python, sink, should_stop, stop_reason, job_log)
    finally:
        shutil.rmtree(run.work, ignore_errors=True)


def _run_child(
    run: ScriptRun,
    settings: Settings,
    python: Path,
    sink: Sink,
    should_stop: Callable[[], bool],
    stop_reason: Callable[[], StopReason | None],
    job_log: JobLog,
) -> dict[str, Any]:
    spec, claim = run.spec, run.claim
    read_fd, write_fd = os.pipe()
    env = script_env(run, settings, write_fd)
    argv = [str(python), "-m", "worker.script_launch", spec.entry, *spec.args]
    output = ScriptOutput(job_log, settings.script_log_max_bytes, settings.script_log_tail_bytes)
    channel = Channel(sink, job_log)
    try:
        # Started in the work directory (`-m` puts it first on sys.path, and it holds
        # no package that could shadow the launcher); the launcher moves to code_dir.
        proc = subprocess.Popen(
            argv, cwd=run.work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, pass_fds=(write_fd,), start_new_session=True,
        )  # fmt: skip
    except OSError:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)  # the child's copy is the only writer: EOF when it is gone
    assert proc.stdout is not None
    job_log.event(
        f"started {spec.entry}{''.join(' ' + a for a in spec.args)} as process {proc.pid}"
    )
    readers = [
        LineReader(read_fd, channel.line, f"script-channel-{claim.job_id}", MAX_MESSAGE_BYTES),
        LineReader(proc.stdout.fileno(), output.line, f"script-output-{claim.job_id}",
                   4 * MAX_LINE_CHARS),
    ]  # fmt: skip
    for reader in readers:
        reader.start()
    stop_asked = False
    try:
        stop_asked = _supervise(proc, spec, should_stop, stop_reason, job_log)
    finally:
        _kill_group(proc)
        returncode = proc.wait()
        deadline = time.monotonic() + DRAIN_S
        for reader in readers:
            reader.join(max(0.0, deadline - time.monotonic()))
            reader.give_up.set()
            reader.join()
        os.close(read_fd)
        proc.stdout.close()
        output.close()
        channel.close()
    job_log.event(f"the script {_how_it_ended(returncode)}; {channel.points} metric points")
    if stop_asked:
        raise JobCancelled(f"script stopped on request; it {_how_it_ended(returncode)}")
    if returncode != 0:
        raise ScriptFailed(_failure_message(returncode, output, run.limits))
    if channel.finish_metrics is not None:
        return channel.finish_metrics
    return dict(channel.last_values)


def _supervise(
    proc: subprocess.Popen[bytes],
    spec: ScriptSpec,
    should_stop: Callable[[], bool],
    stop_reason: Callable[[], StopReason | None],
    job_log: JobLog,
) -> bool:
    """Wait for the child to exit, stopping it when the lease says so; whether a stop
    was asked for. Returns with the child exited but not reaped (see `_exited`)."""
    asked_at: float | None = None
    grace = float(spec.stop_grace_s)
    killed = False
    while not _exited(proc.pid):
        now = time.monotonic()
        if asked_at is None and should_stop():
            asked_at = now
            reason = stop_reason()
            if reason is StopReason.LOST:
                job_log.event("lease lost: killing the script at once")
                _kill_group(proc)
                killed = True
            else:
                if reason is StopReason.TIME_LIMIT:
                    # Celery's hard time limit comes HARD_LIMIT_GRACE_S after this one
                    # and would kill the worker process; stop well before it.
                    grace = min(grace, HARD_LIMIT_GRACE_S / 2)
                job_log.event(f"asking the script to stop (SIGTERM); killed after {grace:g} s")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        elif asked_at is not None and not killed and now - asked_at >= grace:
            job_log.event(f"the script did not stop within {grace:g} s: killing it")
            _kill_group(proc)
            killed = True
        time.sleep(POLL_S)
    return asked_at is not None


def _exited(pid: int) -> bool:
    """Whether the child exited, leaving it unreaped (WNOWAIT): while its zombie lasts,
    its pid and so its process group id cannot be reused, so killing the group after
    it never hits a stranger's."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child's process group (it leads it: start_new_session), so no process
    the script started outlives the attempt."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _how_it_ended(returncode: int) -> str:
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = "unknown"
    return f"was killed by signal {-returncode} ({name})"


def _failure_message(returncode: int, output: ScriptOutput, limits: ChildLimits) -> str:
    message = f"the script {_how_it_ended(returncode)}"
    lines = list(output.last_lines)
    if limits.memory_bytes is not None and any(h in line for line in lines for h in _OOM_HINTS):
        message += f" (out of memory: its limit is {format_bytes(limits.memory_bytes)})"
    elif returncode == -signal.SIGKILL:
        message += " (not by Trainyard: likely the kernel's out-of-memory killer)"
    tail: list[str] = []
    size = 0
    for line in reversed(lines):
        size += len(line) + 1
        if size > ERROR_TAIL_CHARS:
            break
        tail.append(line)
    if not tail:
        return f"{message}; it printed nothing"
    return f"{message}; its last lines:\n" + "\n".join(reversed(tail))
