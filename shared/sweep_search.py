"""Where a sweep's next trials come from: grid, random and TPE proposals.

`propose(spec, trials, count)` is a pure function of the sweep's spec and its trial rows
(as `TrialRecord`s): the controller may die between two calls, and the next one, given
the same rows, proposes the same points. Nothing is remembered between calls.

- grid: the combinations in a fixed order (the first dimension varies slowest, a choice's
  sub-space inside its value), skipping every point a trial already has; none when all
  are used. A cancelled trial's point counts as unused, so resuming a cancelled sweep
  runs it again.
- random: trial number N's point is drawn from a generator seeded by (seed, N), so it
  does not depend on which other trials exist or on a restart.
- tpe: Optuna's TPESampler used as a library in ask/tell mode. The study is rebuilt in
  memory from the rows on every call (the database is the only truth; no Optuna storage
  that could disagree with it): finished trials are added as COMPLETE (with the metric),
  PRUNED (with their per-epoch values) or FAIL, and queued/running ones are enqueued and
  asked, which leaves them RUNNING as in any ask/tell loop, so the constant liar treats
  them as bad points and concurrent proposals spread out instead of piling on one point.

Parameters are named by their dotted paths (a path that occurs in two branches of a
conditional space gets its branch appended for Optuna, which refuses one name with two
kinds of distribution). Conditional sub-spaces follow define-by-run: the choice is
suggested first, then the chosen option's sub-space, so a sub-space's parameters exist
only in trials that chose its value.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState

Method = Literal["grid", "random", "tpe"]
Direction = Literal["max", "min"]
TrialStateName = Literal["queued", "running", "succeeded", "failed", "pruned", "cancelled"]

# A point already proposed to a trial: grid never proposes it again.
_HOLDS_ITS_POINT = frozenset({"queued", "running", "succeeded", "failed", "pruned"})
_PENDING = frozenset({"queued", "running"})


class SearchSpaceError(ValueError):
    """A space the method cannot search (a continuous dimension in a grid, a bad range);
    `path` names the dimension."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


@dataclass(frozen=True)
class TrialRecord:
    """One trial row as plain data: its number in the sweep, the parameters it was given
    (dotted path -> value, only the active ones of a conditional space), its state, the
    sweep metric's final value and its per-epoch values."""

    number: int
    params: Mapping[str, Any]
    state: TrialStateName
    value: float | None = None
    intermediate: Mapping[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Option:
    """One value of a choice, with the sub-space that applies only when it is chosen."""

    value: Any
    space: tuple[Dimension, ...] = ()


@dataclass(frozen=True)
class Dimension:
    """One searched field, by dotted path. `low`/`high` bound uniform, loguniform and int
    (both ends included); `log`/`step` apply to int; `options` to choice."""

    path: str
    kind: Literal["uniform", "loguniform", "int", "choice"]
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: int = 1
    options: tuple[Option, ...] = ()

    def __post_init__(self) -> None:
        if self.kind == "choice":
            if not self.options:
                raise SearchSpaceError(self.path, "a choice needs at least one value")
            return
        if not self.low <= self.high:
            raise SearchSpaceError(self.path, f"low {self.low} is above high {self.high}")
        if self.kind == "loguniform" and self.low <= 0:
            raise SearchSpaceError(self.path, "loguniform needs a positive low end")
        if self.kind == "int":
            if self.low != int(self.low) or self.high != int(self.high):
                raise SearchSpaceError(self.path, "int needs whole-number ends")
            if self.step < 1:
                raise SearchSpaceError(self.path, "int needs a step of at least 1")
            if self.log and (self.low < 1 or self.step != 1):
                raise SearchSpaceError(self.path, "a log int needs low >= 1 and step 1")


@dataclass(frozen=True)
class SearchSpec:
    """What a search needs of a sweep spec."""

    method: Method
    space: tuple[Dimension, ...]
    direction: Direction = "max"
    seed: int = 0
    max_trials: int = 20


def next_trial_number(trials: Sequence[TrialRecord]) -> int:
    """The number the first proposal is meant for (0 for a sweep without trials); the
    i-th proposal is for this number + i."""
    return max((t.number for t in trials), default=-1) + 1


def propose(spec: Any, trials: Sequence[TrialRecord], count: int) -> list[dict[str, Any]]:
    """Up to `count` new parameter dicts (dotted path -> value) for the trials numbered
    from `next_trial_number(trials)` on. Grid returns fewer when it runs out. Keeping to
    `max_trials` and `parallelism` is the caller's job: this only says which points."""
    search = as_search_spec(spec)
    if count <= 0:
        return []
    first = next_trial_number(trials)
    if search.method == "grid":
        return _grid(search, trials, count)
    if search.method == "random":
        return [_random_point(search, first + i) for i in range(count)]
    if search.method == "tpe":
        return _tpe(search, trials, count, first)
    raise ValueError(f"unknown search method {search.method!r}")


# --- the spec, as dimensions ---------------------------------------------------------


def as_search_spec(spec: Any) -> SearchSpec:
    """A SearchSpec from one, or from anything with method, space, direction, seed and
    max_trials attributes whose space maps dotted paths to distributions as JSON objects
    ({"uniform": [lo, hi]}, {"loguniform": [lo, hi]}, {"int": [lo, hi], "log": b,
    "step": n}, {"choice": [v, {"value": v, "space": {...}}, ...]}) or Dimensions."""
    if isinstance(spec, SearchSpec):
        return spec
    seed = getattr(spec, "seed", None)
    return SearchSpec(
        method=spec.method,
        space=dimensions(spec.space),
        direction=getattr(spec, "direction", None) or "max",
        seed=0 if seed is None else int(seed),
        max_trials=int(getattr(spec, "max_trials", 20)),
    )


def dimensions(space: Mapping[str, Any] | Sequence[Dimension]) -> tuple[Dimension, ...]:
    """The dimensions of a space given as path -> distribution, in its order."""
    if not isinstance(space, Mapping):
        return tuple(space)
    return tuple(_dimension(path, dist) for path, dist in space.items())


def _dimension(path: str, dist: Any) -> Dimension:
    if isinstance(dist, Dimension):
        return dist
    if hasattr(dist, "to_json"):  # shared/sweep_spec.py's typed distributions
        dist = dist.to_json()
    if not isinstance(dist, Mapping):
        raise SearchSpaceError(path, f"not a distribution: {dist!r}")
    if "choice" in dist:
        return Dimension(path, "choice", options=tuple(_option(path, o) for o in dist["choice"]))
    for kind in ("uniform", "loguniform", "int"):
        if kind in dist:
            low, high = dist[kind]
            return Dimension(
                path,
                kind,
                low=low,
                high=high,
                log=bool(dist.get("log", False)),
                step=int(dist.get("step") or 1),
            )
    raise SearchSpaceError(path, f"not a distribution: {dict(dist)!r}")


def _option(path: str, option: Any) -> Option:
    if hasattr(option, "to_json"):
        option = option.to_json()
    if isinstance(option, Mapping) and "value" in option:
        return Option(option["value"], dimensions(option.get("space") or {}))
    return Option(option)


# --- walking a space -----------------------------------------------------------------

# Picks a value for a dimension, given its Optuna name; for a choice it returns the
# option's index.
_Pick = Callable[[Dimension, str], Any]


def _walk(space: Sequence[Dimension], pick: _Pick) -> dict[str, Any]:
    """The point that `pick` chooses, dimension by dimension: a choice first, then the
    sub-space of the option it chose (define-by-run)."""
    names = _optuna_names(space)
    point: dict[str, Any] = {}

    def visit(dims: Sequence[Dimension], branch: str) -> None:
        for dim in dims:
            name = names[(dim.path, branch)]
            if dim.kind != "choice":
                point[dim.path] = pick(dim, name)
                continue
            index = pick(dim, name)
            option = dim.options[index]
            point[dim.path] = option.value
            visit(option.space, f"{branch}{dim.path}={index};")

    visit(space, "")
    return point


def _optuna_names(space: Sequence[Dimension]) -> dict[tuple[str, str], str]:
    """(path, branch) -> the parameter's name for Optuna: the dotted path, with its branch
    appended only where the path occurs more than once in the space."""
    found: list[tuple[str, str]] = []

    def visit(dims: Sequence[Dimension], branch: str) -> None:
        for dim in dims:
            found.append((dim.path, branch))
            for index, option in enumerate(dim.options):
                visit(option.space, f"{branch}{dim.path}={index};")

    visit(space, "")
    counts = Counter(path for path, _ in found)
    return {
        (path, branch): path if counts[path] == 1 else f"{path}[{branch.rstrip(';')}]"
        for path, branch in found
    }


def _key(value: Any) -> str:
    """A value's identity across a JSON round trip (1.0 stored may come back as 1)."""

    def norm(v: Any) -> Any:
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, Mapping):
            return {str(k): norm(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [norm(x) for x in v]
        return v

    return json.dumps(norm(value), sort_keys=True)


def _option_index(dim: Dimension, value: Any) -> int | None:
    key = _key(value)
    return next((i for i, o in enumerate(dim.options) if _key(o.value) == key), None)


# --- grid ----------------------------------------------------------------------------


def _grid(search: SearchSpec, trials: Sequence[TrialRecord], count: int) -> list[dict]:
    used = {_key(dict(t.params)) for t in trials if t.state in _HOLDS_ITS_POINT}
    out: list[dict[str, Any]] = []
    for point in grid_points(search.space):
        if len(out) == count:
            break
        if _key(point) not in used:
            out.append(point)
    return out


def grid_points(space: Sequence[Dimension]) -> Iterator[dict[str, Any]]:
    """Every combination of the space, the first dimension varying slowest; a choice's
    sub-space is crossed with its value only."""
    if not space:
        yield {}
        return
    first, rest = space[0], tuple(space[1:])
    for value, sub in _grid_values(first):
        for tail in grid_points(sub + rest):
            yield {first.path: value, **tail}


def _grid_values(dim: Dimension) -> Iterator[tuple[Any, tuple[Dimension, ...]]]:
    if dim.kind == "choice":
        for option in dim.options:
            yield option.value, option.space
    elif dim.kind == "int":
        for value in range(int(dim.low), int(dim.high) + 1, dim.step):
            yield value, ()
    else:
        raise SearchSpaceError(dim.path, f"a grid cannot enumerate {dim.kind}; use int or choice")


# --- random --------------------------------------------------------------------------


def _derived_seed(seed: int, number: int) -> int:
    """A 32-bit seed from (sweep seed, trial number), the same in every process (unlike
    hash(), which Python salts per process)."""
    digest = hashlib.sha256(f"trainyard-sweep:{seed}:{number}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _random_point(search: SearchSpec, number: int) -> dict[str, Any]:
    rng = random.Random(_derived_seed(search.seed, number))
    return _walk(search.space, lambda dim, _name: _sample(rng, dim))


def _sample(rng: random.Random, dim: Dimension) -> Any:
    if dim.kind == "choice":
        return rng.randrange(len(dim.options))
    if dim.kind == "uniform":
        return rng.uniform(dim.low, dim.high)
    if dim.kind == "loguniform":
        return min(
            dim.high, max(dim.low, math.exp(rng.uniform(math.log(dim.low), math.log(dim.high))))
        )
    low, high = int(dim.low), int(dim.high)
    if dim.log:
        # Each integer owns the stretch of log-space around it, as Optuna draws log ints.
        drawn = math.exp(rng.uniform(math.log(low - 0.5), math.log(high + 0.5)))
        return min(high, max(low, round(drawn)))
    return low + dim.step * rng.randint(0, (high - low) // dim.step)


# --- tpe -----------------------------------------------------------------------------


def startup_trials(max_trials: int) -> int:
    """How many finished trials TPE waits for before modelling (random until then).

    Optuna's default of 10 suits studies of hundreds of trials; a sweep is often 10-50,
    where 10 random trials would be most of the budget. A quarter of it leaves TPE the
    rest, and at least 4 gives its "good" group (the best ~10%, at least one trial)
    something to stand out against; never more than Optuna's 10."""
    return max(4, min(10, max_trials // 4))


def _distribution(dim: Dimension) -> BaseDistribution:
    if dim.kind == "choice":
        return CategoricalDistribution(list(range(len(dim.options))))
    if dim.kind == "int":
        return IntDistribution(int(dim.low), int(dim.high), log=dim.log, step=dim.step)
    return FloatDistribution(dim.low, dim.high, log=dim.kind == "loguniform")


def _suggest(trial: optuna.Trial, dim: Dimension, name: str) -> Any:
    if dim.kind == "choice":
        return trial.suggest_categorical(name, list(range(len(dim.options))))
    if dim.kind == "int":
        return trial.suggest_int(name, int(dim.low), int(dim.high), step=dim.step, log=dim.log)
    return trial.suggest_float(name, dim.low, dim.high, log=dim.kind == "loguniform")


class _DoesNotFit(Exception):
    pass


def _as_optuna(
    space: Sequence[Dimension], params: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, BaseDistribution]] | None:
    """A record's parameters as Optuna's (name -> internal value, name -> distribution),
    or None when they do not fit the space (a value missing or out of range)."""
    values: dict[str, Any] = {}
    dists: dict[str, BaseDistribution] = {}

    def pick(dim: Dimension, name: str) -> Any:
        if dim.path not in params:
            raise _DoesNotFit
        if dim.kind == "choice":
            value = _option_index(dim, params[dim.path])
        else:
            value = params[dim.path]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise _DoesNotFit
            if dim.kind == "int" and value != int(value):
                raise _DoesNotFit
        if value is None or not _contains(dim, value):
            raise _DoesNotFit
        values[name] = int(value) if dim.kind == "int" else value
        dists[name] = _distribution(dim)
        return value

    try:
        _walk(space, pick)
    except _DoesNotFit:
        return None
    return values, dists


def _contains(dim: Dimension, value: Any) -> bool:
    if dim.kind == "choice":
        return 0 <= value < len(dim.options)
    if not dim.low <= value <= dim.high:
        return False
    return dim.kind != "int" or (int(value) - int(dim.low)) % dim.step == 0


def _tpe(
    search: SearchSpec, trials: Sequence[TrialRecord], count: int, first: int
) -> list[dict[str, Any]]:
    # Seeded by the first new trial's number too: with the sweep's seed alone, every call
    # before TPE starts modelling would draw the same random point again.
    study = rebuild_study(search, trials, seed=_derived_seed(search.seed, first))
    proposals = []
    for _ in range(count):
        trial = study.ask()  # left RUNNING, so the next ask of this batch avoids it too
        proposals.append(_walk(search.space, functools.partial(_suggest, trial)))
    return proposals


def rebuild_study(
    spec: Any, trials: Sequence[TrialRecord], seed: int | None = None
) -> optuna.Study:
    """An in-memory Optuna study holding the sweep's trials: finished ones as COMPLETE,
    PRUNED or FAIL, queued and running ones RUNNING; a record whose parameters do not fit
    the space is left out (it would only mislead the model)."""
    search = as_search_spec(spec)
    # create_study logs every (in-memory) study at INFO, and the controller builds one on
    # each call.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(
        n_startup_trials=startup_trials(search.max_trials),
        constant_liar=True,
        seed=search.seed if seed is None else seed,
    )
    study = optuna.create_study(
        direction="maximize" if search.direction == "max" else "minimize", sampler=sampler
    )
    pending: list[tuple[dict[str, Any], dict[str, BaseDistribution]]] = []
    for record in sorted(trials, key=lambda t: t.number):
        fitted = _as_optuna(search.space, record.params)
        if fitted is None:
            continue
        if record.state in _PENDING:
            pending.append(fitted)
        else:
            study.add_trial(_finished(record, *fitted))
    for values, dists in pending:
        # Enqueue, then ask: the trial is RUNNING with these values, as a trial asked and
        # not yet told is (the supported way: add_trial is for evaluated trials); the
        # constant liar keeps new proposals away from it.
        study.enqueue_trial(values)
        study.ask(fixed_distributions=dists)
    return study


def _finished(
    record: TrialRecord, values: dict[str, Any], dists: dict[str, BaseDistribution]
) -> optuna.trial.FrozenTrial:
    intermediate = {
        int(epoch): float(v)
        for epoch, v in record.intermediate.items()
        if v is not None and math.isfinite(float(v))
    }
    value = record.value
    finite = value is not None and math.isfinite(float(value))
    if record.state == "succeeded" and finite:
        state, value = TrialState.COMPLETE, float(value)
    elif record.state == "pruned":
        # TPE ranks pruned trials by how far they got and their last per-epoch value.
        state, value = TrialState.PRUNED, None
    else:
        # failed, cancelled, or succeeded without the metric: recorded, never modelled.
        state, value = TrialState.FAIL, None
    return optuna.trial.create_trial(
        state=state,
        value=value,
        params=values,
        distributions=dists,
        intermediate_values=intermediate,
    )
