"""The model registry: a succeeded job's model promoted to a named, immutable version,
moved through stages with its history kept.

A version pins the job's model file (`MODEL_FILE`, by job kind) and, for an export job,
every file of its checkpoint directory: each is streamed through the artifact store at
promotion and its SHA-256 and size stored (`model_versions.files`), so what a version
names can be checked byte for byte later (`verify_files`), and deleting the job's files
is refused while any version pins them (server/deletion.py asks `pinning_versions`).

Stages: none, staging, production, archived. A model has at most one production version
(a partial unique index holds it); moving a version to production archives the one that
was, and both moves are recorded (`model_stage_events`, who and when and why).

Version numbers come from `registered_models.last_version`, incremented by an UPDATE in
the promotion's transaction: the UPDATE locks the model's row (PostgreSQL) or the
database (SQLite), and `(model_id, version)` is unique, so two concurrent promotions
never share a number and a number is never handed out twice. A transaction that loses
a race (a unique index: the same new name created twice) is retried from the start.

Who may do what is decided here too (`Actor`): the owner or an admin writes; someone
else's model reads as missing. Nothing here imports Flask: the API, the pages and the
prediction server (`resolve`) share it.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypeVar

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from shared.artifact_store import ArtifactStore, attempt_prefix
from shared.db import utcnow
from shared.job_states import JobState
from shared.orm import Job, ModelStageEvent, ModelVersion, RegisteredModel

# THE rule for which file of a job is its model (the prediction server loads this one).
MODEL_FILE: dict[str, str] = {
    "train": "best.pt",
    "prune": "best.pt",
    "quantize": "model.pt",
    "export": "state_dict.pt",
}
PROMOTABLE_KINDS: tuple[str, ...] = tuple(MODEL_FILE)
# Kinds whose whole checkpoint directory is the model: an export job writes only its
# exported files there (model_card.json, state_dict.pt, model.pt2, model.onnx), and a
# format added later is pinned without a change here.
PIN_WHOLE_DIRECTORY = frozenset({"export"})

STAGES: tuple[str, ...] = ("none", "staging", "production", "archived")
# A new version starts in one of these (archiving is for versions that served).
INITIAL_STAGES: tuple[str, ...] = ("none", "staging", "production")

# The "-" escaped: the same text is the register form's HTML pattern, which browsers
# compile with the `v` flag, where a bare "-" at the end of a class is an error.
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._\-]{0,63}")
NAME_RULE = (
    "1 to 64 characters: lowercase letters, digits, '.', '_' and '-', starting with a "
    "letter or a digit"
)
_ATTEMPT_DIR = re.compile(r"attempt-(\d+)")

# Version numbers are INTEGER: a larger number in a URL is no version (and would
# overflow PostgreSQL's parameter).
MAX_VERSION = 2**31 - 1
# A lost race is retried this many times (each retry a fresh transaction).
RETRIES = 20
T = TypeVar("T")


class RegistryError(Exception):
    """A request the registry refuses: `kind` is how the API answers (not_found: 404,
    invalid: 422, conflict: 409), `field` what to fix."""

    def __init__(
        self, kind: Literal["not_found", "invalid", "conflict"], code: str, field: str, message: str
    ):
        super().__init__(message)
        self.kind, self.code, self.field, self.message = kind, code, field, message


@dataclass(frozen=True)
class Actor:
    """Who asks: a user id (None for a system caller such as the prediction server)
    and whether they are an admin."""

    user_id: int | None
    is_admin: bool

    def may_use(self, owner_id: int | None) -> bool:
        """Owner or admin: both reading and writing (another's model reads as missing)."""
        return self.is_admin or (owner_id is not None and owner_id == self.user_id)


@dataclass(frozen=True)
class FileDigest:
    name: str  # relative to the job's checkpoint directory
    sha256: str
    size_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "size_bytes": self.size_bytes}


# ---------------------------------------------------------------- names and jobs


def valid_name(name: str) -> bool:
    return NAME_PATTERN.fullmatch(name) is not None


def model_file(kind: str) -> str | None:
    """The model file of a job of this kind, None for a kind that makes no model."""
    return MODEL_FILE.get(kind)


def checkpoint_prefix(job: Job) -> str | None:
    """The store key prefix of the job's checkpoint directory (jobs/<id>/attempt-<n>),
    from `checkpoint_path` (a local directory or an s3:// URL ending in attempt-<n>)."""
    if not job.checkpoint_path:
        return None
    attempts = [m for part in job.checkpoint_path.split("/") if (m := _ATTEMPT_DIR.fullmatch(part))]
    return attempt_prefix(job.id, int(attempts[-1].group(1))) if attempts else None


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def job_problem(job: Job | None, job_id: int, actor: Actor) -> str | None:
    """Why the job's model cannot be registered (for a 422 naming job_id), or None."""
    if job is None or not actor.may_use(job.owner_id):
        # Someone else's job reads as missing, as everywhere else.
        return f"job {job_id} does not exist"
    if job.kind not in MODEL_FILE:
        kinds = ", ".join(PROMOTABLE_KINDS[:-1]) + f" and {PROMOTABLE_KINDS[-1]}"
        return (
            f"job {job.id} is {_article(job.kind)} {job.kind} job; only {kinds} jobs make a model"
        )
    if job.state != JobState.SUCCEEDED.value:
        return f"job {job.id} is {job.state}; only a succeeded job's model can be registered"
    if job.artifacts_deleted_at is not None:
        return f"job {job.id}'s files, its model among them, were deleted"
    if checkpoint_prefix(job) is None:
        return f"job {job.id} has no checkpoint directory"
    return None


def digest(store: ArtifactStore, key: str, name: str) -> FileDigest | None:
    """SHA-256 and size of a stored file, streamed (never whole in memory); None if missing."""
    download = store.open(key)
    if download is None:
        return None
    sha, size = hashlib.sha256(), 0
    for chunk in download.chunks:
        sha.update(chunk)
        size += len(chunk)
    return FileDigest(name, sha.hexdigest(), size)


def files_to_pin(store: ArtifactStore, job: Job) -> list[FileDigest]:
    """The job's model file first, then (export) every other file of its directory,
    each hashed through the store. RegistryError (job_id) if the model file is missing."""
    prefix = checkpoint_prefix(job)
    main = MODEL_FILE[job.kind]
    names = [main]
    if job.kind in PIN_WHOLE_DIRECTORY and prefix is not None:
        names += sorted(item["path"] for item in store.list(prefix) if item["path"] != main)
    found = []
    for name in names:
        got = digest(store, f"{prefix}/{name}", name) if prefix is not None else None
        if got is None and name == main:
            raise RegistryError(
                "invalid", "invalid_job", "job_id",
                f"job {job.id} has no {main} in its checkpoint directory, so no model to register",
            )  # fmt: skip
        if got is not None:  # listed a moment ago and gone now: not the export's any more
            found.append(got)
    return found


# ---------------------------------------------------------------- reading


def find_model(session: Session, name: str) -> RegisteredModel | None:
    if not valid_name(name):  # never looked up (a NUL byte would fail in PostgreSQL)
        return None
    return session.scalars(select(RegisteredModel).where(RegisteredModel.name == name)).first()


def visible_model(session: Session, name: str, actor: Actor) -> RegisteredModel | None:
    """The model if the actor may see it (owner or admin); None reads the same whether
    it is missing or someone else's."""
    model = find_model(session, name)
    return model if model is not None and actor.may_use(model.owner_id) else None


def find_version(session: Session, model: RegisteredModel, number: int) -> ModelVersion | None:
    if not 1 <= number <= MAX_VERSION:
        return None
    return session.scalars(
        select(ModelVersion).where(ModelVersion.model_id == model.id,
                                   ModelVersion.version == number)
    ).first()  # fmt: skip


def versions_of(session: Session, model_ids: Iterable[int]) -> list[ModelVersion]:
    """Every version of these models, newest first within each."""
    ids = list(model_ids)
    if not ids:
        return []
    return list(
        session.scalars(
            select(ModelVersion).where(ModelVersion.model_id.in_(ids))
            .order_by(ModelVersion.model_id, ModelVersion.version.desc())
        )
    )  # fmt: skip


def stage_history(session: Session, version_ids: Iterable[int]) -> list[ModelStageEvent]:
    """The stage moves of these versions, newest first."""
    ids = list(version_ids)
    if not ids:
        return []
    return list(
        session.scalars(
            select(ModelStageEvent).where(ModelStageEvent.version_id.in_(ids))
            .order_by(ModelStageEvent.id.desc())
        )
    )  # fmt: skip


def resolve(
    session: Session, name: str, stage: str | None = None, version: int | None = None
) -> ModelVersion | None:
    """The version a name points at: `version` exactly, or the model's version in `stage`
    (production: the one; another stage: its newest). None when there is none.

    No permission check: for trusted callers (the prediction server); check
    `visible_model` first on behalf of a user.
    """
    if (stage is None) == (version is None):
        raise ValueError("give a stage or a version, not both")
    model = find_model(session, name)
    if model is None:
        return None
    if version is not None:
        return find_version(session, model, version)
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    return session.scalars(
        select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.stage == stage)
        .order_by(ModelVersion.version.desc()).limit(1)
    ).first()  # fmt: skip


def file_key(session: Session, version: ModelVersion, name: str | None = None) -> str:
    """The store key of a pinned file of the version (its model file by default)."""
    job = session.get(Job, version.job_id)
    prefix = checkpoint_prefix(job) if job is not None else None
    if prefix is None:
        raise LookupError(f"job {version.job_id}'s checkpoint directory is unknown")
    return f"{prefix}/{name or version.model_file}"


def verify_files(session: Session, store: ArtifactStore, version: ModelVersion) -> dict[str, str]:
    """Each pinned file whose bytes are no longer what was registered: name -> problem.
    Empty when every file is intact (the prediction server checks before loading)."""
    problems = {}
    for pinned in version.files:
        got = digest(store, file_key(session, version, pinned["name"]), pinned["name"])
        if got is None:
            problems[pinned["name"]] = "missing"
        elif (got.sha256, got.size_bytes) != (pinned["sha256"], pinned["size_bytes"]):
            problems[pinned["name"]] = f"sha256 {got.sha256}, registered {pinned['sha256']}"
    return problems


def pinning_versions(session: Session, job_id: int, lock: bool = False) -> list[tuple[str, int]]:
    """(model name, version) of every version that pins the job's files.

    With `lock` (deleting the files), the check holds until the caller's transaction
    ends: no promotion of the job can commit in between (see `_lock_job`).
    """
    if lock:
        _lock_job(session, job_id)
    rows = session.execute(
        select(RegisteredModel.name, ModelVersion.version)
        .join(RegisteredModel, RegisteredModel.id == ModelVersion.model_id)
        .where(ModelVersion.job_id == job_id)
        .order_by(RegisteredModel.name, ModelVersion.version)
    )  # fmt: skip
    return [(name, number) for name, number in rows]


# ---------------------------------------------------------------- writing
#
# Locks. PostgreSQL: a promotion locks the model's row (the UPDATE that hands out its
# number) and then the job's row (FOR UPDATE); a stage change locks the model's row; a
# deletion of the job's files locks the job's row before it asks whether a version pins
# them. Every path takes the job's row last, so none waits for another in a circle.
# SQLite: pysqlite begins a transaction only at the first write statement, and a write
# takes the database's one write lock; each path therefore writes first (the same
# UPDATEs), and every read after it is current until the commit.


def _lock_model(session: Session, model_id: int, allocate: bool = False) -> int:
    """Lock the model's row (see above); with `allocate`, hand out its next version
    number in the same UPDATE. Returns last_version as it now is."""
    step = 1 if allocate else 0
    return int(
        session.execute(
            update(RegisteredModel).where(RegisteredModel.id == model_id)
            .values(last_version=RegisteredModel.last_version + step)
            .returning(RegisteredModel.last_version)
            .execution_options(synchronize_session=False)
        ).scalar_one()
    )  # fmt: skip


def _lock_job(session: Session, job_id: int) -> None:
    """Lock the job's row against a concurrent promotion or deletion (see above)."""
    if session.get_bind().dialect.name == "sqlite":
        # A write that changes nothing (only shared/state_machine.py writes jobs): it
        # is the statement that takes SQLite's write lock.
        session.execute(
            update(ModelVersion).where(ModelVersion.job_id == job_id)
            .values(job_id=ModelVersion.job_id)
            .execution_options(synchronize_session=False)
        )  # fmt: skip
    else:
        session.execute(select(Job.id).where(Job.id == job_id).with_for_update())


def _lost_race(exc: Exception, session: Session) -> bool:
    """A transaction another one beat: a unique index (a name created twice, two
    production versions), or SQLite's lock wait running out."""
    if isinstance(exc, IntegrityError):
        return True
    dialect = session.get_bind().dialect.name
    return isinstance(exc, OperationalError) and dialect == "sqlite" and "locked" in str(exc)


def _retried(session: Session, work: Callable[[], T]) -> T:
    """Run `work` in a fresh transaction and commit; start again after a lost race."""
    session.commit()  # the caller's reads end here: the writes get a transaction of their own
    for attempt in range(RETRIES):
        try:
            result = work()
            session.commit()
            return result
        except Exception as exc:
            session.rollback()  # a refusal (RegistryError) leaves nothing half-written either
            if not _lost_race(exc, session) or attempt == RETRIES - 1:
                raise
            time.sleep(random.uniform(0, 0.01 * (attempt + 1)))
    raise AssertionError("unreachable")


def _event(
    session: Session, version: ModelVersion, to_stage: str, actor: Actor,
    from_stage: str | None, note: str | None, at: datetime,
) -> None:  # fmt: skip
    session.add(ModelStageEvent(version_id=version.id, from_stage=from_stage, to_stage=to_stage,
                                user_id=actor.user_id, note=note, at=at))  # fmt: skip


def _archive_production(
    session: Session, model_id: int, actor: Actor, by_version: int, at: datetime
) -> None:
    """The model's production version (if any) to archived, recorded, and flushed before
    the new production row is written (the partial unique index would refuse it)."""
    current = session.scalars(
        select(ModelVersion).where(ModelVersion.model_id == model_id,
                                   ModelVersion.stage == "production")
    ).first()  # fmt: skip
    if current is None or current.version == by_version:
        return
    current.stage = "archived"
    _event(session, current, "archived", actor, "production",
           f"replaced in production by version {by_version}", at)  # fmt: skip
    session.flush()


def _check_name_free(model: RegisteredModel | None, actor: Actor) -> None:
    """Names are global: one taken by another user's model cannot be used. Its existence
    is the one thing this says about it (unavoidable with global names)."""
    if model is not None and not actor.may_use(model.owner_id):
        raise RegistryError("conflict", "name_taken", "name",
                            f"the name {model.name!r} belongs to another user's model; "
                            "choose another")  # fmt: skip


def promote(
    session: Session,
    store: ArtifactStore,
    actor: Actor,
    name: str,
    job_id: int,
    *,
    description: str | None = None,
    stage: str = "none",
    model_description: str | None = None,
) -> ModelVersion:
    """Register job `job_id`'s model as the next version of model `name` (created, owned
    by the actor, if it does not exist), in `stage`. Commits.

    RegistryError: invalid name or stage (422 naming name/stage); the job missing,
    someone else's, not succeeded, of a kind that makes no model, its files deleted or
    its model file absent (422 naming job_id); the name taken by another user's model,
    or the job already a version of this model (409).
    """
    if not valid_name(name):
        raise RegistryError("invalid", "invalid_name", "name", f"not a model name: {NAME_RULE}")
    if stage not in INITIAL_STAGES:
        raise RegistryError("invalid", "invalid_stage", "stage",
                            f"a new version's stage is one of {', '.join(INITIAL_STAGES)}")  # fmt: skip
    _check_name_free(find_model(session, name), actor)
    job = session.get(Job, job_id)
    problem = job_problem(job, job_id, actor)
    if problem is not None:
        raise RegistryError("invalid", "invalid_job", "job_id", problem)
    assert job is not None
    kind = job.kind
    # Hashing streams every pinned file: done before the transaction, which stays short.
    files = files_to_pin(store, job)

    def write() -> ModelVersion:
        model = find_model(session, name)
        if model is None:
            model = RegisteredModel(name=name, owner_id=actor.user_id,
                                    description=model_description)  # fmt: skip
            session.add(model)
            session.flush()  # the same name created meanwhile: IntegrityError, retried
        number = _lock_model(session, model.id, allocate=True)
        session.refresh(model)  # as of the lock
        _check_name_free(model, actor)
        if model_description is not None:
            model.description = model_description
        _lock_job(session, job_id)
        if session.scalar(select(Job.artifacts_deleted_at).where(Job.id == job_id)) is not None:
            raise RegistryError("invalid", "invalid_job", "job_id",
                                f"job {job_id}'s files, its model among them, were deleted")  # fmt: skip
        already = session.scalar(
            select(ModelVersion.version).where(ModelVersion.model_id == model.id,
                                               ModelVersion.job_id == job_id)
        )  # fmt: skip
        if already is not None:
            raise RegistryError("conflict", "already_registered", "job_id",
                                f"job {job_id} is already version {already} of {name}")  # fmt: skip
        now = utcnow()  # one moment for the version, its registration and what it archived
        if stage == "production":
            _archive_production(session, model.id, actor, number, now)
        version = ModelVersion(
            model_id=model.id, version=number, job_id=job_id, job_kind=kind,
            model_file=files[0].name, sha256=files[0].sha256, size_bytes=files[0].size_bytes,
            files=[f.to_json() for f in files], stage=stage, description=description,
            created_by=actor.user_id, created_at=now,
        )  # fmt: skip
        session.add(version)
        session.flush()
        _event(session, version, stage, actor, None, description, now)
        return version

    return _retried(session, write)


def move_stage(
    session: Session, version_id: int, to_stage: str, actor: Actor, note: str | None = None
) -> ModelVersion:
    """Move a version to `to_stage`, recorded; to production archives the model's
    production version (recorded too). Moving to the stage it is in changes nothing and
    records nothing. Commits. Someone else's version reads as missing (not_found)."""
    if to_stage not in STAGES:
        raise RegistryError("invalid", "invalid_stage", "stage",
                            f"one of {', '.join(STAGES)}")  # fmt: skip

    def write() -> ModelVersion:
        version = session.get(ModelVersion, version_id)
        if version is None:
            raise RegistryError("not_found", "not_found", "version", "no such version")
        _lock_model(session, version.model_id)
        session.refresh(version)  # its stage as of the lock
        model = session.get(RegisteredModel, version.model_id)
        if model is None or not actor.may_use(model.owner_id):
            raise RegistryError("not_found", "not_found", "version", "no such version")
        if version.stage == to_stage:
            return version
        now = utcnow()
        if to_stage == "production":
            _archive_production(session, model.id, actor, version.version, now)
        _event(session, version, to_stage, actor, version.stage, note, now)
        version.stage = to_stage
        session.flush()
        return version

    return _retried(session, write)
