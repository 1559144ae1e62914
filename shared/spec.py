"""The JobSpec: one pydantic schema for the API, the form, the CLI and the worker.

`parse_spec` is the single entry point. It returns a TrainSpec or EvaluateSpec, or
raises SpecError whose `fields` maps dotted field names ("model.params.hidden") to a
message a person can act on.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError, ValidationInfo, field_validator

from shared.registry import DATASETS, MODELS, CNNParams, MLPParams, StrictModel

GPU_QUEUE = "gpu"
CPU_QUEUE = "cpu"


class SpecError(ValueError):
    def __init__(self, fields: dict[str, str]):
        self.fields = fields
        super().__init__("; ".join(f"{k}: {v}" for k, v in fields.items()))


# ---------------------------------------------------------------- parts


class DatasetSpec(StrictModel):
    name: str = Field(description="a dataset from GET /api/v1/datasets")
    val_fraction: float = Field(
        0.2, gt=0.0, lt=0.9, description="share of the non-test data held out for validation"
    )

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in DATASETS:
            raise ValueError(f"unknown dataset {v!r}; choose one of: {', '.join(sorted(DATASETS))}")
        return v


class EvalDatasetSpec(StrictModel):
    name: str | None = Field(None, description="defaults to the source job's dataset")
    split: Literal["train", "val", "test"] = "test"

    @field_validator("name")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        if v is not None and v not in DATASETS:
            raise ValueError(f"unknown dataset {v!r}; choose one of: {', '.join(sorted(DATASETS))}")
        return v


class MLPSpec(StrictModel):
    name: Literal["mlp"]
    params: MLPParams = MLPParams()


class CNNSpec(StrictModel):
    name: Literal["cnn"]
    params: CNNParams = CNNParams()


ModelSpec = Annotated[MLPSpec | CNNSpec, Field(discriminator="name")]


class AdamSpec(StrictModel):
    name: Literal["adam"]
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    betas: tuple[float, float] = (0.9, 0.999)

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("both betas must be in [0, 1)")
        return v


class SGDSpec(StrictModel):
    name: Literal["sgd"]
    lr: float = Field(1e-2, gt=0.0, le=10.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)

    @field_validator("nesterov")
    @classmethod
    def _nesterov_needs_momentum(cls, v: bool, info: ValidationInfo) -> bool:
        if v and info.data.get("momentum", 0.0) == 0.0:
            raise ValueError("nesterov needs momentum > 0")
        return v


OptimizerSpec = Annotated[AdamSpec | SGDSpec, Field(discriminator="name")]


class Resources(StrictModel):
    gpus: int = Field(
        0, ge=0, le=16, description="GPUs the job needs; >= 1 routes it to the gpu queue"
    )


class _Common(StrictModel):
    name: str | None = Field(None, max_length=200)
    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=32
    )
    resources: Resources = Resources()
    priority: int = Field(5, ge=0, le=9)
    max_runtime_s: int | None = Field(None, ge=1, le=30 * 24 * 3600)

    @property
    def queue(self) -> str:
        return GPU_QUEUE if self.resources.gpus >= 1 else CPU_QUEUE


class TrainSpec(_Common):
    kind: Literal["train"]
    dataset: DatasetSpec
    model: ModelSpec
    loss: Literal["cross_entropy"] = "cross_entropy"
    optimizer: OptimizerSpec = AdamSpec(name="adam")
    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(32, ge=1, le=65_536)
    seed: int = Field(0, ge=0, le=2**31 - 1)


class EvaluateSpec(_Common):
    kind: Literal["evaluate"]
    source_job_id: int = Field(ge=1, description="a succeeded train job")
    dataset: EvalDatasetSpec = EvalDatasetSpec()
    batch_size: int = Field(256, ge=1, le=65_536)


JobSpec = Annotated[TrainSpec | EvaluateSpec, Field(discriminator="kind")]
_adapter: TypeAdapter[TrainSpec | EvaluateSpec] = TypeAdapter(JobSpec)

# Discriminated unions put the tag into the error location ("model", "cnn", "params");
# users name fields, not tags, so those are dropped.
_TAGS_AFTER = {
    (): {"train", "evaluate"},
    ("model",): set(MODELS),
    ("optimizer",): {"adam", "sgd"},
}
_UNION_NOUN = {(): "kind", ("model",): "model", ("optimizer",): "optimizer"}


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
        if kind in ("union_tag_invalid", "union_tag_not_found"):
            disc = str(err.get("ctx", {}).get("discriminator", "")).strip("'")
            noun = _UNION_NOUN.get(loc, ".".join(loc))
            field = ".".join((*loc, disc)) if loc else disc
            if kind == "union_tag_not_found":
                message = "field required"
            else:
                expected = str(err["ctx"].get("expected_tags", "")).replace("'", "")
                message = f"unknown {noun} {err['ctx'].get('tag')!r}; choose one of: {expected}"
            fields.setdefault(field, message)
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


def parse_spec(data: Any) -> TrainSpec | EvaluateSpec:
    """Validate a submitted spec; SpecError names every bad field."""
    if not isinstance(data, dict):
        raise SpecError({"body": "a job spec must be a JSON object"})
    try:
        spec = _adapter.validate_python(data)
    except ValidationError as exc:
        raise SpecError(_error_fields(exc)) from None
    if isinstance(spec, TrainSpec):
        dataset = DATASETS[spec.dataset.name]
        problems = MODELS[spec.model.name].check(spec.model.params, dataset)
        if problems:
            raise SpecError(problems)
    return spec


def spec_to_json(spec: TrainSpec | EvaluateSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json")


def load_stored_spec(data: dict[str, Any]) -> TrainSpec | EvaluateSpec:
    """Rebuild a spec that was validated at submission (no cross checks again)."""
    return _adapter.validate_python(data)
