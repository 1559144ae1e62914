"""Every TRAINYARD_* environment variable, parsed in one place.

pydantic-settings does the parsing and type checking, so a bad value
(TRAINYARD_LEASE_SECONDS=abc) fails at start-up with the variable named.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.broker import BrokerUrlError
from shared.broker import check_url as check_broker_url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRAINYARD_", extra="ignore", frozen=True)

    # State directory for local mode: SQLite file, embedded Redis AOF, artifacts.
    home: Path = Path(".trainyard")
    # Default: a SQLite file under `home`. Production: postgresql+psycopg://...
    database_url: str | None = None
    # None means "local mode starts an embedded Redis"; server and worker need it set.
    redis_url: str | None = None
    # Where job files (checkpoints, logs, exports) and uploads are kept: a local
    # directory (the default, `home`/artifacts) or an S3-compatible bucket,
    # `s3://bucket/prefix` (shared/artifact_store.py). With a bucket, web and workers
    # share nothing but the URL; credentials come from the usual AWS_* variables.
    artifacts_url: str | None = None
    # The S3 endpoint for MinIO, Ceph or any non-AWS service (unset: AWS itself).
    s3_endpoint_url: str | None = None
    # With a bucket: downloads answer 302 to a presigned URL valid this many seconds
    # instead of streaming through the web process (0: always stream; clients must be
    # able to reach the bucket's endpoint for a redirect to work).
    s3_presign_seconds: int = Field(default=0, ge=0, le=7 * 24 * 3600)
    # This host's copy of job files: the files themselves in local mode; with a bucket,
    # where the worker writes before uploading and where it downloads to resume.
    artifacts_dir: Path | None = None
    # MNIST / CIFAR files and other on-disk datasets (no downloads at run time).
    data_dir: Path | None = None
    # Where the CLI finds the HTTP API.
    url: str = "http://127.0.0.1:8000"
    # The CLI's API token; without it the CLI reads `home`/cli-token (written by `up`).
    token: str | None = None
    # Signs session cookies and CSRF tokens. Every web process must share it; unset, one
    # is generated once and kept in `home`/secret-key.
    secret_key: str | None = Field(default=None, min_length=16)
    # Prometheus scrapes GET /metrics with `Authorization: Bearer <metrics_token>`
    # (server/prometheus.py); unset, only admins' API tokens may read it.
    metrics_token: str | None = Field(default=None, min_length=16)
    # "json": every process logs one JSON object a line, with job_id/attempt on lines
    # about a job (shared/log_setup.py); "text" for people.
    log_format: Literal["text", "json"] = "text"
    # Session cookies only over HTTPS. Unset: on when `url` is https.
    secure_cookies: bool | None = None
    # A login lasts at most this long, however busy (absolute, counted from the login):
    # a copied cookie is useless after it even if nobody logs out.
    session_hours: float = Field(default=12.0, gt=0, le=24 * 31)
    # A page's CSRF token stops working this long after the page was rendered; the form
    # then says it expired and to reload.
    csrf_hours: float = Field(default=8.0, gt=0, le=24 * 31)
    # Login throttling, per (username, client address) and per client address: this many
    # failures are free, each further one doubles a wait (1 s, 2 s, 4 s, ...) up to the
    # cap. Only addresses that failed wait; a success clears that name's count there.
    login_free_failures: int = Field(default=5, ge=1)
    login_address_free_failures: int = Field(default=20, ge=1)
    login_max_backoff_seconds: int = Field(default=900, ge=1)
    # Reverse proxies in front of the web server (nginx in the compose file = 1). Their
    # X-Forwarded-For/-Proto/-Host are trusted that many hops deep; with 0 those headers
    # are ignored, since any client can write them.
    trusted_proxies: int = Field(default=0, ge=0, le=10)
    # Per-user limits on POST /api/v1/jobs (and retries): jobs waiting in the queue, and
    # submissions per time window (Flask-Limiter syntax, counted in Redis).
    max_queued_per_user: int = Field(default=200, ge=1)
    submit_rate_limit: str = "120/minute"
    # Admission limits (shared/limits.py; README "Admission limits"): what one job may ask
    # for, checked at submission against the spec and its estimated memory
    # (shared/job_estimate.py). Members get the *_per_user values, admins the *_per_admin
    # ones; an admin raises one user's in users.limits under the *_per_user name, with
    # `trainyard user limits` or PATCH /api/v1/users/<name>/limits.
    max_params_per_user: int = Field(default=100_000_000, ge=1)
    max_params_per_admin: int = Field(default=2_000_000_000, ge=1)
    max_memory_gib_per_user: float = Field(default=16.0, gt=0)
    max_memory_gib_per_admin: float = Field(default=64.0, gt=0)
    max_batch_size_per_user: int = Field(default=8192, ge=1)
    max_batch_size_per_admin: int = Field(default=65_536, ge=1)
    max_epochs_per_user: int = Field(default=1000, ge=1)
    max_epochs_per_admin: int = Field(default=10_000, ge=1)
    # max_runtime_s given to a job whose spec sets none, and the most a spec may set.
    default_runtime_s_per_user: int = Field(default=6 * 3600, ge=1)
    default_runtime_s_per_admin: int = Field(default=24 * 3600, ge=1)
    max_runtime_s_per_user: int = Field(default=24 * 3600, ge=1)
    max_runtime_s_per_admin: int = Field(default=30 * 24 * 3600, ge=1)
    # Live job pages (docs/architecture.md, "Live job pages"): open streams per user,
    # across every web process (counted in Redis), and per web process (each stream is a
    # socket and one database poll a second in that process). Over either: 429.
    max_streams_per_user: int = Field(default=10, ge=1)
    max_streams_per_process: int = Field(default=200, ge=1)
    # How long the web server waits for a request's headers (read without holding a
    # request thread) before it closes the connection: slow clients cannot pile up.
    header_timeout_seconds: float = Field(default=10.0, gt=0, le=300)

    max_body_bytes: int = Field(default=1_000_000, ge=1024)
    # CSV uploads for the `csv` dataset.
    max_upload_bytes: int = Field(default=100_000_000, ge=1024)
    # Per-user quotas (an admin can override each for one user in users.limits, under
    # the same name): bytes of CSV uploaded and kept, uploads kept, unrevoked API tokens;
    # and rates (moving windows in Redis, like submit_rate_limit) of uploads and of token
    # creation. Deleting an upload or revoking a token frees its share of the quota.
    max_upload_bytes_per_user: int = Field(default=2_000_000_000, ge=1024)
    max_uploads_per_user: int = Field(default=200, ge=1)
    max_tokens_per_user: int = Field(default=20, ge=1)
    # Code bundles of script jobs (shared/code_bundle.py): the archive, what it unpacks
    # to (a zip bomb stops here), its files; bundles kept per user.
    max_bundle_bytes: int = Field(default=50_000_000, ge=1024)
    max_bundle_unpacked_bytes: int = Field(default=500_000_000, ge=1024)
    max_bundle_files: int = Field(default=20_000, ge=1)
    max_bundles_per_user: int = Field(default=100, ge=1)
    # A script job's child process (worker/script_job.py): the stdout/stderr kept in the
    # job log (the first bytes, then the last TRAINYARD_SCRIPT_LOG_TAIL_BYTES), and its
    # open-files limit (RLIMIT_NOFILE).
    script_log_max_bytes: int = Field(default=5_000_000, ge=1024)
    script_log_tail_bytes: int = Field(default=500_000, ge=1024)
    script_open_files: int = Field(default=4096, ge=64)
    # A script bundle's requirements.txt is installed into a virtual environment cached
    # per host (worker/script_env.py): pip may take this long before the job fails (a
    # hung index or a huge build must not hold a slot forever), and this many such
    # environments are kept, the least recently used removed first (each can be GBs).
    script_env_install_seconds: float = Field(default=1800.0, gt=0)
    script_envs_kept: int = Field(default=20, ge=1)
    upload_rate_limit: str = "30/hour"
    token_rate_limit: str = "10/hour"
    # The largest dataset file (an IDX file once decompressed, a CIFAR-10 batch) the
    # catalogue accepts and a worker reads; checked from the header before reading.
    max_dataset_file_bytes: int = Field(default=1 << 30, ge=1024)
    # Reliability timings (docs/architecture.md, "Reliability"; README "Reliability"). A worker that dies is
    # noticed within lease_seconds + reconcile_seconds: its lease stops being renewed,
    # and the next reconciler pass after expiry requeues the job.
    #
    # How long a claim lasts without a heartbeat. Longer than a few heartbeats, so one
    # slow DB write does not cost a running job its lease.
    lease_seconds: float = Field(default=60.0, gt=0)
    # How often the worker renews the lease (and sees a cancel request).
    heartbeat_seconds: float = Field(default=10.0, gt=0)
    # Claims per job, the first included; a job whose whole worker keeps dying ends
    # `failed` after this many instead of looping. (A job whose own process is killed,
    # by the OOM killer say, fails at once: docs/architecture.md, "Reliability" R10.)
    max_attempts: int = Field(default=3, ge=1, le=100)
    # How often the reconciler looks for expired leases and lost messages.
    reconcile_seconds: float = Field(default=15.0, gt=0)
    # A queued job nobody claimed for this long, and whose message the broker no longer
    # holds (Redis flushed, or the server died between commit and enqueue), is published
    # again. A job whose message is still waiting behind busy workers is left alone.
    requeue_after_seconds: float = Field(default=60.0, gt=0)
    # Redis redelivers a message not acked within this (celery#5935): must exceed the
    # longest job and lease_seconds. The lease, not this, detects lost workers; the
    # duplicate a redelivery creates is stopped by the claim (docs/architecture.md, "Reliability" R2).
    visibility_timeout: int = Field(default=12 * 3600, ge=60)
    # Metric sink: flush after this many points or this many seconds, whichever first.
    metric_flush_points: int = Field(default=500, ge=1)
    metric_flush_seconds: float = Field(default=2.0, gt=0)
    # A running train job's GPUs and processes are sampled this often (worker/telemetry.py):
    # GPU utilization, memory, temperature, power, and the job's CPU % and resident
    # memory, stored as its metrics. 0 turns the job metrics off (the workers page still
    # shows each slot's latest sample); below 1 s counts as 1 s.
    telemetry_seconds: float = Field(default=5.0, ge=0)
    # Torch intra-op threads per worker slot; 0 = cores // slots.
    torch_threads: int = Field(default=0, ge=0)
    # Jobs a CPU worker runs at once (`trainyard worker -c` overrides it). A GPU worker
    # runs one job per GPU slot instead (worker/slots.py).
    worker_slots: int = Field(default=1, ge=1)
    # Which GPUs a worker uses (`trainyard worker --gpus`): "all" (every GPU NVML lists;
    # none on a CPU host), "none" (train on CPU), or NVML indices "0,1,3". Each slot owns
    # gpus_per_slot of them (`--gpus-per-slot`); the worker runs one job per slot.
    worker_gpus: str = "all"
    gpus_per_slot: int = Field(default=1, ge=1)
    # Each job's process runs under a memory limit (worker/memory_limit.py), so a job
    # that allocates past it fails as OutOfMemory instead of waking the host's OOM
    # killer. The limit per slot: slot_memory_bytes, or 0 for slot_memory_fraction of
    # the host's RAM (or of the container's limit) divided by the worker's slots.
    enforce_memory_limit: bool = True
    slot_memory_bytes: int = Field(default=0, ge=0)
    slot_memory_fraction: float = Field(default=0.8, gt=0, le=1)
    # Checked when a worker claims a job (shared/claim_limits.py): a job whose owner
    # already has this many running jobs, or used this many GPU-hours in the last 24 h,
    # waits in the queue and is offered again after requeue_after_seconds. Members get
    # the *_per_user values, admins the *_per_admin ones; 0 means no limit. An admin's
    # override for one user lives in users.limits under the *_per_user name.
    max_running_jobs_per_user: int = Field(default=4, ge=0)
    max_running_jobs_per_admin: int = Field(default=0, ge=0)
    gpu_hours_per_day_per_user: float = Field(default=24.0, ge=0)
    gpu_hours_per_day_per_admin: float = Field(default=0.0, ge=0)
    # Scheduling (shared/scheduling.py; README "Scheduling"). A waiting job's effective
    # priority is its priority plus this many points per hour it has waited, so a
    # priority-0 job overtakes fresh priority-9 jobs after 9 hours at the default:
    # delayed, never starved.
    aging_points_per_hour: float = Field(default=1.0, ge=0)
    # Preemption: a waiting job may stop a running preemptible job of strictly lower
    # priority in its queue when no slot is free, once the victim has run this long...
    preempt_min_runtime_seconds: float = Field(default=300.0, ge=0)
    # ...and was not preempted within this long (the guard against preemption loops).
    preempt_guard_seconds: float = Field(default=1800.0, ge=0)
    # Queues whose jobs are preemptible unless their spec says `preemptible: false`
    # (comma-separated; empty: only jobs whose spec says `preemptible: true`).
    preemptible_queues: str = ""
    # Crash guard (worker/node_control.py; README "Draining and cordoning workers"): a
    # worker slot whose jobs die this many times in a row, each within
    # crash_guard_seconds of its claim (an infrastructure failure, a crash that is not
    # the job's own error, or its process killed), stops taking jobs until an admin
    # clears it (`trainyard worker clear NODE`). 0 turns the guard off.
    crash_guard_runs: int = Field(default=3, ge=0)
    crash_guard_seconds: float = Field(default=10.0, gt=0)
    # Stuck consumer (shared/fleet_health.py): a node that is online, takes jobs, has
    # a slot idle this long and received no message this long while its queues hold
    # messages and a job it could run has waited this long is shown "not consuming".
    stuck_consumer_seconds: float = Field(default=120.0, gt=0)
    # Also let the worker restart its own queue consumer (cancel and add it again, as
    # Celery's cancel_consumer/add_consumer do) when it finds itself not consuming by
    # the same rule, confirmed twice in a row; each restart is shown on the workers page.
    stuck_consumer_restart: bool = False
    # A node whose slots all vanished without a clean shutdown is shown "lost" (and one
    # stopped cleanly "stopped") for this long after it was last seen, then forgotten.
    lost_worker_hours: float = Field(default=24.0, gt=0)
    # Sweeps (shared/sweep_spec.py): the most trials one sweep may ask for; each trial is
    # a job, so this bounds what one request can put on the queue.
    sweep_max_trials: int = Field(default=1000, ge=1)
    # A sweep's space is checked at creation by validating a finite set of its points as
    # job specs (about 40 microseconds each); a space needing more checks than this is
    # refused, so one request cannot hold a web thread for long.
    sweep_max_points_checked: int = Field(default=10_000, ge=1)
    # The prediction server (`trainyard serve`, worker/serving/; README "Serving
    # predictions"). Loaded model versions are kept up to this many bytes of weights
    # (least recently used leave first); concurrent requests for one version are
    # gathered into one forward pass of up to serve_max_batch rows, waiting at most
    # serve_max_wait_ms for more; at most serve_queue_limit requests wait per version
    # (more: 503 with Retry-After). serve_batching off runs each request's own forward
    # pass (the benchmark's baseline). A name's production (or staging) version is
    # looked up again after serve_resolve_seconds, so a promotion is served without a
    # restart; tokens are re-checked as often. Stats go to Redis every
    # serve_stats_seconds for the Models page.
    serve_cache_bytes: int = Field(default=2 << 30, ge=1)
    serve_max_batch: int = Field(default=64, ge=1, le=65_536)
    serve_max_wait_ms: float = Field(default=5.0, ge=0, le=10_000)
    serve_queue_limit: int = Field(default=256, ge=1)
    serve_batching: bool = True
    serve_max_rows: int = Field(default=1024, ge=1)
    serve_resolve_seconds: float = Field(default=2.0, ge=0, le=3600)
    serve_stats_seconds: float = Field(default=5.0, gt=0, le=3600)
    # A TensorBoard export (GET /api/v1/jobs/{id}/tensorboard) keeps at most this many
    # points of each series, evenly spaced and always the last: TensorBoard itself
    # samples 1,000 per chart, and a million points take 15 s and 55 MB to write.
    tensorboard_max_points: int = Field(default=100_000, ge=2, le=10_000_000)
    # Workers also write each train job's metrics as TensorBoard event files while it
    # runs, in `<attempt dir>/tensorboard/` beside its checkpoints (worker/tensorboard_live.py).
    tensorboard_live: bool = False
    # Webhooks (shared/webhooks.py, shared/webhook_delivery.py; README "Webhooks").
    # Private, loopback, link-local (cloud metadata) and other non-public addresses are
    # refused as webhook targets, at creation and again at every send, unless this is
    # on. Unset: refused when `url` is https (a production-like install), allowed
    # otherwise (local mode, whose receivers are often on this machine).
    webhook_allow_private: bool | None = None
    # One send waits this long for the receiver's answer; redirects are not followed.
    webhook_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    # Retries: retry_base * 2^(attempt-1), at most retry_max, with +-20% jitter, up to
    # max_attempts sends in all (the defaults: about a day), then the delivery is failed.
    webhook_retry_base_seconds: float = Field(default=10.0, gt=0)
    webhook_retry_max_seconds: float = Field(default=3600.0, gt=0)
    webhook_max_attempts: int = Field(default=32, ge=1, le=1000)
    # How often the dispatcher (a thread of `trainyard reconcile`) looks for new events
    # and due deliveries; how long a dispatcher holds a delivery it is sending.
    webhook_poll_seconds: float = Field(default=1.0, gt=0, le=60)
    webhook_lease_seconds: float = Field(default=60.0, gt=0)
    # Events and their delivery log are kept this long, then deleted.
    webhook_retention_days: float = Field(default=30.0, gt=0)
    max_webhooks_per_user: int = Field(default=20, ge=1)

    @field_validator("worker_gpus")
    @classmethod
    def _check_worker_gpus(cls, value: str) -> str:
        parsed = parse_gpu_selection(value)
        return parsed if isinstance(parsed, str) else ",".join(map(str, parsed))

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, url: str | None) -> str | None:
        if url:
            try:
                check_broker_url(url)
            except BrokerUrlError as exc:
                raise ValueError(f"TRAINYARD_REDIS_URL {exc}") from None
        return url or None

    @field_validator("artifacts_url")
    @classmethod
    def _check_artifacts_url(cls, url: str | None) -> str | None:
        if url and "://" in url and not url.startswith(("s3://", "file://")):
            raise ValueError(
                "TRAINYARD_ARTIFACTS_URL must be a directory, file:///path or s3://bucket/prefix"
            )
        if url and url.startswith("s3://") and not url.removeprefix("s3://").split("/")[0]:
            raise ValueError(
                "TRAINYARD_ARTIFACTS_URL s3:// needs a bucket name: s3://bucket/prefix"
            )
        return url or None

    @model_validator(mode="after")
    def _check_timings(self) -> Settings:
        if self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError(
                "TRAINYARD_HEARTBEAT_SECONDS must be smaller than TRAINYARD_LEASE_SECONDS"
            )
        if self.visibility_timeout <= self.lease_seconds:
            # Below the lease almost every job outlives it and is redelivered to another
            # worker that only finds the claim taken: wasted deliveries, nothing gained.
            raise ValueError(
                "TRAINYARD_VISIBILITY_TIMEOUT must be larger than TRAINYARD_LEASE_SECONDS "
                "(and than the longest job)"
            )
        return self

    @cached_property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / 'trainyard.db').resolve()}"

    @cached_property
    def resolved_artifacts_dir(self) -> Path:
        if self.artifacts_dir is None and self.artifacts_url and not self.artifacts_in_bucket:
            return Path(self.artifacts_url.removeprefix("file://")).expanduser().resolve()
        return (self.artifacts_dir or self.home / "artifacts").resolve()

    @property
    def artifacts_in_bucket(self) -> bool:
        return bool(self.artifacts_url) and str(self.artifacts_url).startswith("s3://")

    @cached_property
    def uploads_dir(self) -> Path:
        return self.resolved_artifacts_dir / "uploads"

    @cached_property
    def resolved_data_dir(self) -> Path:
        return (self.data_dir or self.home / "data").resolve()

    @cached_property
    def cli_token_path(self) -> Path:
        return self.home / "cli-token"

    @cached_property
    def resolved_secret_key(self) -> str:
        if self.secret_key:
            return self.secret_key
        path = self.home / "secret-key"
        if not path.exists():
            _write_private(path, secrets.token_hex(32), replace=False)
        return path.read_text().strip()

    @property
    def cookies_secure(self) -> bool:
        if self.secure_cookies is not None:
            return self.secure_cookies
        return self.url.startswith("https://")

    @property
    def webhooks_allow_private(self) -> bool:
        if self.webhook_allow_private is not None:
            return self.webhook_allow_private
        return not self.url.startswith("https://")

    def require_redis_url(self) -> str:
        if not self.redis_url:
            raise RuntimeError(
                "TRAINYARD_REDIS_URL is not set (e.g. redis://127.0.0.1:6379/0); "
                "`trainyard up` sets it for the processes it starts"
            )
        return self.redis_url


def parse_gpu_selection(text: str) -> str | tuple[int, ...]:
    """`--gpus` / TRAINYARD_WORKER_GPUS: "all", "none", or distinct GPU indices "0,1,3"
    (kept in the order given: slots take them in that order). Raises ValueError."""
    value = text.strip().lower()
    if value in ("all", "none"):
        return value
    parts = [p.strip() for p in value.split(",")]
    if not value or not all(p.isdigit() for p in parts):
        raise ValueError(f"GPUs must be all, none or indices like 0,1,3, not {text!r}")
    indices = tuple(int(p) for p in parts)
    if len(set(indices)) != len(indices):
        raise ValueError(f"GPUs {text!r} name a GPU twice")
    return indices


def _write_private(path: Path, text: str, *, replace: bool) -> None:
    """Write a file only its owner can read, complete before anyone can open it.

    Without `replace`, an existing file wins: two processes starting at once cannot each
    keep a different secret (os.link fails for the second, which then reads the first's).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_private_file(path: Path, text: str) -> None:
    """Replace `path` with `text`, readable by its owner only (tokens, passwords)."""
    _write_private(path, text, replace=True)


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment; keyword arguments win (tests use them)."""
    return Settings(**overrides)  # type: ignore[arg-type]
