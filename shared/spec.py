"""The JobSpec: one pydantic schema for the API, the form, the CLI and the worker.

`parse_spec` is the single entry point. It returns a TrainSpec, EvaluateSpec or
ScriptSpec (a team's own code: docs/architecture.md, "Script jobs"), or
raises SpecError whose `fields` maps dotted field names ("model.params.hidden") to a
message a person can act on. Given a CatalogContext it also resolves the dataset
(files present, upload known) and checks the model, loss and recipe against it, so a
job that cannot work is refused at submission, not in the worker.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from shared.dataset_cache import DATASET_DIRS
from shared.dataset_catalog import DATASETS, CatalogContext, DatasetInfo, resolve_dataset
from shared.invisible_chars import first_invisible, strip_invisible
from shared.metric_catalog import direction
from shared.model_catalog import (
    MODELS,
    CNNParams,
    MLPParams,
    ResNetParams,
    RNNParams,
    TransformerParams,
)
from shared.schema_base import CatalogError, StrictModel

GPU_QUEUE = "gpu"
CPU_QUEUE = "cpu"


class SpecError(ValueError):
    def __init__(self, fields: dict[str, str]):
        self.fields = fields
        super().__init__("; ".join(f"{k}: {v}" for k, v in fields.items()))


# ---------------------------------------------------------------- dataset


class AugmentSpec(StrictModel):
    """Random image augmentation of training batches (never of val/test)."""

    hflip: bool = Field(False, description="flip half the images left-right")
    crop_padding: int = Field(
        0, ge=0, le=16, description="pad by this many pixels, then crop back at a random offset"
    )
    rotation_degrees: float = Field(
        0.0, ge=0.0, le=45.0, description="rotate by a uniform angle in +-this"
    )

    @property
    def enabled(self) -> bool:
        return self.hflip or self.crop_padding > 0 or self.rotation_degrees > 0


class _DatasetCommon(StrictModel):
    val_fraction: float = Field(
        0.2,
        gt=0.0,
        lt=0.9,
        description="share of the non-test data held out for validation (fixed split)",
    )
    normalize: Literal["auto", "none", "scale", "standardize"] = Field(
        "auto",
        description="scale: to [0, 1]; standardize: per-channel mean/std of the training split; "
        "auto: scale for images, standardize for tables, none for tokens",
    )
    augment: AugmentSpec = AugmentSpec()

    def resolved_normalize(self, kind: str) -> str:
        if self.normalize != "auto":
            return self.normalize
        return {"image": "scale", "tabular": "standardize"}.get(kind, "none")


def _dataset_model(name: str) -> type[_DatasetCommon]:
    entry = DATASETS[name]
    params_cls = entry.params
    try:
        default: Any = params_cls()
    except ValidationError:
        default = ...  # required (csv)
    class_name = "".join(part.title() for part in name.split("_")) + "DatasetSpec"
    return create_model(  # type: ignore[call-overload, no-any-return]
        class_name,
        __base__=_DatasetCommon,
        name=(Literal[name], Field(description=entry.description)),
        params=(params_cls, default),
    )


_DATASET_SPECS = tuple(_dataset_model(n) for n in DATASETS)
DatasetSpec = Annotated[Union[_DATASET_SPECS], Field(discriminator="name")]  # noqa: UP007


class EvalDatasetSpec(StrictModel):
    name: str | None = Field(
        None, description="defaults to the source job's dataset (and its params)"
    )
    params: dict[str, Any] | None = Field(
        None, description="the dataset's params when `name` is given"
    )
    split: Literal["train", "val", "test"] = "test"

    @field_validator("name")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        if v is not None and v not in DATASETS:
            raise ValueError(f"unknown dataset {v!r}; choose one of: {', '.join(DATASETS)}")
        return v


# ---------------------------------------------------------------- model


class MLPSpec(StrictModel):
    name: Literal["mlp"]
    params: MLPParams = MLPParams()


class CNNSpec(StrictModel):
    name: Literal["cnn"]
    params: CNNParams = CNNParams()


class ResNetSpec(StrictModel):
    name: Literal["resnet"]
    params: ResNetParams = ResNetParams()


class LSTMSpec(StrictModel):
    name: Literal["lstm"]
    params: RNNParams = RNNParams()


class GRUSpec(StrictModel):
    name: Literal["gru"]
    params: RNNParams = RNNParams()


class TransformerSpec(StrictModel):
    name: Literal["transformer"]
    params: TransformerParams = TransformerParams()


ModelSpec = Annotated[
    MLPSpec | CNNSpec | ResNetSpec | LSTMSpec | GRUSpec | TransformerSpec,
    Field(discriminator="name"),
]


# ---------------------------------------------------------------- recipe


class LossSpec(StrictModel):
    name: Literal["cross_entropy", "mse", "l1"]
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="cross_entropy only")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data


class _OptimizerCommon(StrictModel):
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="L2 regularization")


class AdamSpec(_OptimizerCommon):
    name: Literal["adam"]
    betas: tuple[float, float] = (0.9, 0.999)

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("both betas must be in [0, 1)")
        return v


class AdamWSpec(AdamSpec):
    name: Literal["adamw"]  # type: ignore[assignment]
    weight_decay: float = Field(0.01, ge=0.0, le=1.0, description="decoupled weight decay")


class SGDSpec(_OptimizerCommon):
    name: Literal["sgd"]
    lr: float = Field(1e-2, gt=0.0, le=10.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    nesterov: bool = False

    @field_validator("nesterov")
    @classmethod
    def _nesterov_needs_momentum(cls, v: bool, info: ValidationInfo) -> bool:
        if v and info.data.get("momentum", 0.0) == 0.0:
            raise ValueError("nesterov needs momentum > 0")
        return v


class AdagradSpec(_OptimizerCommon):
    name: Literal["adagrad"]
    lr: float = Field(1e-2, gt=0.0, le=10.0)
    lr_decay: float = Field(0.0, ge=0.0, le=1.0)


class RMSpropSpec(_OptimizerCommon):
    name: Literal["rmsprop"]
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    alpha: float = Field(0.99, gt=0.0, lt=1.0, description="smoothing constant")
    momentum: float = Field(0.0, ge=0.0, lt=1.0)


OptimizerSpec = Annotated[
    AdamSpec | AdamWSpec | SGDSpec | AdagradSpec | RMSpropSpec, Field(discriminator="name")
]


class _ScheduleCommon(StrictModel):
    warmup_epochs: float = Field(
        0.0, ge=0.0, le=10_000, description="linear warmup from 0 (fractions allowed)"
    )


class ConstantSchedule(_ScheduleCommon):
    name: Literal["constant"]


class StepSchedule(_ScheduleCommon):
    name: Literal["step"]
    step_epochs: int = Field(
        10, ge=1, le=10_000, description="multiply the lr by gamma every this many epochs"
    )
    gamma: float = Field(0.1, gt=0.0, le=1.0)


class CosineSchedule(_ScheduleCommon):
    name: Literal["cosine"]
    min_lr_ratio: float = Field(
        0.0, ge=0.0, lt=1.0, description="final lr as a fraction of the peak"
    )


class OneCycleSchedule(StrictModel):
    name: Literal["onecycle"]
    max_lr: float | None = Field(
        None, gt=0.0, le=10.0, description="peak lr; default: the optimizer's lr"
    )
    pct_start: float = Field(0.3, gt=0.0, lt=1.0, description="share of training spent warming up")


ScheduleSpec = Annotated[
    ConstantSchedule | StepSchedule | CosineSchedule | OneCycleSchedule, Field(discriminator="name")
]

# What early stopping may watch: the validation series a task's jobs log.
CLASSIFICATION_METRICS = ("val_loss", "val_accuracy", "val_f1")
REGRESSION_METRICS = ("val_loss", "val_mse", "val_mae", "val_r2")


class EarlyStoppingSpec(StrictModel):
    metric: Literal["val_loss", "val_accuracy", "val_f1", "val_mse", "val_mae", "val_r2"] = (
        "val_loss"
    )
    patience: int = Field(
        5, ge=1, le=10_000, description="epochs without improvement before stopping"
    )
    min_delta: float = Field(0.0, ge=0.0, description="smaller changes do not count as improvement")

    @property
    def mode(self) -> str:
        return direction(self.metric) or "min"


class RegularizationSpec(StrictModel):
    l1: float = Field(
        0.0, ge=0.0, le=1.0, description="L1 penalty on the weights, added to the loss"
    )


# The most processes a CPU data-parallel job may ask for. Every process holds the whole
# dataset and a copy of the model, and gloo's all-reduce between processes of one host
# stops paying off well before a host's cores run out (docs/architecture.md,
# "Data-parallel jobs").
MAX_PROCESSES = 8


class Resources(StrictModel):
    gpus: int = Field(
        0,
        ge=0,
        le=16,
        description="GPUs of one host the job needs; >= 1 routes it to the gpu queue, "
        "> 1 trains data-parallel with one process per GPU (NCCL)",
    )
    processes: int = Field(
        1,
        ge=1,
        le=MAX_PROCESSES,
        description="CPU data-parallel: train with this many processes of one host (gloo); "
        "GPU jobs leave it at 1 (resources.gpus sets their processes)",
    )

    gpu_memory_gb: float | None = Field(
        None,
        gt=0,
        le=4096,
        description="each of the job's GPUs must have at least this much memory, in GB "
        "(10^9 bytes, as GPUs are sold: an 80 GB card qualifies for 80); only slots whose "
        "GPUs do take the job",
    )

    memory_gb: float | None = Field(
        None,
        gt=0,
        le=65_536,
        description="the most host memory the job may allocate, in GB (10^9 bytes); "
        "default and upper bound: the worker slot's share (TRAINYARD_SLOT_MEMORY_BYTES)",
    )

    @model_validator(mode="after")
    def _one_parallel_mode(self) -> Resources:
        if self.gpu_memory_gb is not None and self.gpus < 1:
            raise CatalogError(
                "resources.gpu_memory_gb", "is for GPU jobs; set resources.gpus as well"
            )
        if self.gpus >= 1 and self.processes > 1:
            raise CatalogError(
                "resources.processes",
                "is for CPU jobs; a GPU job runs one process per GPU, so leave processes "
                "at 1 and set resources.gpus",
            )
        return self

    @property
    def world_size(self) -> int:
        """How many training processes the job runs: one per GPU, or `processes` on CPU."""
        return self.gpus if self.gpus >= 1 else self.processes


# load_stored_spec validates with this context: a spec stored before names were checked
# for invisible characters loads with them removed instead of failing.
_STORED = "stored"


def _visible(value: str | None, info: ValidationInfo) -> str | None:
    """Refuse invisible formatting characters (shared/invisible_chars.py) in a name or
    tag: they make what is shown differ from what is stored."""
    if value is None:
        return None
    if info.context and info.context.get(_STORED):
        return strip_invisible(value)
    found = first_invisible(value)
    if found is not None:
        raise ValueError(
            f"contains the invisible formatting character {found}, which can disguise "
            "how it reads; remove it"
        )
    return value


_Visible = AfterValidator(_visible)


class _Common(StrictModel):
    name: Annotated[str | None, _Visible] = Field(None, max_length=200)
    tags: list[Annotated[str, Field(min_length=1, max_length=64), _Visible]] = Field(
        default_factory=list, max_length=32
    )
    resources: Resources = Resources()
    priority: int = Field(5, ge=0, le=9)
    # May a waiting job of higher priority stop this one (it resumes from its last
    # checkpoint later)? None: the queue's default (TRAINYARD_PREEMPTIBLE_QUEUES).
    preemptible: bool | None = None
    max_runtime_s: int | None = Field(None, ge=1, le=30 * 24 * 3600)

    @property
    def queue(self) -> str:
        return GPU_QUEUE if self.resources.gpus >= 1 else CPU_QUEUE


class TrainSpec(_Common):
    kind: Literal["train"]
    dataset: DatasetSpec  # type: ignore[valid-type]
    model: ModelSpec
    loss: LossSpec | None = Field(
        None, description="default: cross_entropy (classification) or mse (regression)"
    )
    optimizer: OptimizerSpec = AdamSpec(name="adam")
    schedule: ScheduleSpec = ConstantSchedule(name="constant")
    regularization: RegularizationSpec = RegularizationSpec()
    early_stopping: EarlyStoppingSpec | None = None
    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(32, ge=1, le=65_536)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    grad_clip_norm: float | None = Field(
        None, gt=0.0, le=1e6, description="clip the global gradient norm"
    )
    grad_accum_steps: int = Field(1, ge=1, le=1024, description="batches per optimizer step")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast on CUDA; fp32 on CPU"
    )
    compile: bool = Field(False, description="torch.compile the model")
    checkpoint_every_epochs: int = Field(1, ge=1, le=10_000)

    @model_validator(mode="after")
    def _recipe(self) -> TrainSpec:
        sched = self.schedule
        if isinstance(sched, _ScheduleCommon) and sched.warmup_epochs >= self.epochs:
            raise CatalogError(
                "schedule.warmup_epochs", f"must be less than epochs ({self.epochs})"
            )
        if (
            isinstance(sched, OneCycleSchedule)
            and sched.max_lr is not None
            and sched.max_lr < self.optimizer.lr
        ):
            raise CatalogError("schedule.max_lr", "must be at least the optimizer's lr")
        world = self.resources.world_size
        if self.batch_size < world:
            # batch_size is the global batch: each process trains on its share of it.
            which = "gpus" if self.resources.gpus >= 1 else "processes"
            raise CatalogError(
                "batch_size",
                f"must be at least the {world} processes the job trains with "
                f"(resources.{which}): each process takes a share of every batch",
            )
        return self


class EvaluateSpec(_Common):
    kind: Literal["evaluate"]
    source_job_id: int = Field(ge=1, le=2**63 - 1, description="a succeeded train job")
    checkpoint: Literal["best", "last"] = Field(
        "best", description="the source job's best or last checkpoint"
    )
    dataset: EvalDatasetSpec = EvalDatasetSpec()
    batch_size: int = Field(256, ge=1, le=65_536)

    @model_validator(mode="after")
    def _one_process(self) -> EvaluateSpec:
        if self.resources.processes > 1:
            raise CatalogError("resources.processes", "evaluation runs in one process")
        if self.resources.gpus > 1:
            raise CatalogError("resources.gpus", "evaluation runs on one GPU; ask for 1")
        return self


# ---------------------------------------------------------------- derived models

# Which succeeded jobs each post-training kind takes as its source. An export of a
# quantized model is not offered: torch.export and ONNX do not carry eager dynamic
# quantization (docs/architecture.md, "Derived models").
DERIVED_SOURCES: dict[str, tuple[str, ...]] = {
    "prune": ("train", "prune"),
    "quantize": ("train", "prune"),
    "export": ("train", "prune"),
}
EXPORT_FORMATS = ("state_dict", "torch_export", "onnx")


class _DerivedCommon(_Common):
    """A post-training job: it reads a succeeded job's checkpoint, writes a new model
    file, and measures the model before and after on the source's test split."""

    source_job_id: int = Field(
        ge=1, le=2**63 - 1, description="a succeeded train (or prune) job of yours"
    )
    checkpoint: Literal["best", "last"] = Field(
        "best", description="the source job's best or last checkpoint"
    )
    batch_size: int = Field(
        256, ge=1, le=65_536, description="batch for measuring (and fine-tuning)"
    )

    @model_validator(mode="after")
    def _one_process(self) -> _DerivedCommon:
        if self.resources.processes > 1:
            raise CatalogError("resources.processes", f"a {self.kind} job runs in one process")  # type: ignore[attr-defined]
        if self.resources.gpus > 1:
            raise CatalogError("resources.gpus", f"a {self.kind} job runs on one GPU; ask for 1")  # type: ignore[attr-defined]
        return self


class PruneSpec(_DerivedCommon):
    kind: Literal["prune"]
    sparsity: float = Field(
        gt=0,
        lt=1,
        description="fraction of the prunable weights (Linear, Conv, LSTM/GRU) set to zero",
    )
    scope: Literal["global", "layer"] = Field(
        "global",
        description="global: the smallest weights of the whole model; layer: each layer alike",
    )
    structured: bool = Field(
        False,
        description="conv layers lose whole output channels (smallest L2 norm), layer by layer; "
        "other layers are pruned unstructured",
    )
    fine_tune_epochs: int = Field(
        0, ge=0, le=1000, description="epochs of training after pruning, masks held"
    )
    fine_tune_lr: float | None = Field(
        None, gt=0, le=10, description="default: a tenth of the source's learning rate"
    )

    @model_validator(mode="after")
    def _structured_per_layer(self) -> PruneSpec:
        if self.structured and self.scope == "global":
            raise CatalogError(
                "scope",
                "structured (channel) pruning ranks channels within a layer; use scope: layer",
            )
        return self


class QuantizeSpec(_DerivedCommon):
    kind: Literal["quantize"]
    method: Literal["dynamic_int8"] = Field(
        "dynamic_int8",
        description="int8 weights, activations quantized per batch on the fly (CPU); "
        "Linear, LSTM and GRU layers",
    )


class ExportSpec(_DerivedCommon):
    kind: Literal["export"]
    formats: list[Literal["state_dict", "torch_export", "onnx"]] = Field(
        default_factory=lambda: list(EXPORT_FORMATS), min_length=1, max_length=3,
        description="state_dict (+ model card), torch_export (.pt2), onnx",
    )  # fmt: skip
    tolerance: float = Field(
        1e-4,
        gt=0,
        le=1,
        description="largest difference allowed between the exported and the original outputs",
    )

    @field_validator("formats")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("lists a format twice")
        return v


DerivedSpec = PruneSpec | QuantizeSpec | ExportSpec
# Every job kind, for the API's filters and answers.
JobKindName = Literal["train", "evaluate", "script", "prune", "quantize", "export"]
JOB_KINDS: tuple[str, ...] = ("train", "evaluate", "script", "prune", "quantize", "export")


# A script's entry point: a file of the bundle ("train.py", "src/train.py") or a
# function of one of its modules ("package.module:function").
ENTRY_FILE = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9_.-]*/)*[A-Za-z0-9_][A-Za-z0-9_.-]*\.py")
ENTRY_FUNCTION = re.compile(
    r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*"
)
MAX_ARGS = 256
MAX_ARG_CHARS = 4096
MAX_PARAMS_BYTES = 64 * 1024


def _entry(value: str) -> str:
    if ENTRY_FILE.fullmatch(value) or ENTRY_FUNCTION.fullmatch(value):
        return value
    raise ValueError(
        "must be a .py file of the bundle, relative to its top (train.py, src/train.py), "
        "or package.module:function"
    )


def _arg(value: str) -> str:
    if "\x00" in value:
        raise ValueError("contains a NUL character, which no command line can carry")
    return value


class ScriptDatasetSpec(StrictModel):
    """A catalogue dataset whose files the worker puts on its disk for the script."""

    name: str = Field(description="a dataset with files: " + ", ".join(DATASET_DIRS))

    @field_validator("name")
    @classmethod
    def _with_files(cls, v: str) -> str:
        if v not in DATASETS:
            raise ValueError(f"unknown dataset {v!r}; choose one of: {', '.join(DATASET_DIRS)}")
        if v not in DATASET_DIRS:
            raise ValueError(
                f"{v!r} has no files to hand to a script (it is built in or generated); "
                f"choose one of: {', '.join(DATASET_DIRS)}, or load it in the script"
            )
        return v


class ScriptSpec(_Common):
    """A team's own PyTorch code: a bundle of files, run as a child process of the
    worker under the job's lease (worker/script_job.py)."""

    kind: Literal["script"]
    bundle_id: int = Field(
        ge=1, le=2**63 - 1, description="a code bundle uploaded with POST /api/v1/bundles"
    )
    entry: Annotated[str, AfterValidator(_entry)] = Field(
        max_length=300, description="train.py (a file of the bundle) or package.module:function"
    )
    args: list[Annotated[str, Field(max_length=MAX_ARG_CHARS), AfterValidator(_arg)]] = Field(
        default_factory=list, max_length=MAX_ARGS, description="the script's command line"
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="any JSON object; the script reads it from TRAINYARD_PARAMS_FILE",
    )
    dataset: ScriptDatasetSpec | None = Field(
        None, description="put this catalogue dataset's files on the worker's disk"
    )
    stop_grace_s: int = Field(
        30,
        ge=1,
        le=600,
        description="after asking the script to stop (SIGTERM: checkpoint and exit), how "
        "long to wait before killing it",
    )

    @field_validator("params")
    @classmethod
    def _small_params(cls, v: dict[str, Any]) -> dict[str, Any]:
        try:
            size = len(json.dumps(v, allow_nan=False))
        except ValueError:
            raise ValueError("must be JSON: no NaN or infinities") from None
        if size > MAX_PARAMS_BYTES:
            raise ValueError(f"is {size} bytes as JSON; at most {MAX_PARAMS_BYTES}")
        return v

    @model_validator(mode="after")
    def _one_process(self) -> ScriptSpec:
        if self.resources.processes > 1:
            raise CatalogError(
                "resources.processes",
                "a script job runs one process (it may start its own); leave it at 1",
            )
        return self


JobSpec = Annotated[
    TrainSpec | EvaluateSpec | ScriptSpec | PruneSpec | QuantizeSpec | ExportSpec,
    Field(discriminator="kind"),
]
AnySpec = TrainSpec | EvaluateSpec | ScriptSpec | PruneSpec | QuantizeSpec | ExportSpec
_adapter: TypeAdapter[AnySpec] = TypeAdapter(JobSpec)

# ---------------------------------------------------------------- errors

# Discriminated unions put the tag into the error location ("model", "cnn", "params");
# users name fields, not tags, so those are dropped.
_TAGS_AFTER: dict[tuple[str, ...], set[str]] = {
    (): {"train", "evaluate", "script", "prune", "quantize", "export"},
    ("model",): set(MODELS),
    ("dataset",): set(DATASETS),
    ("optimizer",): {"adam", "adamw", "sgd", "adagrad", "rmsprop"},
    ("schedule",): {"constant", "step", "cosine", "onecycle"},
}
_UNION_NOUN = {(): "kind", ("model",): "model", ("dataset",): "dataset", ("optimizer",): "optimizer",
               ("schedule",): "schedule"}  # fmt: skip


def _clean_loc(loc: tuple[Any, ...]) -> tuple[str, ...]:
    out: list[str] = []
    dropped: set[tuple[str, ...]] = set()
    for part in loc:
        prefix = tuple(out)
        if prefix not in dropped and part in _TAGS_AFTER.get(prefix, ()):
            dropped.add(prefix)
            continue
        out.append(str(part))
    return tuple(out)


def _error_fields(exc: ValidationError) -> dict[str, str]:
    fields: dict[str, str] = {}
    for err in exc.errors(include_url=False):
        loc = _clean_loc(tuple(err["loc"]))
        kind = err["type"]
        ctx = err.get("ctx") or {}
        if kind in ("union_tag_invalid", "union_tag_not_found"):
            disc = str(ctx.get("discriminator", "")).strip("'")
            noun = _UNION_NOUN.get(loc, ".".join(loc))
            field = ".".join((*loc, disc)) if loc else disc
            if kind == "union_tag_not_found":
                message = "field required"
            else:
                expected = str(ctx.get("expected_tags", "")).replace("'", "")
                message = f"unknown {noun} {ctx.get('tag')!r}; choose one of: {expected}"
            fields.setdefault(field, message)
            continue
        if isinstance(ctx.get("error"), CatalogError):
            catalog_error: CatalogError = ctx["error"]
            fields.setdefault(catalog_error.field, catalog_error.message)
            continue
        field = ".".join(loc) or "body"
        if kind == "extra_forbidden":
            message = "unknown field"
        elif kind == "missing":
            message = "field required"
        else:
            message = err["msg"].removeprefix("Value error, ")
        fields.setdefault(field, message)
    return fields


# ---------------------------------------------------------------- parsing


def resolve_train_dataset(spec: TrainSpec, ctx: CatalogContext) -> DatasetInfo:
    return resolve_dataset(spec.dataset.name, spec.dataset.params, ctx)


def _check_train(spec: TrainSpec, ctx: CatalogContext) -> None:
    """Cross-field checks that need the resolved dataset; fills in the default loss."""
    try:
        info = resolve_train_dataset(spec, ctx)
    except CatalogError as exc:
        raise SpecError({exc.field: exc.message}) from None
    problems = MODELS[spec.model.name].problems(spec.model.params, info)
    if spec.loss is None:
        spec.loss = LossSpec(name="cross_entropy" if info.task == "classification" else "mse")
    elif info.task == "classification" and spec.loss.name != "cross_entropy":
        problems["loss.name"] = (
            f"{spec.loss.name} is for regression; {info.name!r} is classification: use cross_entropy"
        )
    elif info.task == "regression" and spec.loss.name == "cross_entropy":
        problems["loss.name"] = f"{info.name!r} is regression: use mse or l1"
    if spec.loss.label_smoothing and spec.loss.name != "cross_entropy":
        problems["loss.label_smoothing"] = "applies to cross_entropy only"
    if spec.early_stopping is not None:
        allowed = CLASSIFICATION_METRICS if info.task == "classification" else REGRESSION_METRICS
        if spec.early_stopping.metric not in allowed:
            problems["early_stopping.metric"] = f"{info.task} jobs report {', '.join(allowed)}"
    uses_batch_norm = spec.model.name == "resnet" or (
        isinstance(spec.model, CNNSpec) and spec.model.params.batch_norm
    )
    if uses_batch_norm and spec.batch_size < 2:
        problems["batch_size"] = "BatchNorm needs at least 2 samples per training batch"
    if spec.dataset.augment.enabled and info.kind != "image":
        problems["dataset.augment"] = (
            f"augmentation applies to image data; {info.name!r} is {info.kind} data"
        )
    if info.kind == "sequence" and spec.dataset.normalize not in ("auto", "none"):
        problems["dataset.normalize"] = "token sequences cannot be normalized; use none"
    if problems:
        raise SpecError(problems)


def parse_spec(data: Any, ctx: CatalogContext | None = None) -> AnySpec:
    """Validate a submitted spec; SpecError names every bad field.

    With `ctx`, train specs are also checked against their resolved dataset (and get
    their default loss filled in). Evaluate specs' source job is checked by the server.
    """
    if not isinstance(data, dict):
        raise SpecError({"body": "a job spec must be a JSON object"})
    try:
        spec = _adapter.validate_python(data)
    except ValidationError as exc:
        raise SpecError(_error_fields(exc)) from None
    if isinstance(spec, TrainSpec) and ctx is not None:
        _check_train(spec, ctx)
    if isinstance(spec, ScriptSpec) and spec.dataset is not None and ctx is not None:
        name = spec.dataset.name
        try:  # the files are there (or in the bucket the web syncs them from)
            resolve_dataset(name, DATASETS[name].params(), ctx)
        except CatalogError as exc:
            raise SpecError({"dataset.name": exc.message}) from None
    return spec


def spec_to_json(spec: AnySpec) -> dict[str, Any]:
    return spec.model_dump(mode="json")


def load_stored_spec(data: dict[str, Any]) -> AnySpec:
    """Rebuild a spec that was validated (and completed) at submission."""
    return _adapter.validate_python(data, context={_STORED: True})


def eval_dataset_params(spec: EvaluateSpec, source: TrainSpec) -> tuple[str, Any]:
    """The (name, params) an evaluate job scores on: its own override or the source's."""
    if spec.dataset.name is None:
        return source.dataset.name, source.dataset.params
    entry = DATASETS[spec.dataset.name]
    try:
        params = entry.params.model_validate(spec.dataset.params or {})
    except ValidationError as exc:
        raise SpecError(
            {
                f"dataset.params.{'.'.join(map(str, e['loc']))}": e["msg"]
                for e in exc.errors(include_url=False)
            }
        ) from None
    return spec.dataset.name, params
