"""shared/sweep_pruning.py: the median rule and ASHA over constructed per-epoch series;
min_epochs, min_trials, both directions, missing epochs, NaN and infinities, ties,
finished trials, the reasons' wording, and (when optuna is installed) agreement with
Optuna's MedianPruner and SuccessiveHalvingPruner on the cases their semantics share."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest

from shared.sweep_pruning import (
    AshaRule,
    MedianRule,
    PruneDecision,
    decisions,
    rule_from,
    should_prune,
)

MEDIAN = {"rule": "median", "min_epochs": 2, "min_trials": 3}


def curve(final: float, epochs: int, start: float = 0.1) -> dict[int, float]:
    """A rising accuracy curve from `start` to `final` over epochs 1..epochs."""
    return {e: start + (final - start) * e / epochs for e in range(1, epochs + 1)}


@dataclass
class Spec:
    metric: str
    early_stopping: object


# ---------------------------------------------------------------- median rule


def test_median_prunes_a_clearly_worse_trial_and_never_the_best() -> None:
    finished = {n: curve(final, 5) for n, final in enumerate([0.7, 0.75, 0.8, 0.85])}
    # Two running trials, 3 of their 5 epochs done: one far worse, one the best.
    running = {10: curve(0.3, 5), 11: curve(0.95, 5)}
    running = {n: {e: v for e, v in s.items() if e <= 3} for n, s in running.items()}
    got = decisions(Spec("val_accuracy", MEDIAN), "max", running, finished)
    assert got[10].prune and got[10].epoch == 3
    assert not got[11].prune and got[11].epoch == 3
    # Median of the 5 others at epoch 3 (4 finished + the best running trial).
    assert got[10].reason == (
        "pruned by the sweep at epoch 3 (median rule: val_accuracy 0.22, median of 5 others 0.52)"
    )
    assert set(got) == {10, 11}  # finished trials are never judged


def test_median_never_prunes_the_best_trial_of_random_sweeps() -> None:
    rng = random.Random(7)
    for _ in range(300):
        direction = rng.choice(["max", "min"])
        series = {
            n: {e: rng.random() for e in range(1, rng.randint(1, 8)) if rng.random() > 0.2}
            for n in range(rng.randint(2, 9))
        }
        got = decisions(Spec("m", MEDIAN), direction, series, {})
        for n, decision in got.items():
            if decision.prune:
                epoch = decision.epoch
                pick = max if direction == "max" else min
                own = pick(v for e, v in series[n].items() if e <= epoch)
                rivals = [
                    pick(v for e, v in s.items() if e <= epoch)
                    for m, s in series.items()
                    if m != n and s and max(s) >= epoch and min(s) <= epoch
                ]
                # Strictly worse than at least half of the others: never the best.
                assert sum(own != r and pick(own, r) == r for r in rivals) * 2 >= len(rivals)
                assert pick([own, *rivals]) != own


def test_median_waits_for_min_epochs() -> None:
    others = [curve(0.9, 5) for _ in range(4)]
    worse = curve(0.2, 5)
    early = should_prune(MEDIAN, "max", {1: worse[1]}, others)
    assert early == PruneDecision(False, None, "epoch 1 is before min_epochs 2")
    assert should_prune(MEDIAN, "max", {1: worse[1], 2: worse[2]}, others).prune


def test_median_waits_for_min_trials_having_reached_the_epoch() -> None:
    worse = curve(0.2, 5)
    # Three others, but only two reached epoch 4: not enough to judge at 4.
    others = [curve(0.9, 5), curve(0.9, 5), curve(0.9, 3)]
    got = should_prune(MEDIAN, "max", dict(list(worse.items())[:4]), others)
    assert not got.prune and got.epoch is None
    assert got.reason == "2 other trials reached epoch 4, fewer than min_trials 3"
    # At epoch 3 all three reached it.
    assert should_prune(MEDIAN, "max", dict(list(worse.items())[:3]), others).prune


def test_median_direction_min_prunes_the_higher_loss() -> None:
    losses = [{1: 1.0, 2: 0.5, 3: 0.3} for _ in range(3)]
    high = {1: 1.2, 2: 0.9, 3: 0.8}
    low = {1: 0.9, 2: 0.4, 3: 0.2}
    got = should_prune(MEDIAN, "min", high, losses, metric="val_loss")
    assert got == PruneDecision(
        True,
        3,
        "pruned by the sweep at epoch 3 (median rule: val_loss 0.8, median of 3 others 0.3)",
    )
    assert not should_prune(MEDIAN, "min", low, losses).prune
    # The same numbers read as scores (max): now the high one is the good one.
    assert not should_prune(MEDIAN, "max", high, losses).prune
    assert should_prune(MEDIAN, "max", low, losses).prune


def test_median_uses_best_so_far_on_both_sides() -> None:
    # The trial peaked at epoch 2 and fell back; its best so far still counts.
    trial = {1: 0.5, 2: 0.8, 3: 0.4}
    others = [{1: 0.5, 2: 0.7, 3: 0.75}] * 3
    assert not should_prune(MEDIAN, "max", trial, others).prune
    # Others' best so far at epoch 3 is their epoch-2 peak 0.9.
    others = [{1: 0.5, 2: 0.9, 3: 0.6}] * 3
    assert should_prune(MEDIAN, "max", trial, others).prune


def test_median_tie_never_prunes() -> None:
    others = [{1: 0.5, 2: 0.6}, {1: 0.5, 2: 0.7}, {1: 0.5, 2: 0.8}]
    tie = should_prune(MEDIAN, "max", {1: 0.1, 2: 0.7}, others)
    assert not tie.prune and tie.epoch == 2
    assert should_prune(MEDIAN, "max", {1: 0.1, 2: 0.6999}, others).prune
    # Everyone equal, including all not finite.
    nan = [{1: math.nan, 2: math.nan}] * 3
    assert not should_prune(MEDIAN, "max", {1: math.nan, 2: math.inf}, nan).prune


def test_median_missing_epochs_use_the_last_reported_one() -> None:
    # The others skipped epoch 3 (and one epoch 2); they reached 3 by reporting 4.
    others = [{1: 0.6, 4: 0.9}, {1: 0.6, 2: 0.65, 4: 0.9}, {2: 0.7, 5: 0.9}]
    got = should_prune(MEDIAN, "max", {1: 0.5, 3: 0.62}, others)
    assert got.prune and got.epoch == 3
    assert "median of 3 others 0.65" in got.reason
    # A trial that reached the epoch but reported nothing up to it is left out.
    got = should_prune(MEDIAN, "max", {1: 0.5, 2: 0.5}, [*others, {5: 0.1}])
    assert "median of 3 others" in got.reason


def test_median_not_finite_values_are_the_worst() -> None:
    others = [{1: 0.5, 2: 0.6}, {1: 0.5, 2: 0.7}, {1: 0.5, 2: 0.8}]
    # A trial that never reported a finite value is pruned.
    got = should_prune(MEDIAN, "max", {1: math.nan, 2: math.nan}, others, metric="val_accuracy")
    assert got.prune
    assert got.reason.endswith("(median rule: val_accuracy not finite, median of 3 others 0.7)")
    for bad in (math.inf, -math.inf, None, "0.9", True):
        assert should_prune(MEDIAN, "max", {1: bad, 2: bad}, others).prune
        assert should_prune(MEDIAN, "min", {1: bad, 2: bad}, others).prune
    # A diverged last epoch keeps the earlier best (Optuna's nanmax).
    assert not should_prune(MEDIAN, "max", {1: 0.75, 2: math.nan}, others).prune
    # Diverged others are the worst: they pull the median down, never up.
    diverged = [{1: math.nan, 2: math.nan}, {1: math.nan, 2: -math.inf}, {1: 0.5, 2: 0.8}]
    assert not should_prune(MEDIAN, "max", {1: 0.1, 2: 0.2}, diverged).prune
    assert not should_prune(MEDIAN, "min", {1: 10.0, 2: 20.0}, diverged).prune


def test_a_finished_trial_is_never_pruned() -> None:
    others = [curve(0.9, 5)] * 4
    assert should_prune(MEDIAN, "max", curve(0.1, 5), others).prune
    done = should_prune(MEDIAN, "max", curve(0.1, 5), others, finished=True)
    assert done == PruneDecision(False, None, "the trial has finished")
    # In both maps (finished between the controller's reads): finished wins.
    running = {1: curve(0.1, 5)}
    finished = {1: curve(0.1, 5), **{n: curve(0.9, 5) for n in range(2, 6)}}
    assert decisions(Spec("m", MEDIAN), "max", running, finished) == {}


def test_decisions_are_idempotent_and_judge_only_the_latest_epoch() -> None:
    spec = {"metric": "val_accuracy", "early_stopping": MEDIAN}
    finished = {n: curve(0.9, 6) for n in range(4)}
    # Worse than the median at epoch 2, better by epoch 4: judged at 4 only.
    running = {9: {1: 0.1, 2: 0.2, 3: 0.8, 4: 0.95}}
    first = decisions(spec, "max", running, finished)
    assert first == decisions(spec, "max", running, finished)
    assert first[9] == PruneDecision(
        False,
        4,
        "not worse than the median at epoch 4 (val_accuracy 0.95, median of 4 others 0.6333)",
    )
    assert decisions({"metric": "m", "early_stopping": None}, "max", running, finished) == {}
    assert should_prune(None, "max", {1: 0.1}, []) == PruneDecision(
        False, None, "no early stopping"
    )
    assert should_prune(MEDIAN, "max", {}, []) == PruneDecision(
        False, None, "no epoch reported yet"
    )


# ---------------------------------------------------------------- ASHA


ASHA = {"rule": "asha", "min_epochs": 1, "reduction_factor": 3, "max_epochs": 27}


def test_asha_rungs() -> None:
    assert AshaRule(1, 27, 3).rungs() == (1, 3, 9)
    assert AshaRule(2, 20, 2).rungs() == (2, 4, 8, 16)
    assert AshaRule(3, 4, 3).rungs() == (3,)


def test_asha_promotes_the_top_third_and_stops_the_rest_at_each_rung() -> None:
    spec = Spec("val_accuracy", ASHA)
    finals = [0.1, 0.9, 0.3, 0.7, 0.5, 0.2, 0.8, 0.4, 0.6]
    # Rung 1: all nine reached it; the top 3 (0.9, 0.8, 0.7) go on.
    running = {n: {1: f} for n, f in enumerate(finals)}
    got = decisions(spec, "max", running, {})
    assert sorted(n for n, d in got.items() if not d.prune) == [1, 3, 6]
    assert all(d.epoch == 1 for d in got.values())
    assert (
        got[0].reason
        == "pruned by the sweep at epoch 1 (ASHA rung at epoch 1: rank 9 of 9, top 3 go on)"
    )
    assert (
        got[1].reason
        == "goes on (ASHA rung at epoch 1: rank 1 of 9, top 3 go on; val_accuracy 0.9)"
    )
    # The pruned six finished at epoch 1; the three reach rung 3 (epoch 3): top 1 goes on.
    finished = {n: s for n, s in running.items() if got[n].prune}
    running = {n: {1: finals[n], 2: finals[n], 3: finals[n]} for n in (1, 3, 6)}
    got = decisions(spec, "max", running, finished)
    assert {n: d.prune for n, d in got.items()} == {1: False, 3: True, 6: True}
    assert (
        got[3].reason
        == "pruned by the sweep at epoch 3 (ASHA rung at epoch 3: rank 3 of 3, top 1 go on)"
    )
    # Between rungs the trial is still judged at its latest rung; max_epochs is no rung.
    running = {1: {e: 0.9 for e in range(1, 28)}}
    finished.update({3: {1: 0.7, 3: 0.7}, 6: {1: 0.8, 3: 0.8}})
    assert decisions(spec, "max", running, finished)[1].epoch == 9


def test_asha_is_asynchronous_a_trial_is_judged_against_those_that_reached_the_rung() -> None:
    rule = AshaRule(min_epochs=2, max_epochs=20, reduction_factor=2)
    # The first to reach a rung goes on whatever its value (top max(1, 1 // 2) = 1).
    assert not should_prune(rule, "max", {1: 0.1, 2: 0.1}, []).prune
    # Not judged before the first rung, nor judged by trials that have not reached it.
    before = should_prune(rule, "max", {1: 0.1}, [{1: 0.9, 2: 0.9}])
    assert before == PruneDecision(False, None, "epoch 1 is before the first rung at epoch 2")
    assert not should_prune(rule, "max", {1: 0.1, 2: 0.1}, [{1: 0.9}]).prune
    # Two at the rung: top 1 goes on; the worse one stops.
    assert should_prune(rule, "max", {1: 0.1, 2: 0.1}, [{1: 0.9, 2: 0.9}]).prune
    # Not more than the top are promoted: of 5 at a rung, 2 go on.
    values = [0.5, 0.4, 0.3, 0.2, 0.1]
    kept = [
        not should_prune(rule, "max", {2: v}, [{2: w} for w in values if w != v]).prune
        for v in values
    ]
    assert kept == [True, True, False, False, False]


def test_asha_direction_min_and_missing_epochs() -> None:
    rule = {"rule": "asha", "min_epochs": 2, "max_epochs": 10}  # reduction_factor 3
    others = [{1: 0.9, 3: 0.5}, {1: 0.9, 2: 0.6, 5: 0.4}]  # values at epoch 2: 0.9, 0.6
    got = should_prune(rule, "min", {1: 1.0, 2: 0.7}, others, metric="val_loss")
    assert got.prune and got.epoch == 2
    assert (
        got.reason
        == "pruned by the sweep at epoch 2 (ASHA rung at epoch 2: rank 2 of 3, top 1 go on)"
    )
    assert not should_prune(rule, "min", {1: 1.0, 2: 0.55}, others).prune
    # Reached the rung (reported epoch 4) without a value up to it: not judged.
    got = should_prune(rule, "min", {4: 0.1}, others)
    assert got == PruneDecision(False, None, "no value reported at or before the rung at epoch 2")


def test_asha_not_finite_values_rank_last_and_ties_go_on() -> None:
    rule = AshaRule(min_epochs=1, max_epochs=9, reduction_factor=3)
    finite = [{1: 0.2}, {1: 0.3}]
    for bad in (math.nan, math.inf, -math.inf):
        for direction in ("max", "min"):
            got = should_prune(rule, direction, {1: bad}, finite)
            assert got.prune and "rank 3 of 3" in got.reason
    # A tie at the cut-off goes on: 3 tied for the one place all go on.
    tied = [{1: 0.5}, {1: 0.5}]
    got = should_prune(rule, "max", {1: 0.5}, tied)
    assert not got.prune and "rank 1 of 3, top 1" in got.reason
    assert not should_prune(rule, "max", {1: math.nan}, [{1: math.nan}] * 5).prune


# ---------------------------------------------------------------- rules


def test_rule_from_reads_dicts_objects_and_refuses_nonsense() -> None:
    assert rule_from(None) is None
    assert rule_from(MEDIAN) == MedianRule(min_epochs=2, min_trials=3)
    assert rule_from(ASHA) == AshaRule(min_epochs=1, max_epochs=27, reduction_factor=3)

    class Model:  # the spec's pydantic model, as far as rule_from cares
        def model_dump(self) -> dict:
            return {"rule": "asha", "min_epochs": 2, "reduction_factor": 2, "max_epochs": 8}

    assert rule_from(Model()) == AshaRule(2, 8, 2)
    for bad in (
        {"rule": "hyperband"},
        {"rule": "median", "min_epochs": 0, "min_trials": 1},
        {"rule": "median", "min_epochs": 1, "min_trials": True},
        {"rule": "asha", "min_epochs": 1, "reduction_factor": 1, "max_epochs": 9},
        {"rule": "asha", "min_epochs": 3, "max_epochs": 3},
    ):
        with pytest.raises(ValueError):
            rule_from(bad)
    with pytest.raises(ValueError):
        should_prune(MEDIAN, "maximize", {1: 0.1}, [])  # type: ignore[arg-type]


# ---------------------------------------------------------------- against Optuna


def _optuna():
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def test_median_rule_agrees_with_optunas_median_pruner() -> None:
    """Where the semantics meet (the others finished, reported every epoch and only
    improved, so their value at an epoch is their best so far), the decisions match."""
    optuna = _optuna()
    rng = random.Random(3)
    for case in range(60):
        direction = rng.choice(["max", "min"])
        sign = 1 if direction == "max" else -1
        min_epochs, min_trials, epochs = rng.randint(1, 3), rng.randint(1, 4), 6
        others = []
        for _ in range(rng.randint(1, 6)):
            values = sorted(rng.random() for _ in range(epochs))
            others.append(dict(zip(range(1, epochs + 1), values[::sign], strict=True)))
        trial = {e: rng.random() for e in range(1, rng.randint(1, epochs) + 1)}

        study = optuna.create_study(
            direction="maximize" if direction == "max" else "minimize",
            pruner=optuna.pruners.MedianPruner(
                n_startup_trials=min_trials, n_warmup_steps=min_epochs, n_min_trials=min_trials
            ),
        )
        for series in others:
            study.add_trial(
                optuna.trial.create_trial(value=series[epochs], intermediate_values=series)
            )
        asked = study.ask()
        for epoch, value in trial.items():
            asked.report(value, epoch)
        rule = {"rule": "median", "min_epochs": min_epochs, "min_trials": min_trials}
        ours = should_prune(rule, direction, trial, others)
        assert ours.prune == asked.should_prune(), (case, ours)


def test_asha_agrees_with_optunas_successive_halving_when_trials_run_one_by_one() -> None:
    """Run one after another, "reached the rung so far" is the trials before: Optuna's
    SuccessiveHalvingPruner, asked after every epoch, stops the same trials at the same
    rungs."""
    optuna = _optuna()
    rng = random.Random(5)
    for direction in ("max", "min"):
        rule = AshaRule(min_epochs=1, max_epochs=6, reduction_factor=2)  # rungs 1, 2, 4
        study = optuna.create_study(
            direction="maximize" if direction == "max" else "minimize",
            pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2),
        )
        done: list[dict[int, float]] = []
        for _ in range(25):
            values = [rng.random() for _ in range(rule.max_epochs)]
            asked = study.ask()
            series: dict[int, float] = {}
            for epoch, value in enumerate(values, start=1):
                series[epoch] = value
                asked.report(value, epoch)
                theirs = asked.should_prune()
                ours = should_prune(rule, direction, series, done)
                assert ours.prune == theirs, (direction, epoch, ours)
                if theirs:
                    assert ours.epoch == epoch
                    study.tell(asked, state=optuna.trial.TrialState.PRUNED)
                    break
            else:
                study.tell(asked, values[-1])
            done.append(series)
