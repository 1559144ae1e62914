"""The ORM tables: users and their API tokens, a Job row per submitted job, its MetricPoint rows.

The schema changes only through Alembic revisions in migrations/; keep the two in step
(tests/test_migrations.py compares them).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from shared.db import utcnow

# SQLite only auto-increments INTEGER PRIMARY KEY, PostgreSQL wants BIGINT for big tables.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class User(Base):
    """Someone who logs in to the web UI or calls the API with a token."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    # "admin" sees and acts on every job; "member" only on their own (shared/accounts.py).
    role: Mapped[str] = mapped_column(String(16), default="member")
    # argon2id hash; None for an account that only uses API tokens.
    password_hash: Mapped[str | None] = mapped_column(String(255))
    # A disabled account keeps its jobs but can neither log in nor use its tokens.
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # Bumped to end every session of the user at once (logout, password change,
    # disable, role change); a session carries the version it was issued under.
    session_version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # An admin's per-user overrides of the role's admission limits (shared/settings.py);
    # None: the role's defaults.
    limits: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # May submit script jobs (their own code, run by the workers): granted by an admin;
    # admins always may (docs/architecture.md, "Script jobs").
    can_run_code: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class ApiToken(Base):
    """A bearer token. Only the SHA-256 of the token is stored; the token is shown once."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(BigId, ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100), default="")
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # The first characters of the token, so a listing can tell tokens apart.
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime)

    __table_args__ = (Index("ix_api_tokens_user_id", "user_id"),)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # Who submitted it. NULL only for jobs from before accounts existed (admins see those).
    owner_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("users.id"))
    owner: Mapped[User | None] = relationship()
    # spec.tags as rows, so a tag filter is an index lookup (written by build_job).
    tag_rows: Mapped[list[JobTag]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True
    )
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str | None] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(16), default="queued")
    queue: Mapped[str] = mapped_column(String(32))
    priority: Mapped[int] = mapped_column(Integer, default=5)
    # The validated JobSpec as JSON: the one description of what to run.
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    # Denormalised from spec for filtering and listing without parsing JSON.
    model_name: Mapped[str | None] = mapped_column(String(64))
    dataset_name: Mapped[str | None] = mapped_column(String(64))
    source_job_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("jobs.id"))

    # Fencing token: incremented by every claim; a worker's writes name the attempt it holds.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    worker: Mapped[str | None] = mapped_column(String(200))
    # Where the current (or last) attempt runs: {"host", "slot", "gpus": [{"index",
    # "uuid", "name", "memory_total_bytes"}]}; written with the claim (shared/state_machine.py).
    placement: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Set by the scheduler (shared/scheduling.py): the id of the queued job this running
    # one must make room for; its lease heartbeat sees it and hands the job back.
    preempt_requested_by: Mapped[int | None] = mapped_column(BigInteger)
    # When the job was last handed back for a preemptor: not preempted again within
    # TRAINYARD_PREEMPT_GUARD_SECONDS of it.
    preempted_at: Mapped[datetime | None] = mapped_column(DateTime)
    # The client's Idempotency-Key header: a retried POST finds this job instead of
    # creating a second one. Unique per owner, so two concurrent POSTs cannot both
    # insert, and one user's key never finds (or blocks) another user's job.
    idempotency_key: Mapped[str | None] = mapped_column(String(200))

    # Live progress (epoch, step, samples/s, ETA) while running.
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error_type: Mapped[str | None] = mapped_column(String(200))
    error_message: Mapped[str | None] = mapped_column(Text)
    checkpoint_path: Mapped[str | None] = mapped_column(String(1000))
    # When the owner deleted the finished job's files (checkpoints, log, exports).
    artifacts_deleted_at: Mapped[datetime | None] = mapped_column(DateTime)

    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    __table_args__ = (
        Index("ix_jobs_state_id", "state", "id"),
        Index("ix_jobs_kind_id", "kind", "id"),
        # A member's job list (newest first), and the per-user queued-jobs limit.
        Index("ix_jobs_owner_id", "owner_id", "id"),
        Index("ix_jobs_owner_idempotency_key", "owner_id", "idempotency_key", unique=True),
        Index("ix_jobs_owner_state_id", "owner_id", "state", "id"),
        # The job list's model/dataset filters and name sort page through these in order.
        Index("ix_jobs_model_id", "model_name", "id"),
        Index("ix_jobs_dataset_id", "dataset_name", "id"),
        Index("ix_jobs_name_id", "name", "id"),
        # The leaderboard: a dataset's succeeded jobs, and which datasets have any.
        Index("ix_jobs_state_dataset_id", "state", "dataset_name", "id"),
    )


class JobTag(Base):
    """One of a job's tags (a copy of spec.tags), so the job list filters by tag with an
    index instead of parsing every job's spec."""

    __tablename__ = "job_tags"

    job_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    tag: Mapped[str] = mapped_column(String(64), primary_key=True)

    __table_args__ = (Index("ix_job_tags_tag_job_id", "tag", "job_id"),)


class JobMetric(Base):
    """One final metric of a succeeded job (a copy of result.metrics.<key>), written with
    the state change, so the leaderboard ranks a dataset's runs from an index instead of
    reading every run's result JSON."""

    __tablename__ = "job_final_metrics"

    job_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[float] = mapped_column(Float)
    # Copied from the job (neither changes once it has succeeded).
    dataset_name: Mapped[str | None] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))

    __table_args__ = (Index("ix_job_final_metrics_rank", "dataset_name", "key", "value", "job_id"),)


class JobEvent(Base):
    """One step of a job's history (claimed, resumed, requeued, finished...), for its
    timeline. Written in the same transaction as the state change it describes."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(BigId, ForeignKey("jobs.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    attempt: Mapped[int | None] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(String(200))
    message: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)


class MetricPoint(Base):
    __tablename__ = "metric_points"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(BigId, ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(String(64))
    step: Mapped[int] = mapped_column(BigInteger)
    epoch: Mapped[int | None] = mapped_column(Integer)
    value: Mapped[float] = mapped_column(Float)
    # Seconds since the epoch (float) on the worker, for wall-clock charts.
    wall_time: Mapped[float] = mapped_column(Float)

    __table_args__ = (Index("ix_metric_points_job_key_step", "job_id", "key", "step"),)


class Upload(Base):
    """A user's CSV file for the `csv` dataset; the file lives at artifacts/uploads/<id>.csv."""

    __tablename__ = "uploads"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    owner_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("users.id"))
    filename: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    rows: Mapped[int] = mapped_column(Integer)
    # [{"name", "numeric", "distinct"}] in file order; see shared/csv_profile.py.
    columns: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    # "csv": the uploaded file itself (uploads stored before revision 0008); newer
    # uploads are kept in a compact typed form (shared/job_files.py).
    storage_format: Mapped[str] = mapped_column(String(32), default="csv", server_default="csv")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class CodeBundle(Base):
    """A `.tar.gz` or `.zip` of a team's code for script jobs. The archive is stored once
    by its SHA-256 (shared/artifact_store.py: bundle_key); each owner who uploaded it
    has a row, so bundles are owned (and listed, and deleted) like uploads."""

    __tablename__ = "code_bundles"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    owner_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("users.id"))
    sha256: Mapped[str] = mapped_column(String(64))
    # "tar.gz" or "zip"
    archive_format: Mapped[str] = mapped_column(String(16))
    filename: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    unpacked_bytes: Mapped[int] = mapped_column(BigInteger)
    file_count: Mapped[int] = mapped_column(Integer)
    # The bundle's Python files and whether it has a requirements.txt, so a submission
    # can check its entry point without opening the archive (shared/code_bundle.py).
    python_files: Mapped[list[str]] = mapped_column(JSON)
    has_requirements: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    __table_args__ = (
        Index("ix_code_bundles_owner_sha256", "owner_id", "sha256", unique=True),
        Index("ix_code_bundles_sha256", "sha256"),
    )


class Sweep(Base):
    """A hyperparameter or architecture search: its spec (shared/sweep_spec.py) and
    state. Its trials are ordinary jobs (SweepTrial links them); the controller that
    creates and prunes them holds the sweep by a lease with a fencing counter, like a
    worker holds a job, so two controllers never act on one sweep at once."""

    __tablename__ = "sweeps"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    owner_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("users.id"))
    owner: Mapped[User | None] = relationship()
    name: Mapped[str | None] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    # running | cancelled | succeeded | failed
    state: Mapped[str] = mapped_column(String(16), default="running")
    error_message: Mapped[str | None] = mapped_column(Text)
    # The controller holding the sweep now, until when, and how many times it was taken
    # (every write of a controller names the count it took it with).
    controller: Mapped[str | None] = mapped_column(String(200))
    controller_lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    controller_epoch: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)

    __table_args__ = (
        Index("ix_sweeps_state_id", "state", "id"),
        Index("ix_sweeps_owner_id", "owner_id", "id"),
    )


class SweepTrial(Base):
    """One trial of a sweep: its number (unique in the sweep, so a trial is never
    created twice), its parameters and the job that runs it."""

    __tablename__ = "sweep_trials"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    sweep_id: Mapped[int] = mapped_column(BigId, ForeignKey("sweeps.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    job_id: Mapped[int] = mapped_column(BigId, ForeignKey("jobs.id"))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    # Set when early stopping stopped it: its job ends cancelled, the trial counts as
    # pruned (neither failed nor cancelled).
    pruned_at_epoch: Mapped[int | None] = mapped_column(Integer)
    prune_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    __table_args__ = (
        Index("ix_sweep_trials_sweep_number", "sweep_id", "number", unique=True),
        Index("ix_sweep_trials_job_id", "job_id", unique=True),
    )


class WorkerNode(Base):
    """An admin's say over one worker node (a `trainyard worker` process, by its Celery
    node name): cordoned (takes no new jobs) and draining (its running jobs finish, or
    with `drain_now` are handed back). In the database, not the Redis registry, so that
    it outlives the worker: a restarted node with the same name is still cordoned
    (shared/worker_nodes.py)."""

    __tablename__ = "worker_nodes"

    node: Mapped[str] = mapped_column(String(255), primary_key=True)
    cordoned: Mapped[bool] = mapped_column(Boolean, default=False)
    draining: Mapped[bool] = mapped_column(Boolean, default=False)
    # Drain --now: running jobs checkpoint and go back to the queue (their lease
    # heartbeat sees this, worker/lease.py).
    drain_now: Mapped[bool] = mapped_column(Boolean, default=False)
    changed_by: Mapped[str | None] = mapped_column(String(64))
    changed_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class WorkerSlotGuard(Base):
    """The crash guard of one worker slot (node, slot index): how many of its jobs died
    quickly in a row, and, once that reached TRAINYARD_CRASH_GUARD_RUNS, since when and
    why the slot takes no jobs (shared/worker_nodes.py)."""

    __tablename__ = "worker_slot_guards"

    node: Mapped[str] = mapped_column(String(255), primary_key=True)
    slot: Mapped[int] = mapped_column(Integer, primary_key=True)
    quick_deaths: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime)
    stopped_reason: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class RegisteredModel(Base):
    """A named model in the registry (shared/model_registry.py): its versions are
    succeeded jobs' model files, pinned by hash. Names are unique across all users, so
    the prediction server can resolve a name alone."""

    __tablename__ = "registered_models"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    owner_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("users.id"))
    owner: Mapped[User | None] = relationship()
    description: Mapped[str | None] = mapped_column(Text)
    # The last version number handed out, incremented in the promotion's transaction
    # (an UPDATE that also locks the row), so a number is never given twice, even if a
    # version row were ever deleted.
    last_version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    __table_args__ = (
        Index("ix_registered_models_name", "name", unique=True),
        Index("ix_registered_models_owner_id", "owner_id", "id"),
    )


class ModelVersion(Base):
    """One immutable version of a registered model: the job it came from, its model file
    and every file pinned with it ({name, sha256, size_bytes}), hashed at promotion; only
    `stage` ever changes, each change a ModelStageEvent."""

    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("registered_models.id", ondelete="CASCADE")
    )
    version: Mapped[int] = mapped_column(Integer)
    job_id: Mapped[int] = mapped_column(BigId, ForeignKey("jobs.id"))
    job_kind: Mapped[str] = mapped_column(String(16))
    model_file: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    files: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    # none | staging | production | archived; at most one production per model.
    stage: Mapped[str] = mapped_column(String(16), default="none")
    description: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[int | None] = mapped_column(BigId, ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    __table_args__ = (
        Index("ix_model_versions_model_version", "model_id", "version", unique=True),
        # Deleting a job's files asks whether a version pins them.
        Index("ix_model_versions_job_id", "job_id"),
        # One production version per model, held by the database itself: two
        # concurrent moves to production cannot both commit.
        Index(
            "ix_model_versions_one_production",
            "model_id",
            unique=True,
            postgresql_where=text("stage = 'production'"),
            sqlite_where=text("stage = 'production'"),
        ),
    )


class ModelStageEvent(Base):
    """A version's move from one stage to another: who, when, why. The first event of a
    version (from_stage NULL) is its registration."""

    __tablename__ = "model_stage_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    version_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("model_versions.id", ondelete="CASCADE")
    )
    from_stage: Mapped[str | None] = mapped_column(String(16))
    to_stage: Mapped[str] = mapped_column(String(16))
    user_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("users.id"))
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    note: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_model_stage_events_version_id", "version_id", "id"),)


class Webhook(Base):
    """A user's webhook (shared/webhooks.py): where their notifications are POSTed, the
    secret that signs them, which events it wants and in which payload format."""

    __tablename__ = "webhooks"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    owner_id: Mapped[int] = mapped_column(BigId, ForeignKey("users.id", ondelete="CASCADE"))
    owner: Mapped[User] = relationship()
    url: Mapped[str] = mapped_column(String(2000))
    # Kept as given (HMAC needs the secret itself, not a hash); returned once, at creation.
    secret: Mapped[str] = mapped_column(String(128))
    # A subset of shared/webhooks.py EVENTS.
    events: Mapped[list[str]] = mapped_column(JSON)
    # json | slack | teams: the body's shape (shared/webhooks.py render).
    format: Mapped[str] = mapped_column(String(16), default="json")
    # job.stalled: a running job whose progress has not moved for this long.
    stall_minutes: Mapped[int] = mapped_column(Integer, default=30)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    __table_args__ = (Index("ix_webhooks_owner_id", "owner_id", "id"),)


class NotificationEvent(Base):
    """The outbox: one row per thing that happened, written in the transaction that made
    it happen (a job's final state, a sweep's end), so an event exists exactly when its
    cause was committed. `event_id` ("job.failed:42:2") is unique: recording an event
    twice is a no-op. The dispatcher (shared/webhook_delivery.py) fans each row out into
    deliveries and then sets `fanned_out_at`."""

    __tablename__ = "notification_outbox"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(32))
    owner_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("users.id", ondelete="CASCADE"))
    # A ping (POST /api/v1/webhooks/<id>/test) goes to that one webhook only.
    webhook_id: Mapped[int | None] = mapped_column(
        BigId, ForeignKey("webhooks.id", ondelete="CASCADE")
    )
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    fanned_out_at: Mapped[datetime | None] = mapped_column(DateTime)

    __table_args__ = (
        Index("ix_notification_outbox_event_id", "event_id", unique=True),
        Index("ix_notification_outbox_fanned_out_id", "fanned_out_at", "id"),
    )


class WebhookDelivery(Base):
    """One event for one webhook: sent until a 2xx (then never again) or until
    TRAINYARD_WEBHOOK_MAX_ATTEMPTS. A dispatcher sends it only while it holds the lease
    (`lease_token`, `lease_expires_at`), so two dispatchers never send it at once."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    webhook_id: Mapped[int] = mapped_column(BigId, ForeignKey("webhooks.id", ondelete="CASCADE"))
    event_id: Mapped[str] = mapped_column(
        String(200), ForeignKey("notification_outbox.event_id", ondelete="CASCADE")
    )
    # pending | delivered | failed (gave up)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(300))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime)
    lease_token: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    __table_args__ = (
        Index("ix_webhook_deliveries_webhook_event", "webhook_id", "event_id", unique=True),
        # The dispatcher's "what is due" and the delivery log, newest first.
        Index("ix_webhook_deliveries_status_next", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_webhook_id", "webhook_id", "id"),
        Index("ix_webhook_deliveries_event_id", "event_id"),
    )
