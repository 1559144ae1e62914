"""Early stopping for sweeps: whether a running trial should be pruned, judged from
per-epoch metric series alone ({epoch: value}, as the controller reads them from
metric_points).

Two rules, both pure functions of the series (no database, no Optuna, no clock):

- median (Optuna's MedianPruner): at a trial's latest epoch e >= min_epochs, with at
  least `min_trials` other trials having reached e, prune when the trial's best value so
  far is worse than the median of the others' best values so far at e.
- asha (asynchronous successive halving): rungs at min_epochs * reduction_factor**k below
  max_epochs; a trial at a rung goes on only if it ranks in the top
  max(1, n // reduction_factor) of the n trials that have reached that rung so far.

Why not Optuna's pruners themselves: they read a Study (its trial states and stored
rung attributes), so using them would mean a second store that can disagree with the
database; the rules are a few lines over the series the controller already has, and a
test checks the median rule against optuna.pruners.MedianPruner.

Shared robustness rules: a trial "reached" epoch e when it reported some epoch >= e; its
value at e is the one of the last epoch it reported <= e (epochs may be missing); NaN,
infinities and non-numbers count as the worst possible value; a tie never prunes.

Idempotent by construction: a call judges each running trial at one epoch only (median:
its latest epoch; ASHA: the highest rung it has reached) and never at an older one, and
the same series give the same decision. The controller acts on a prune once by writing
sweep_trials.pruned_at_epoch with a compare-and-set (`WHERE pruned_at_epoch IS NULL`)
in the transaction that asks for the job's cooperative cancel, and from then on passes
that trial among `finished`, so a later tick, or a second controller, has nothing to do.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from shared.metric_catalog import finite_number

Direction = Literal["max", "min"]
Series = Mapping[int, Any]

_WORST = -math.inf  # in "goodness" space (higher is better), see _Track


@dataclass(frozen=True)
class MedianRule:
    min_epochs: int
    min_trials: int

    def __post_init__(self) -> None:
        _check_int("min_epochs", self.min_epochs, 1)
        _check_int("min_trials", self.min_trials, 1)


@dataclass(frozen=True)
class AshaRule:
    min_epochs: int
    max_epochs: int
    reduction_factor: int = 3

    def __post_init__(self) -> None:
        _check_int("min_epochs", self.min_epochs, 1)
        _check_int("reduction_factor", self.reduction_factor, 2)
        _check_int("max_epochs", self.max_epochs, self.min_epochs + 1)

    def rungs(self) -> tuple[int, ...]:
        """The epochs a trial is judged at. None at max_epochs itself: a trial that gets
        there has finished, and judging it then could mark a finished trial pruned."""
        rungs, epoch = [], self.min_epochs
        while epoch < self.max_epochs:
            rungs.append(epoch)
            epoch *= self.reduction_factor
        return tuple(rungs)


Rule = MedianRule | AshaRule


@dataclass(frozen=True)
class PruneDecision:
    """`epoch`: the epoch the trial was judged at (None when it was not judged);
    `reason`: why, in words, for the trial row and the job's cancel reason."""

    prune: bool
    epoch: int | None
    reason: str


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"early_stopping.{name} must be an integer >= {low}, got {value!r}")


def _field(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def rule_from(config: Any) -> Rule | None:
    """The rule of a sweep spec's `early_stopping`: None, a rule, a dict such as
    {"rule": "median", "min_epochs": 2, "min_trials": 3}, or an object with those
    attributes (the spec's pydantic model)."""
    if config is None or isinstance(config, MedianRule | AshaRule):
        return config
    if hasattr(config, "model_dump"):
        config = config.model_dump()
    name = _field(config, "rule")
    if name == "median":
        return MedianRule(_field(config, "min_epochs"), _field(config, "min_trials"))
    if name == "asha":
        return AshaRule(
            min_epochs=_field(config, "min_epochs"),
            max_epochs=_field(config, "max_epochs"),
            reduction_factor=_field(config, "reduction_factor", 3),
        )
    raise ValueError(f"early_stopping.rule must be 'median' or 'asha', got {name!r}")


class _Track:
    """One trial's series, sorted by epoch, in goodness (higher is better; anything not
    a finite number is -inf), with the best so far at each point for the median rule."""

    def __init__(self, series: Series, direction: Direction) -> None:
        sign = 1.0 if direction == "max" else -1.0
        points = sorted((int(epoch), value) for epoch, value in series.items())
        self.epochs = [epoch for epoch, _ in points]
        self.goodness = [
            _WORST if (n := finite_number(value)) is None else sign * n for _, value in points
        ]
        self.best: list[float] = []
        for g in self.goodness:
            self.best.append(max(g, self.best[-1]) if self.best else g)

    def _index(self, epoch: int) -> int | None:
        """Index of the last point at or before `epoch`, for a trial that reached it."""
        if not self.epochs or self.epochs[-1] < epoch:
            return None  # has not reached `epoch`
        i = bisect.bisect_right(self.epochs, epoch) - 1
        return i if i >= 0 else None  # reached it, but reported nothing up to it

    def value_at(self, epoch: int) -> float | None:
        i = self._index(epoch)
        return None if i is None else self.goodness[i]

    def best_at(self, epoch: int) -> float | None:
        i = self._index(epoch)
        return None if i is None else self.best[i]


def _shown(goodness: float, direction: Direction) -> str:
    if goodness == _WORST:
        return "not finite"
    return f"{goodness if direction == 'max' else -goodness:.4g}"


def _check_direction(direction: str) -> None:
    if direction not in ("max", "min"):
        raise ValueError(f"direction must be 'max' or 'min', got {direction!r}")


def _median(
    rule: MedianRule, direction: Direction, metric: str, trial: _Track, others: list[_Track]
) -> PruneDecision:
    epoch = trial.epochs[-1]
    if epoch < rule.min_epochs:
        return PruneDecision(False, None, f"epoch {epoch} is before min_epochs {rule.min_epochs}")
    at_epoch = [b for o in others if (b := o.best_at(epoch)) is not None]
    if len(at_epoch) < rule.min_trials:
        return PruneDecision(
            False,
            None,
            f"{len(at_epoch)} other trials reached epoch {epoch}, "
            f"fewer than min_trials {rule.min_trials}",
        )
    own = trial.best[-1]
    median = statistics.median(at_epoch)  # -inf when half or more are not finite
    numbers = (
        f"{metric} {_shown(own, direction)}, "
        f"median of {len(at_epoch)} others {_shown(median, direction)}"
    )
    if own < median:  # strictly worse: a tie never prunes
        return PruneDecision(
            True, epoch, f"pruned by the sweep at epoch {epoch} (median rule: {numbers})"
        )
    return PruneDecision(False, epoch, f"not worse than the median at epoch {epoch} ({numbers})")


def _asha(
    rule: AshaRule, direction: Direction, metric: str, trial: _Track, others: list[_Track]
) -> PruneDecision:
    last = trial.epochs[-1]
    reached = [r for r in rule.rungs() if r <= last]
    if not reached:
        return PruneDecision(
            False, None, f"epoch {last} is before the first rung at epoch {rule.min_epochs}"
        )
    rung = reached[-1]
    own = trial.value_at(rung)
    if own is None:
        return PruneDecision(
            False, None, f"no {metric} reported at or before the rung at epoch {rung}"
        )
    # Everyone that has reached the rung by now, the judged trial included. Without the
    # time each trial got there, "so far" means "by this tick": a trial past the rung is
    # judged against later arrivals too until it reaches the next rung.
    values = [own, *(v for o in others if (v := o.value_at(rung)) is not None)]
    keep = max(1, len(values) // rule.reduction_factor)
    rank = 1 + sum(v > own for v in values)  # tied values share the better rank
    where = f"ASHA rung at epoch {rung}: rank {rank} of {len(values)}, top {keep} go on"
    if rank > keep:
        return PruneDecision(True, rung, f"pruned by the sweep at epoch {rung} ({where})")
    return PruneDecision(False, rung, f"goes on ({where}; {metric} {_shown(own, direction)})")


def should_prune(
    early_stopping: Any,
    direction: Direction,
    series: Series,
    others: Iterable[Series],
    *,
    metric: str = "value",
    finished: bool = False,
) -> PruneDecision:
    """Whether the trial with `series` should stop now, judged against `others` (every
    other trial of the sweep, running or finished, pruned ones included: each is
    evidence of what the space reaches at an epoch). A finished trial is never pruned."""
    _check_direction(direction)
    rule = rule_from(early_stopping)
    if rule is None:
        return PruneDecision(False, None, "no early stopping")
    if finished:
        return PruneDecision(False, None, "the trial has finished")
    return _judge(
        rule, direction, metric, _Track(series, direction), [_Track(o, direction) for o in others]
    )


def _judge(
    rule: Rule, direction: Direction, metric: str, trial: _Track, others: list[_Track]
) -> PruneDecision:
    if not trial.epochs:
        return PruneDecision(False, None, "no epoch reported yet")
    if isinstance(rule, MedianRule):
        return _median(rule, direction, metric, trial, others)
    return _asha(rule, direction, metric, trial, others)


def decisions(
    spec: Any,
    direction: Direction,
    running: Mapping[int, Series],
    finished: Mapping[int, Series],
) -> dict[int, PruneDecision]:
    """One decision per running trial (by trial number) for the controller's tick;
    empty when the sweep has no early stopping. `spec`: the sweep spec (its
    `early_stopping` and `metric`, as attributes or keys). A trial in both maps counts
    as finished; pass a trial already marked pruned among `finished`."""
    _check_direction(direction)
    rule = rule_from(_field(spec, "early_stopping"))
    if rule is None:
        return {}
    metric = _field(spec, "metric") or "value"
    tracks = {n: _Track(s, direction) for n, s in {**running, **finished}.items()}
    return {
        number: _judge(
            rule, direction, metric, tracks[number], [t for n, t in tracks.items() if n != number]
        )
        for number in running
        if number not in finished
    }
