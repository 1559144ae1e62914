"""Pydantic models of what the API sends and takes, for the OpenAPI document.

The views build plain dicts (server/serialize.py, the `*_to_json` helpers); these
models describe exactly those dicts. spectree validates each documented JSON response
against its model (server/openapi.py) and the schemathesis run checks every response
against the document, so a key added to a dict without its model here fails a test.

Response models forbid unknown keys and declare every key required (nullable where the
value may be null): the document says precisely what comes back.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

from server.params import JobStateName
from shared.spec import JobKindName, JobSpec


def _no_default(schema: dict[str, Any]) -> None:
    # For a key that is absent rather than null: the model needs a default to accept
    # its absence, but `"default": null` would claim a value the key never has.
    schema.pop("default", None)


# ---------------------------------------------------------------- requests


class JobSpecBody(RootModel[JobSpec]):  # type: ignore[valid-type]
    """A JobSpec, told apart by `kind`: `train`, `evaluate`, `script`, or a model made from a
    succeeded job: `prune`, `quantize`, `export`.

    The server validates it with the catalogs in hand (datasets present, uploads known,
    model fits the data), which a schema cannot say; each problem is named in a 422.
    """


class IdempotencyHeaders(BaseModel):
    idempotency_key: str = Field(
        default=None,  # type: ignore[assignment]
        json_schema_extra=_no_default,
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        pattern=r"^[\x20-\x7e]+$",
        description="makes a retried submission safe: a repeat with the same key and spec "
        "returns the first job (200) instead of creating another",
    )


class UploadForm(BaseModel):
    file: bytes = Field(description="the CSV file (UTF-8)")


class BundleForm(BaseModel):
    file: bytes = Field(description="the code bundle: a .tar.gz or .zip of a folder")


# ---------------------------------------------------------------- responses


class ResponseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(ResponseModel):
    code: str = Field(description="machine-readable, e.g. invalid_spec, not_found")
    message: str = Field(description="for people")
    fields: dict[str, str] = Field(
        description="what to fix: the offending field, parameter or header (dotted path "
        "for nested body fields) and what is wrong with it"
    )


class ErrorBody(ResponseModel):
    """The one error shape of every 4xx and 5xx."""

    error: ErrorDetail


class JobError(ResponseModel):
    type: str | None = Field(description="e.g. UserError, WorkerLost, OutOfMemoryError")
    message: str | None = Field(description="what went wrong, without server paths")
    detail: str | None = Field(
        default=None,
        description="admins only: the full message and a code error's traceback",
    )


class KeyMetric(ResponseModel):
    key: str = Field(description="e.g. val_accuracy, val_loss, accuracy, mse")
    value: float


class PlacementGpu(ResponseModel):
    index: int = Field(description="the GPU's index on its host, as nvidia-smi numbers it")
    uuid: str | None = Field(description="from NVML; null where the worker could not read it")
    name: str | None = Field(description="e.g. NVIDIA H200")
    memory_total_bytes: int | None


class Placement(ResponseModel):
    host: str
    slot: int | None = Field(description="the worker slot (pool child) that runs the attempt")
    gpus: list[PlacementGpu] = Field(
        description="the GPUs the slot owns, seen by the job as cuda:0, cuda:1, ...; "
        "empty on a CPU slot"
    )


class JobResponse(ResponseModel):
    id: int
    kind: JobKindName
    name: str | None
    state: JobStateName
    owner: str | None = Field(description="username of the submitter")
    queue: str = Field(description="cpu or gpu")
    priority: int
    model: str | None
    dataset: str | None
    tags: list[str]
    spec: dict[str, Any] = Field(description="the validated JobSpec, defaults filled in")
    source_job_id: int | None = Field(description="evaluate jobs: the train job scored")
    attempt: int = Field(description="claims so far (0 while first queued)")
    max_attempts: int
    worker: str | None
    placement: Placement | None = Field(
        description="where the latest attempt ran or runs: host, worker slot, GPUs; null "
        "until first claimed"
    )
    cancel_requested: bool
    progress: dict[str, Any] | None = Field(description="epoch, step, latest metrics")
    result: dict[str, Any] | None = Field(description="final metrics of a finished job")
    key_metric: KeyMetric | None = Field(
        description="the one number that sums the job up, as the jobs page and `trainyard "
        "jobs` show it: a train job's val_accuracy (classification) or val_loss "
        "(regression), an evaluation's accuracy or mse; null until the job has it"
    )
    error: JobError | None = Field(description="why a job failed")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    artifacts_deleted_at: datetime | None = Field(
        None, description="when the job's files (checkpoints, exports, log) were deleted"
    )
    queue_position: int | None = Field(
        None,
        description="GET /jobs/{id} of a queued job: its place in its queue's order "
        "(1: the next job a free slot takes; priority, aging and owners' turns as in "
        "GET /queues); absent otherwise",
    )


class JobPage(ResponseModel):
    jobs: list[JobResponse] = Field(description="newest first")
    next_before: int | None = Field(
        description="pass as `before` for the next page; null on the last page"
    )


class Series(ResponseModel):
    step: list[int]
    epoch: list[int | None]
    value: list[float | None] = Field(description="null where the point was NaN or infinite")


class Metrics(ResponseModel):
    job_id: int
    series: dict[str, Series] = Field(description="per metric key, columnar")


class Logs(ResponseModel):
    job_id: int
    lines: list[str]
    size_bytes: int = Field(description="the log's size: where the returned lines end")
    artifacts_deleted_at: datetime | None = Field(
        None, description="set when the job's files, the log among them, were deleted"
    )


class Artifact(ResponseModel):
    path: str = Field(description="relative to the job's folder; the download name")
    size_bytes: int
    modified_at: datetime


class Artifacts(ResponseModel):
    job_id: int
    artifacts: list[Artifact]
    artifacts_deleted_at: datetime | None = Field(
        None, description="set when the files were deleted (the list is empty then)"
    )


class ArtifactsDeleted(ResponseModel):
    job_id: int
    artifacts_deleted_at: datetime
    freed_bytes: int = Field(description="bytes the deleted files took")


class UploadDeleted(ResponseModel):
    id: int
    deleted: bool
    freed_bytes: int = Field(description="bytes the stored file took")


class Uploads(ResponseModel):
    uploads: list[UploadResponse]


class UploadColumns(ResponseModel):
    upload_id: int
    total: int = Field(description="how many columns match (more than returned past `limit`)")
    columns: list[UploadColumn] = Field(
        description="matches: the exact name first, then names starting with `q`, then the "
        "rest, each in file order"
    )


class ModelInfo(ResponseModel):
    name: str
    description: str
    inputs: list[str] = Field(description="data kinds the model takes: image, tabular, sequence")
    tasks: list[str]
    params_schema: dict[str, Any] = Field(description="JSON Schema of `model.params`")


class Models(ResponseModel):
    models: list[ModelInfo]
    train_spec_schema: dict[str, Any] = Field(description="JSON Schema of a train JobSpec")


class DatasetInfo(ResponseModel):
    name: str
    description: str
    kind: Literal["image", "tabular", "sequence"]
    tasks: list[str]
    params_schema: dict[str, Any] = Field(description="JSON Schema of `dataset.params`")
    source: str
    files: list[str]
    available: bool
    unavailable_reason: str | None
    usable: bool = Field(description="false: missing, corrupt or oversized files; see `problem`")
    problem: str | None = Field(description="why the dataset cannot be used, else null")
    # Present only for a dataset that resolves with its default params (absent for csv,
    # which needs an upload, and for one whose files are missing).
    input_shape: list[int] = Field(
        default=None,  # type: ignore[assignment]
        json_schema_extra=_no_default,
        description="per sample",
    )
    num_classes: int = Field(
        default=None,  # type: ignore[assignment]
        json_schema_extra=_no_default,
        description="0 for regression",
    )
    splits: dict[str, int | None] = Field(
        default=None,  # type: ignore[assignment]
        json_schema_extra=_no_default,
        description='sample counts: "train+val" and "test" (null when only a worker can tell)',
    )


class Datasets(ResponseModel):
    datasets: list[DatasetInfo]


class MemoryEstimate(ResponseModel):
    """Bytes, at float32 (shared/job_estimate.py says how each part is counted)."""

    weights: int
    gradients: int = Field(description="0 for an evaluate job")
    optimizer_state: int = Field(description="per the optimizer: adam 2 values a parameter, ...")
    activations: int = Field(description="one batch's layer outputs")
    data: int = Field(description="the dataset on the worker's device; 0 when unknown")
    total: int


class SubmissionLimits(ResponseModel):
    """The caller's limits: the role's settings, or an admin's override for them."""

    max_params: int
    max_memory_gib: float
    max_batch_size: int
    max_epochs: int
    default_runtime_s: int
    max_runtime_s: int


class JobEstimate(ResponseModel):
    params: int | None = Field(description="the model's parameters (null: dataset unknown)")
    batch: int | None = Field(description="samples in one batch (capped at the data's size)")
    memory_bytes: MemoryEstimate | None
    memory_gib: float | None
    max_runtime_s: int = Field(description="as submitting would store it (default filled in)")
    limits: SubmissionLimits
    exceeded: dict[str, str] = Field(
        description="each field over a limit, with the message a submission would get"
    )
    ok: bool = Field(description="within every limit: submitting would not be refused for them")


class UserLimits(ResponseModel):
    username: str
    role: Literal["admin", "member"]
    limits: dict[str, float] = Field(description="in force: the role's, with the overrides")
    role_defaults: dict[str, float] = Field(description="the role's settings")
    overrides: dict[str, float] = Field(description="this user's, set by an admin")


class LimitsChange(RootModel[dict[str, float | None]]):
    """Limits to change, by name (`max_params`, ...): a number, or null to go back to the
    role's default. Limits not named keep their value."""


class Me(ResponseModel):
    id: int
    username: str
    role: Literal["admin", "member"]
    may_run_code: bool = Field(description="may submit script jobs and upload code bundles")


class UserPermissions(ResponseModel):
    username: str
    role: Literal["admin", "member"]
    can_run_code: bool = Field(description="granted by an admin")
    may_run_code: bool = Field(description="can_run_code, or an admin (who always may)")


class PermissionsChange(BaseModel):
    """Permissions to change; those not named keep their value."""

    model_config = ConfigDict(extra="forbid")

    can_run_code: bool | None = Field(
        default=None, description="may submit script jobs (their own code, run by the workers)"
    )


class Token(ResponseModel):
    id: int
    user: str = Field(description="the owner's username")
    name: str
    prefix: str = Field(description="the token's first characters, to recognise it")
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class TokenCreated(Token):
    token: str = Field(description="the secret: shown this once, never again")


class Tokens(ResponseModel):
    tokens: list[Token]


class UploadColumn(ResponseModel):
    name: str
    numeric: bool
    distinct: int = Field(description="distinct non-empty values (capped)")


class UploadResponse(ResponseModel):
    id: int
    filename: str
    size_bytes: int
    rows: int
    columns: list[UploadColumn]
    created_at: datetime


class Bundle(ResponseModel):
    """A code bundle for script jobs (shared/code_bundle.py)."""

    id: int
    sha256: str = Field(description="of the archive's bytes: the same content is stored once")
    archive_format: Literal["tar.gz", "zip"]
    filename: str
    size_bytes: int = Field(description="the archive's size")
    unpacked_bytes: int = Field(description="what its files take unpacked")
    file_count: int = Field(description="files and links (folders not counted)")
    has_requirements: bool = Field(
        description="a requirements.txt at its top: the worker installs it into a "
        "virtual environment for the job"
    )
    created_at: datetime


class BundleDetail(Bundle):
    python_files: list[str] = Field(
        description="paths of its .py files, sorted: what a script job's `entry` may name"
    )


class Bundles(ResponseModel):
    bundles: list[Bundle]


class BundleDeleted(ResponseModel):
    id: int
    deleted: bool
    freed_bytes: int = Field(
        description="bytes of stored archive freed: 0 while another owner's bundle has the "
        "same content"
    )


class Health(ResponseModel):
    status: Literal["ok", "degraded"]
    database: str = Field(description='"ok" or the error')
    broker: str = Field(description='"ok", "not configured" or the error')


class OpenApiDocument(RootModel[dict[str, Any]]):
    """This document."""


# ---------------------------------------------------------------- sweeps


class SweepTrial(ResponseModel):
    number: int
    job_id: int
    state: Literal["queued", "running", "succeeded", "failed", "pruned", "cancelled"]
    params: dict[str, Any] = Field(description="dotted path -> value, the point it ran")
    value: float | None = Field(description="the sweep's metric in its result")
    pruned_at_epoch: int | None
    prune_reason: str | None
    num_parameters: int | float | None = Field(description="the model's size (train trials)")
    samples_per_s: float | None = Field(description="its training speed (train trials)")
    finished_at: str | None = Field(description="when its job ended")


class SweepSummary(ResponseModel):
    id: int
    name: str | None
    owner: str | None
    state: Literal["running", "cancelled", "succeeded", "failed"]
    error: str | None
    method: str
    metric: str
    direction: Literal["max", "min"]
    max_trials: int
    parallelism: int
    counts: dict[str, int] = Field(
        description="trials by state: queued, running, succeeded, pruned, failed, cancelled"
    )
    best: SweepTrial | None = Field(description="the succeeded trial with the best value")
    created_at: str
    finished_at: str | None


class SweepDetail(SweepSummary):
    spec: dict[str, Any] = Field(description="the sweep spec, defaults filled in")
    trials: list[SweepTrial] = Field(description="by number")


class Sweeps(ResponseModel):
    sweeps: list[SweepSummary]


class SweepSpecBody(RootModel[dict[str, Any]]):
    """A sweep: `base` (a train or script JobSpec), `space` (dotted path -> distribution:
    `loguniform(1e-4, 1e-1)`, `int(1, 4)`, `choice([relu, gelu])`, or JSON objects),
    `method` (grid, random, tpe), `metric`, `direction`, `max_trials`, `parallelism`,
    `time_budget_s`, `early_stopping` (median or asha), `seed`."""


# ---------------------------------------------------------------- model registry

RegistryStage = Literal["none", "staging", "production", "archived"]


class PromoteRequest(BaseModel):
    """Register a succeeded job's model as the next version of the model in the path
    (created, yours, if it does not exist)."""

    # Strict: "7" is not a job id (the fuzzer's negative cases must be refused).
    model_config = ConfigDict(extra="forbid", strict=True)

    job_id: int = Field(
        ge=1,
        le=2**63 - 1,
        description="a succeeded train, prune, quantize or export job of yours (admins: anyone's)",
    )
    description: str | None = Field(
        default=None, max_length=2000, description="what this version is, for people"
    )
    stage: Literal["none", "staging", "production"] = Field(
        default="none",
        description="its first stage; production archives the model's production version",
    )
    model_description: str | None = Field(
        default=None, max_length=2000, description="sets the model's own description"
    )


class StageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    stage: RegistryStage = Field(
        description="production archives the model's production version (recorded too)"
    )
    note: str | None = Field(default=None, max_length=2000, description="why, for the history")


class RegistryFile(ResponseModel):
    name: str = Field(description="relative to the job's checkpoint directory")
    sha256: str = Field(description="of the file's bytes at registration")
    size_bytes: int


class RegistryStageEvent(ResponseModel):
    version: int
    from_stage: RegistryStage | None = Field(description="null: the version's registration")
    to_stage: RegistryStage
    user: str | None = Field(description="who moved it")
    at: str
    note: str | None


class RegistryVersion(ResponseModel):
    model: str = Field(description="the model's name")
    version: int = Field(description="1, 2, ... per model; never reused")
    stage: RegistryStage
    job_id: int
    job_kind: Literal["train", "prune", "quantize", "export"]
    job_name: str | None
    model_file: str = Field(description="the file the prediction server loads")
    sha256: str = Field(description="of the model file")
    size_bytes: int = Field(description="of the model file")
    files: list[RegistryFile] = Field(
        description="every file the version pins, the model file first"
    )
    description: str | None
    created_by: str | None
    created_at: str


class RegistryVersionDetail(RegistryVersion):
    history: list[RegistryStageEvent] = Field(description="its stage moves, newest first")


class RegistryModel(ResponseModel):
    name: str
    owner: str | None
    description: str | None
    created_at: str
    latest_version: int | None
    version_count: int
    production: int | None = Field(description="the version in production")
    staging: list[int] = Field(description="versions in staging, newest first")


class RegistryModelDetail(RegistryModel):
    versions: list[RegistryVersion] = Field(description="newest first")
    history: list[RegistryStageEvent] = Field(
        description="every stage move of its versions, newest first"
    )


class RegistryModels(ResponseModel):
    models: list[RegistryModel]
