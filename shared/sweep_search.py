"""Where a sweep's next trials come from: grid, random and TPE proposals.

`propose(spec, trials, count)` is a pure function of the sweep's spec and its trial rows
(as `TrialRecord`s): the controller may die between two calls, and the next one, given
the same rows, proposes the same points. Nothing is remembered between calls. The space
is shared/sweep_space.py's typed form.

- grid: the combinations in the space's fixed order (shared/sweep_space.expand), skipping
  every point a trial already holds; none when all are used. A cancelled trial's point
  counts as unused, so resuming a cancelled sweep runs it again.
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
only in trials that chose its value. Choices are suggested as option indices, so any
JSON value (a list of layer widths) can be one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
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

from shared.sweep_space import (
    Choice,
    Distribution,
    IntRange,
    LogUniform,
    SweepSpecError,
    Uniform,
    expand,
    grid_problems,
    parse_space,
)

Method = Literal["grid", "random", "tpe"]
Direction = Literal["max", "min"]
TrialStateName = Literal["queued", "running", "succeeded", "failed", "pruned", "cancelled"]
Space = Mapping[str, Distribution]

# A point already proposed to a trial: grid never proposes it again.
_HOLDS_ITS_POINT = frozenset({"queued", "running", "succeeded", "failed", "pruned"})
_PENDING = frozenset({"queued", "running"})


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
class SearchSpec:
    """What a search needs of a sweep spec (shared/sweep_spec.SweepSpec has all of it)."""

    method: Method
    space: Space
    direction: Direction = "max"
    seed: int = 0
    max_trials: int = 20


def next_trial_number(trials: Sequence[TrialRecord]) -> int:
    """The number the first proposal is meant for (0 for a sweep without trials); the
    i-th proposal is for this number + i."""
    return max((t.number for t in trials), default=-1) + 1


def propose(spec: Any, trials: Sequence[TrialRecord], count: int) -> list[dict[str, Any]]:
    """Up to `count` new parameter dicts (dotted path -> value) for the trials numbered
    from `next_trial_number(trials)` on. `spec`: a SweepSpec or a SearchSpec. Grid returns
    fewer when it runs out. Keeping to `max_trials` and `parallelism` is the caller's job:
    this only says which points."""
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


def as_search_spec(spec: Any) -> SearchSpec:
    """A SearchSpec from one, or from anything with method, space, direction, seed and
    max_trials (a SweepSpec); a space not yet typed is parsed (shared/sweep_space)."""
    if isinstance(spec, SearchSpec):
        return spec
    space = spec.space
    if not all(isinstance(d, Uniform | IntRange | Choice) for d in space.values()):
        space = parse_space(space)
    return SearchSpec(
        method=spec.method,
        space=space,
        direction=getattr(spec, "direction", None) or "max",
        seed=int(getattr(spec, "seed", None) or 0),
        max_trials=int(getattr(spec, "max_trials", 20)),
    )


# --- walking a space -----------------------------------------------------------------

# Picks a value for a parameter (path, distribution, Optuna name); for a choice, the
# option's index.
_Pick = Callable[[str, Distribution, str], Any]


def _walk(space: Space, pick: _Pick) -> dict[str, Any]:
    """The point that `pick` chooses, parameter by parameter: a choice first, then the
    sub-space of the option it chose (define-by-run)."""
    names = _optuna_names(space)
    point: dict[str, Any] = {}

    def visit(sub: Space, branch: str) -> None:
        for path, dist in sub.items():
            name = names[(path, branch)]
            if not isinstance(dist, Choice):
                point[path] = pick(path, dist, name)
                continue
            index = pick(path, dist, name)
            option = dist.options[index]
            point[path] = option.value
            visit(option.space, f"{branch}{path}={index};")

    visit(space, "")
    return point


def _optuna_names(space: Space) -> dict[tuple[str, str], str]:
    """(path, branch) -> the parameter's name for Optuna: the dotted path, with its branch
    appended only where the path occurs more than once in the space."""
    found: list[tuple[str, str]] = []

    def visit(sub: Space, branch: str) -> None:
        for path, dist in sub.items():
            found.append((path, branch))
            if isinstance(dist, Choice):
                for index, option in enumerate(dist.options):
                    visit(option.space, f"{branch}{path}={index};")

    visit(space, "")
    counts = Counter(path for path, _ in found)
    return {
        (path, branch): path if counts[path] == 1 else f"{path}[{branch.rstrip(';')}]"
        for path, branch in found
    }


def _key(value: Any) -> str:
    """A value's identity as the job spec sees it, across a JSON round trip: 1 and 1.0
    are one number (a stored 1.0 may come back as 1), true is not 1."""

    def norm(v: Any) -> Any:
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, Mapping):
            return {str(k): norm(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [norm(x) for x in v]
        return v

    return json.dumps(norm(value), sort_keys=True)


def _option_index(choice: Choice, value: Any) -> int | None:
    key = _key(value)
    return next((i for i, o in enumerate(choice.options) if _key(o.value) == key), None)


# --- grid ----------------------------------------------------------------------------


def _grid(search: SearchSpec, trials: Sequence[TrialRecord], count: int) -> list[dict]:
    problems = grid_problems(search.space)
    if problems:
        raise SweepSpecError(problems)
    used = {_key(dict(t.params)) for t in trials if t.state in _HOLDS_ITS_POINT}
    out: list[dict[str, Any]] = []
    # The grid is walked lazily: a sweep far into a large grid skips its used points
    # without building the rest.
    for slots in expand(list(search.space.items()), ints=True):
        point = {path: value for path, _, value in slots}
        if _key(point) not in used:
            out.append(point)
            if len(out) == count:
                break
    return out


# --- random --------------------------------------------------------------------------


def _derived_seed(seed: int, number: int) -> int:
    """A 32-bit seed from (sweep seed, trial number), the same in every process (unlike
    hash(), which Python salts per process)."""
    digest = hashlib.sha256(f"trainyard-sweep:{seed}:{number}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _random_point(search: SearchSpec, number: int) -> dict[str, Any]:
    rng = random.Random(_derived_seed(search.seed, number))
    return _walk(search.space, lambda _path, dist, _name: _sample(rng, dist))


def _sample(rng: random.Random, dist: Distribution) -> Any:
    if isinstance(dist, Choice):
        return rng.randrange(len(dist.options))
    if isinstance(dist, LogUniform):
        drawn = math.exp(rng.uniform(math.log(dist.low), math.log(dist.high)))
        return min(dist.high, max(dist.low, drawn))
    if isinstance(dist, Uniform):
        return rng.uniform(dist.low, dist.high)
    if dist.log:
        # Each integer owns the stretch of log-space around it, as Optuna draws log ints.
        drawn = math.exp(rng.uniform(math.log(dist.low - 0.5), math.log(dist.high + 0.5)))
        return min(dist.high, max(dist.low, round(drawn)))
    return dist.low + dist.step * rng.randint(0, (dist.high - dist.low) // dist.step)


# --- tpe -----------------------------------------------------------------------------


def startup_trials(max_trials: int) -> int:
    """How many finished trials TPE waits for before modelling (random until then).

    Optuna's default of 10 suits studies of hundreds of trials; a sweep is often 10-50,
    where 10 random trials would be most of the budget. A quarter of it leaves TPE the
    rest, and at least 4 gives its "good" group (the best ~10%, at least one trial)
    something to stand out against; never more than Optuna's 10."""
    return max(4, min(10, max_trials // 4))


def _distribution(dist: Distribution) -> BaseDistribution:
    if isinstance(dist, Choice):
        return CategoricalDistribution(list(range(len(dist.options))))
    if isinstance(dist, IntRange):
        return IntDistribution(dist.low, dist.high, log=dist.log, step=dist.step)
    return FloatDistribution(dist.low, dist.high, log=isinstance(dist, LogUniform))


def _suggest(trial: optuna.Trial, _path: str, dist: Distribution, name: str) -> Any:
    if isinstance(dist, Choice):
        return trial.suggest_categorical(name, list(range(len(dist.options))))
    if isinstance(dist, IntRange):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, log=isinstance(dist, LogUniform))


class _DoesNotFit(Exception):
    pass


def _as_optuna(
    space: Space, params: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, BaseDistribution]] | None:
    """A record's parameters as Optuna's (name -> internal value, name -> distribution),
    or None when they do not fit the space (a value missing or out of range)."""
    values: dict[str, Any] = {}
    dists: dict[str, BaseDistribution] = {}

    def pick(path: str, dist: Distribution, name: str) -> Any:
        if path not in params:
            raise _DoesNotFit
        value = params[path]
        if isinstance(dist, Choice):
            value = _option_index(dist, value)
            if value is None:
                raise _DoesNotFit
        elif not _within(dist, value):
            raise _DoesNotFit
        values[name] = int(value) if isinstance(dist, IntRange) else value
        dists[name] = _distribution(dist)
        return value

    try:
        _walk(space, pick)
    except _DoesNotFit:
        return None
    return values, dists


def _within(dist: Uniform | IntRange, value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if not dist.low <= value <= dist.high:
        return False
    if isinstance(dist, IntRange):
        return value == int(value) and (int(value) - dist.low) % dist.step == 0
    return True


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
