"""The sweep spec: a base job, a search space over its fields (shared/sweep_space.py),
how to search it, and the check that refuses a space able to produce an invalid job.

A sweep runs many trials, each an ordinary job whose spec is the base with one point of
the space set into it (`apply`). A sweep is refused at creation when any point of its
space makes an invalid job spec (`validate`), naming the parameter that produced the bad
value. A space has infinitely many points, so validation covers a finite set
(`points_to_check`): every combination of the choices, crossed with every combination of
the numeric parameters' ends, plus each numeric's interior values one at a time. The job
spec's bounds are intervals, so ends find them; the interior values find the rules that
are not (odd kernel sizes, ResNet depths, heads that must divide d_model, a float range
over an integer field). Grid sweeps enumerate their space in a fixed order
(`grid_points`): choices and ints only.

Nothing here imports the database, Flask, Celery or torch: the CLI, the web process and
the sweep controller all use it.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Callable, Iterator, Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from shared.dataset_catalog import CatalogContext
from shared.invisible_chars import first_invisible
from shared.metric_catalog import MAX_KEY_CHARS, Direction, per_epoch_keys
from shared.metric_catalog import direction as catalog_direction
from shared.schema_base import CatalogError, StrictModel
from shared.settings import Settings
from shared.spec import ScriptSpec, SpecError, TrainSpec, parse_spec, resolve_train_dataset
from shared.sweep_space import (
    FORMS,
    INT_VALUES_CHECKED,
    Choice,
    ChoiceOption,
    Distribution,
    IntRange,
    LogUniform,
    SweepSpecError,
    Uniform,
    corners_and_interiors,
    expand,
    format_value,
    grid_count,
    grid_problems,
    overlaps,
    parse_space,
    space_to_json,
)

# The space's names are part of this module's interface: callers import the sweep spec.
__all__ = [
    "INT_VALUES_CHECKED",
    "AshaStopping",
    "Choice",
    "ChoiceOption",
    "Distribution",
    "IntRange",
    "LogUniform",
    "MedianStopping",
    "SweepSpec",
    "SweepSpecError",
    "Uniform",
    "apply",
    "grid_points",
    "grid_size",
    "iter_grid",
    "load_sweep_spec",
    "parse_space",
    "parse_sweep_spec",
    "points_to_check",
    "space_to_json",
    "sweep_to_json",
    "validate",
]

# The defaults of the settings that bound a sweep (TRAINYARD_SWEEP_MAX_TRIALS,
# TRAINYARD_SWEEP_MAX_POINTS_CHECKED), for callers that pass none.
DEFAULT_MAX_TRIALS: int = Settings.model_fields["sweep_max_trials"].default
DEFAULT_MAX_POINTS_CHECKED: int = Settings.model_fields["sweep_max_points_checked"].default

# Choosing a model or dataset by name starts from that one's default params: the base's
# params belong to the base's model (an MLP's `hidden` means nothing to a ResNet).
RESET_PARAMS_ON_NAME = ("model", "dataset")

Method = Literal["grid", "random", "tpe"]


# ---------------------------------------------------------------- applying a point


def _set(trial: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    node = trial
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif isinstance(child, str):
            # The spec's shorthand `loss: mse` is {"name": "mse"}.
            child = node[part] = {"name": child}
        elif not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise SweepSpecError(
                {
                    f"space.{path}": f"base's {where} is {json.dumps(child)}, not an object with fields"
                }
            )
        node = child
    node[parts[-1]] = value


def apply(base: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """The trial's job spec: `params` (dotted path -> value) set into a deep copy of the
    base. Choosing a model (or dataset) other than the base's by `model.name` starts from
    that model's default params; the space's own `model.params.*` are set on top."""
    trial = copy.deepcopy(dict(base))
    for section in RESET_PARAMS_ON_NAME:
        path = f"{section}.name"
        if path not in params:
            continue
        current = trial.get(section)
        if isinstance(current, dict) and current.get("name") == params[path]:
            continue
        kept = (
            {k: v for k, v in current.items() if k != "params"} if isinstance(current, dict) else {}
        )
        trial[section] = {**kept, "name": params[path]}
    for path, value in params.items():
        _set(trial, path, value)
    return trial


# ---------------------------------------------------------------- the sweep spec


class MedianStopping(StrictModel):
    """Prune a trial whose best so far at an epoch is worse than the median of the other
    trials' best so far at that epoch."""

    rule: Literal["median"]
    min_epochs: int = Field(
        1, ge=1, le=10_000, description="no trial is pruned before it has run this many epochs"
    )
    min_trials: int = Field(
        3,
        ge=1,
        le=1000,
        description="other trials that must have reached an epoch before anyone is pruned there",
    )


class AshaStopping(StrictModel):
    """Successive halving (ASHA): rungs at min_epochs * reduction_factor^k below
    max_epochs; at each rung only the top 1/reduction_factor of the trials that reached it
    go on."""

    rule: Literal["asha"]
    min_epochs: int = Field(1, ge=1, le=10_000, description="the first rung")
    reduction_factor: int = Field(3, ge=2, le=100)
    max_epochs: int = Field(ge=2, le=10_000, description="the most epochs a trial runs")

    @model_validator(mode="after")
    def _rungs(self) -> AshaStopping:
        if self.max_epochs <= self.min_epochs:
            raise CatalogError(
                "early_stopping.max_epochs",
                f"must be more than min_epochs ({self.min_epochs}), or there is no rung",
            )
        return self


EarlyStopping = Annotated[MedianStopping | AshaStopping, Field(discriminator="rule")]


def _space_before(raw: Any) -> Any:
    return parse_space(raw)


SpaceField = Annotated[
    dict[str, Distribution],
    BeforeValidator(_space_before),
    PlainSerializer(space_to_json, return_type=dict),
    WithJsonSchema(
        {
            "type": "object",
            "description": "dotted path of the base job's field -> distribution: " + FORMS,
            "additionalProperties": {"anyOf": [{"type": "string"}, {"type": "object"}]},
            "minProperties": 1,
        }
    ),
]


def _defaulted_in_schema(schema: dict[str, Any]) -> None:
    # Required once validated, but a submission may leave them out (see _defaults).
    schema["required"] = [f for f in schema.get("required", []) if f not in _DEFAULTED]


_DEFAULTED = ("direction", "max_trials")


class SweepSpec(StrictModel):
    model_config = ConfigDict(json_schema_extra=_defaulted_in_schema)

    name: str | None = Field(None, max_length=200, description="shown on the sweep's page")
    base: dict[str, Any] = Field(description="a train or script job spec the trials start from")
    space: SpaceField
    method: Method = Field(
        description="grid: every combination in order; random: seeded samples; tpe: Optuna's "
        "Tree-structured Parzen Estimator, learning from finished trials"
    )
    metric: str = Field(
        min_length=1,
        max_length=MAX_KEY_CHARS,
        description="the trials' result/per-epoch key to optimize, e.g. val_accuracy",
    )
    direction: Direction = Field(
        description="max or min; default: the metric's better direction in the catalogue"
    )
    max_trials: int = Field(
        ge=1, description="trials to run at most; grid: default (and at most useful) its size"
    )
    parallelism: int = Field(1, ge=1, le=1000, description="trials queued or running at once")
    time_budget_s: int | None = Field(
        None, ge=1, le=365 * 24 * 3600, description="start no new trial after this long"
    )
    early_stopping: EarlyStopping | None = None
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        """direction from the metric catalogue; a grid's max_trials from its size."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        metric = data.get("metric")
        if data.get("direction") is None and isinstance(metric, str):
            known = catalog_direction(metric)
            if known is not None:
                data["direction"] = known
        if data.get("method") == "grid" and data.get("max_trials") is None:
            try:
                space = parse_space(data.get("space"))
                data["space"] = space
                data["max_trials"] = grid_count(space)
            except (SweepSpecError, ValueError):
                # The space's own error (or its continuous parameter) is what to report.
                data["max_trials"] = 1
        return data

    @field_validator("name")
    @classmethod
    def _visible_name(cls, name: str | None) -> str | None:
        # As a job's name (shared/spec.py): what is shown must be what is stored.
        found = first_invisible(name) if name else None
        if found is not None:
            raise ValueError(f"contains the invisible formatting character {found}; remove it")
        return name

    @field_validator("base")
    @classmethod
    def _base_kind(cls, base: dict[str, Any]) -> dict[str, Any]:
        kind = base.get("kind")
        if kind is None:
            raise CatalogError("base.kind", "field required: train or script")
        if kind not in ("train", "script"):
            raise CatalogError(
                "base.kind",
                f"a sweep's trials are train or script jobs, not {format_value(kind)}",
            )
        return base

    @model_validator(mode="after")
    def _whole(self, info: ValidationInfo) -> SweepSpec:
        cap = (info.context or {}).get("max_trials_cap", DEFAULT_MAX_TRIALS)
        problems: dict[str, str] = {}
        if self.method == "grid":
            problems.update(grid_problems(self.space))
            size = grid_count(self.space) if not problems else 0
            if size > cap and self.max_trials >= size:
                problems["space"] = (
                    f"the grid has {size} points, more than the {cap} trials a sweep may "
                    "run (TRAINYARD_SWEEP_MAX_TRIALS); make it smaller or set max_trials "
                    "to run its first points"
                )
            elif size:
                # A grid runs each point once: its trial count is never above its size.
                self.max_trials = min(self.max_trials, size)
        if self.max_trials > cap and "space" not in problems:
            problems["max_trials"] = f"at most {cap} (TRAINYARD_SWEEP_MAX_TRIALS)"
        if problems:
            raise SweepSpecError(problems)
        return self


# Pydantic's wording for these, as shared/spec.py words them for job specs.
_PLAIN = {"extra_forbidden": "unknown field", "missing": "field required"}


def _sweep_fields(exc: ValidationError, data: Mapping[str, Any]) -> dict[str, str]:
    # The two fields _defaults fills in are missing only when it could not: say why.
    unfilled = {
        "direction": f"metric {format_value(data.get('metric'))} has no known better "
        "direction; set direction: max or min",
        "max_trials": "field required: random and tpe sweeps need a number of trials",
    }
    fields: dict[str, str] = {}
    for err in exc.errors(include_url=False):
        ctx = err.get("ctx") or {}
        error = ctx.get("error")
        if isinstance(error, SpecError):
            for field, message in error.fields.items():
                fields.setdefault(field, message)
            continue
        if isinstance(error, CatalogError):
            fields.setdefault(error.field, error.message)
            continue
        loc = [str(p) for p in err["loc"]]
        if loc[:1] == ["early_stopping"] and loc[1:2] in (["median"], ["asha"]):
            del loc[1]  # the union's tag: people name fields, not tags
        field, kind = ".".join(loc) or "body", err["type"]
        if kind == "union_tag_not_found":
            field, message = "early_stopping.rule", "field required: median or asha"
        elif kind == "union_tag_invalid":
            field = "early_stopping.rule"
            message = f"unknown rule {ctx.get('tag')!r}; choose one of: median, asha"
        elif kind == "missing" and field in unfilled:
            message = unfilled[field]
        else:
            message = _PLAIN.get(kind) or err["msg"].removeprefix("Value error, ")
        fields.setdefault(field, message)
    return fields


def parse_sweep_spec(data: Any, *, max_trials_cap: int | None = None) -> SweepSpec:
    """Validate a submitted sweep at the spec level (the base's kind, the space's grammar
    and bounds, the method's needs); SweepSpecError names every bad field. `validate`
    then checks every point against the catalogue."""
    if not isinstance(data, dict):
        raise SweepSpecError({"body": "a sweep spec must be a JSON object"})
    cap = DEFAULT_MAX_TRIALS if max_trials_cap is None else max_trials_cap
    try:
        return SweepSpec.model_validate(data, context={"max_trials_cap": cap})
    except ValidationError as exc:
        raise SweepSpecError(_sweep_fields(exc, data)) from None


def load_sweep_spec(data: Mapping[str, Any]) -> SweepSpec:
    """A stored sweep (validated at creation) back from its JSON; no caps re-applied, so
    lowering a setting does not break sweeps that already exist."""
    return SweepSpec.model_validate(dict(data), context={"max_trials_cap": 2**62})


def sweep_to_json(spec: SweepSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json")


# ---------------------------------------------------------------- enumerating


def grid_size(spec: SweepSpec) -> int:
    """How many points the grid has (the space must be a valid grid)."""
    return grid_count(spec.space)


def iter_grid(spec: SweepSpec) -> Iterator[dict[str, Any]]:
    """The grid's points in their fixed order, lazily (a grid may be large): parameters
    in space order, the first changing slowest; a choice's sub-space right after it,
    only with its value. Ints count from low to high by their step."""
    problems = grid_problems(spec.space)
    if problems:
        raise SweepSpecError(problems)
    for slots in expand(list(spec.space.items()), ints=True):
        yield {path: value for path, _, value in slots}


def grid_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every point of the grid, in order (see iter_grid)."""
    return list(iter_grid(spec))


def _points_with_dists(
    spec: SweepSpec, limit: int
) -> Iterator[tuple[dict[str, Any], dict[str, Distribution]]]:
    if spec.method == "grid":
        size = grid_size(spec)
        wanted = min(size, spec.max_trials)
        if wanted > limit:
            raise SweepSpecError(
                {
                    "space": f"the grid's first {wanted} points (of {size}) are more than the "
                    f"{limit} a sweep's validation checks (TRAINYARD_SWEEP_MAX_POINTS_CHECKED); "
                    "make the grid or max_trials smaller"
                }
            )
        for slots in itertools.islice(expand(list(spec.space.items()), ints=True), wanted):
            yield {p: v for p, _, v in slots}, {p: d for p, d, _ in slots}
        return
    produced = 0
    for slots in expand(list(spec.space.items()), ints=False):
        dists = {p: d for p, d, _ in slots}
        for point in corners_and_interiors(slots):
            produced += 1
            if produced > limit:
                raise SweepSpecError(
                    {
                        "space": f"has more than {limit} points to check (every combination "
                        "of the choices, crossed with every combination of the numeric "
                        "parameters' low and high ends); the limit is "
                        "TRAINYARD_SWEEP_MAX_POINTS_CHECKED: fix some parameters in base "
                        "or search fewer at once"
                    }
                )
            yield point, dists


def points_to_check(spec: SweepSpec, limit: int | None = None) -> list[dict[str, Any]]:
    """The finite set of points `validate` turns into job specs.

    grid: the points it will run (the first max_trials of the grid). random and tpe:
    every combination of the choices (sub-spaces only with their value), crossed with
    every combination of each numeric parameter's low and high ends; then each
    numeric's interior values one at a time (an int's every value up to
    INT_VALUES_CHECKED values, else its middle; a float's middle, not a whole number),
    the others at all their lows and at all their highs. More than `limit` (default
    TRAINYARD_SWEEP_MAX_POINTS_CHECKED) is refused naming the space."""
    cap = DEFAULT_MAX_POINTS_CHECKED if limit is None else limit
    return [point for point, _ in _points_with_dists(spec, cap)]


# ---------------------------------------------------------------- validating every point


def _blame(
    point: Mapping[str, Any], dists: Mapping[str, Distribution], field: str, message: str
) -> tuple[str, str] | None:
    """space.<path> when the error is on a field the space sets (or inside it)."""
    matching = [p for p in point if overlaps(p, field)]
    if not matching:
        return None
    path = max(matching, key=len)
    text = (
        f"{dists[path].describe()} can produce {format_value(point[path])}, which {field} "
        f"refuses: {message}"
    )
    chosen = [(p, v) for p, v in point.items() if p != path and isinstance(dists[p], Choice)]
    if message == "unknown field" and chosen:
        # A field one model (optimizer, dataset) has and another has not: say which.
        where = ", ".join(f"{p}={format_value(v)}" for p, v in chosen)
        text += f" (with {where}; a sub-space under that choice sets it only where it applies)"
    return f"space.{path}", text


def _train_metrics(task: str) -> list[str]:
    return sorted(k for k in per_epoch_keys(task) if catalog_direction(k) is not None)


def validate(
    spec: SweepSpec,
    ctx: CatalogContext,
    *,
    find_bundle: Callable[[int], Any] | None = None,
    max_points: int | None = None,
) -> None:
    """Refuse a sweep any of whose points (`points_to_check`) makes an invalid job spec.

    Each point is applied to the base and parsed with shared/spec.parse_spec against
    `ctx`, as a submitted job is. A problem on a field the space sets is reported as
    space.<path>, naming the value that caused it; any other as base.<field>, with the
    point that caused it when not every point does. Train trials must also report the
    metric per epoch; script trials' bundle must exist (`find_bundle(id)` truthy) when
    `find_bundle` is given, else only their spec is checked (the server checks the
    bundle as for any job). Raises SweepSpecError; returns None when the sweep is valid.
    """
    cap = DEFAULT_MAX_POINTS_CHECKED if max_points is None else max_points
    errors: dict[str, str] = {}
    base_errors: dict[str, tuple[str, dict[str, Any], int]] = {}
    checked = 0
    tasks: dict[str, str] = {}
    bundles: dict[int, bool] = {}
    for point, dists in _points_with_dists(spec, cap):
        checked += 1
        try:
            job = parse_spec(apply(spec.base, point), ctx)
        except SweepSpecError as exc:  # the base has no object where the space reaches in
            for field, message in exc.fields.items():
                errors.setdefault(field, message)
            continue
        except SpecError as exc:
            for field, message in exc.fields.items():
                blamed = _blame(point, dists, field, message)
                if blamed is not None:
                    errors.setdefault(*blamed)
                else:
                    first = base_errors.get(f"base.{field}")
                    count = first[2] + 1 if first else 1
                    base_errors[f"base.{field}"] = (
                        first[0] if first else message,
                        first[1] if first else point,
                        count,
                    )
            continue
        if isinstance(job, TrainSpec):
            key = json.dumps(job.dataset.model_dump(mode="json"), sort_keys=True)
            if key not in tasks:
                tasks[key] = resolve_train_dataset(job, ctx).task
            allowed = _train_metrics(tasks[key])
            if spec.metric not in allowed:
                errors.setdefault(
                    "metric",
                    f"{tasks[key]} train jobs report {', '.join(allowed)} per epoch; "
                    f"not {format_value(spec.metric)}",
                )
        if isinstance(job, ScriptSpec) and find_bundle is not None:
            if job.bundle_id not in bundles:
                bundles[job.bundle_id] = bool(find_bundle(job.bundle_id))
            if not bundles[job.bundle_id]:
                field = "space.bundle_id" if "bundle_id" in point else "base.bundle_id"
                errors.setdefault(field, f"bundle {job.bundle_id} does not exist")
    for field, (message, point, count) in base_errors.items():
        if count < checked and point:
            where = ", ".join(f"{p}={format_value(v)}" for p, v in point.items())
            message = f"{message} (when the space sets {where})"
        errors.setdefault(field, message)
    if errors:
        raise SweepSpecError(errors)
