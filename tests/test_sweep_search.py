"""shared/sweep_search.py: grid, random and TPE proposals from a sweep's trial rows."""

from __future__ import annotations

import warnings

import pytest
from optuna.trial import TrialState

from shared.sweep_search import (
    SearchSpec,
    TrialRecord,
    next_trial_number,
    propose,
    rebuild_study,
    startup_trials,
)
from shared.sweep_space import SweepSpecError, parse_space
from shared.sweep_spec import iter_grid, load_sweep_spec, parse_sweep_spec, sweep_to_json

GRID_2X2 = {"optimizer.lr": {"choice": [0.1, 0.01]}, "model.params.layers": {"int": [1, 2]}}

CONDITIONAL = {
    "model.name": {
        "choice": [
            "mlp",
            {"value": "cnn", "space": {"model.params.channels": {"int": [8, 10]}}},
        ]
    },
    "optimizer.lr": {"loguniform": [1e-4, 1e-1]},
}


def spec(method: str, space: dict, **kw) -> SearchSpec:
    return SearchSpec(method=method, space=parse_space(space), **kw)


def rec(number: int, params: dict, state: str = "succeeded", value=None, **kw) -> TrialRecord:
    return TrialRecord(number, params, state, value, **kw)


def line(n: int = 12) -> list[TrialRecord]:
    """Finished trials evenly over x in [0, 1] whose metric grows with x: best near 1."""
    return [rec(i, {"x": i / (n - 1)}, value=i / (n - 1)) for i in range(n)]


X = {"x": {"uniform": [0, 1]}}


# --- grid ----------------------------------------------------------------------------


def test_grid_proposes_in_a_fixed_order_the_first_dimension_slowest():
    points = propose(spec("grid", GRID_2X2), [], 10)
    assert points == [
        {"optimizer.lr": 0.1, "model.params.layers": 1},
        {"optimizer.lr": 0.1, "model.params.layers": 2},
        {"optimizer.lr": 0.01, "model.params.layers": 1},
        {"optimizer.lr": 0.01, "model.params.layers": 2},
    ]
    assert propose(spec("grid", GRID_2X2), [], 3) == points[:3]


def test_grid_never_repeats_a_point_any_trial_holds_and_runs_out():
    s = spec("grid", GRID_2X2)
    first = propose(s, [], 4)
    # A JSON round trip may turn 1 into 1.0: still the same point.
    held = [
        rec(0, {"optimizer.lr": 0.1, "model.params.layers": 1.0}, "failed"),
        rec(1, first[1], "running"),
        rec(2, first[3], "pruned"),
    ]
    assert propose(s, held, 4) == [first[2]]
    done = held + [rec(3, first[2], "queued")]
    assert propose(s, done, 4) == []


def test_grid_offers_a_cancelled_trials_point_again():
    s = spec("grid", GRID_2X2)
    first = propose(s, [], 4)
    trials = [rec(i, p, "succeeded", 0.5) for i, p in enumerate(first)]
    trials[1] = rec(1, first[1], "cancelled")
    assert propose(s, trials, 4) == [first[1]]


def test_grid_refuses_a_continuous_parameter_naming_it():
    with pytest.raises(SweepSpecError) as err:
        propose(spec("grid", {"optimizer.lr": "loguniform(1e-4, 1e-1)"}), [], 1)
    assert list(err.value.fields) == ["space.optimizer.lr"]


def test_grid_crosses_a_sub_space_with_its_value_only():
    assert propose(spec("grid", {"model.name": CONDITIONAL["model.name"]}), [], 10) == [
        {"model.name": "mlp"},
        {"model.name": "cnn", "model.params.channels": 8},
        {"model.name": "cnn", "model.params.channels": 9},
        {"model.name": "cnn", "model.params.channels": 10},
    ]


def sweep(method: str, space: dict, **kw) -> dict:
    return {
        "base": {"kind": "train"},
        "metric": "val_accuracy",
        "method": method,
        "space": space,
        **kw,
    }


def test_a_sweep_spec_is_searched_as_given():
    """The controller passes the SweepSpec (or one loaded back from its row): the grid is
    sweep_spec's own order, random and TPE read its seed and direction."""
    grid = parse_sweep_spec(sweep("grid", {**GRID_2X2, "model.name": CONDITIONAL["model.name"]}))
    assert propose(grid, [], 100) == list(iter_grid(grid))
    stored = load_sweep_spec(sweep_to_json(grid))
    assert propose(stored, [], 100) == list(iter_grid(grid))

    raw = sweep("tpe", {"x": "uniform(0, 1)"}, seed=4, max_trials=20, direction="min")
    tpe = load_sweep_spec(sweep_to_json(parse_sweep_spec(raw)))
    ours = spec("tpe", X, seed=4, max_trials=20, direction="min")
    assert propose(tpe, line(12), 3) == propose(ours, line(12), 3)
    assert all(p["x"] < 0.3 for p in propose(tpe, line(12), 3))


# --- random --------------------------------------------------------------------------


def test_random_is_the_same_for_a_trial_number_and_differs_between_numbers():
    s = spec("random", CONDITIONAL, seed=7)
    batch = propose(s, [], 5)
    # A restarted controller, or one that sees other rows, proposes the same for number 3.
    others = [rec(i, {"whatever": i}, "failed") for i in range(3)]
    assert next_trial_number(others) == 3
    assert propose(s, others, 2) == batch[3:5]
    lrs = [p["optimizer.lr"] for p in batch]
    assert len(set(lrs)) == 5
    assert all(1e-4 <= lr <= 1e-1 for lr in lrs)
    assert propose(spec("random", CONDITIONAL, seed=8), [], 5) != batch


def test_random_draws_ints_on_their_steps_and_log_ints_in_range():
    s = spec(
        "random",
        {"a": {"int": [0, 20], "step": 5}, "b": {"int": [16, 256], "log": True}},
        seed=1,
    )
    points = propose(s, [], 200)
    assert {p["a"] for p in points} == {0, 5, 10, 15, 20}
    assert all(16 <= p["b"] <= 256 and isinstance(p["b"], int) for p in points)
    # Log-uniform: about as many draws below 64 (16..64) as above (64..256).
    assert 60 <= sum(p["b"] < 64 for p in points) <= 140


@pytest.mark.parametrize("method", ["random", "tpe"])
def test_a_sub_space_is_only_suggested_with_its_value(method):
    s = spec(method, CONDITIONAL, seed=3, max_trials=20)
    trials = [
        rec(i, p, value=p["optimizer.lr"] * (2 if p["model.name"] == "cnn" else 1))
        for i, p in enumerate(propose(spec("random", CONDITIONAL, seed=4), [], 12))
    ]
    points = propose(s, trials, 30)
    assert {p["model.name"] for p in points} == {"mlp", "cnn"}
    for p in points:
        if p["model.name"] == "cnn":
            assert set(p) == {"model.name", "model.params.channels", "optimizer.lr"}
            assert 8 <= p["model.params.channels"] <= 10
        else:
            assert set(p) == {"model.name", "optimizer.lr"}


# --- tpe -----------------------------------------------------------------------------


def test_tpe_proposes_from_completed_trials():
    """After the startup trials, TPE's proposals go where the completed trials were best
    (near x = 1); random ones, from the same rows, do not."""
    trials = line(12)
    assert len(trials) >= startup_trials(20)
    tpe = [propose(spec("tpe", X, seed=s, max_trials=20), trials, 1)[0]["x"] for s in range(20)]
    rnd = [propose(spec("random", X, seed=s), trials, 1)[0]["x"] for s in range(20)]
    assert sum(x > 0.75 for x in tpe) >= 17
    assert sum(x > 0.75 for x in rnd) <= 10
    # And with the metric minimized, the other end.
    low = [
        propose(spec("tpe", X, seed=s, max_trials=20, direction="min"), trials, 1)[0]["x"]
        for s in range(20)
    ]
    assert sum(x < 0.25 for x in low) >= 17


def test_tpe_before_startup_is_random_and_does_not_repeat_itself():
    s = spec("tpe", X, seed=5, max_trials=20)
    first = propose(s, [], 1)[0]
    # The next call, with the first proposal running, draws a new point.
    second = propose(s, [rec(0, first, "running")], 1)[0]
    assert first != second


def test_tpe_is_the_same_for_the_same_rows():
    s = spec("tpe", CONDITIONAL, seed=2, max_trials=20)
    trials = [
        rec(i, p, value=float(i)) for i, p in enumerate(propose(spec("random", CONDITIONAL), [], 8))
    ]
    assert propose(s, trials, 3) == propose(s, trials, 3)


def test_tpe_spreads_proposals_away_from_running_trials():
    """Four trials running at the best point so far: the constant liar counts them as
    bad, so a new batch does not pile onto that point as it does without them."""
    trials = line(12)
    running = [rec(12 + i, {"x": 0.98}, "running") for i in range(4)]
    near = 0.05
    piled = spread = 0
    for seed in range(10):
        s = spec("tpe", X, seed=seed, max_trials=20)
        alone = propose(s, trials, 4)
        with_running = propose(s, trials + running, 4)
        piled += sum(abs(p["x"] - 0.98) < near for p in alone)
        spread += sum(abs(p["x"] - 0.98) < near for p in with_running)
        assert not all(abs(p["x"] - 0.98) < near for p in with_running)
    assert piled >= 15 and spread <= piled // 3


def test_tpe_study_holds_each_record_in_its_state():
    s = spec("tpe", X, seed=0, max_trials=20)
    trials = [
        rec(0, {"x": 0.9}, "succeeded", 0.8),
        rec(1, {"x": 0.1}, "pruned", intermediate={"1": 0.1, 2: 0.2}),
        rec(2, {"x": 0.2}, "pruned"),
        rec(3, {"x": 0.3}, "failed"),
        rec(4, {"x": 0.4}, "cancelled"),
        rec(5, {"x": 0.5}, "succeeded", None),  # finished without the metric
        rec(6, {"x": 0.6}, "running"),
        rec(7, {"x": 0.7}, "queued"),
        rec(8, {"x": 7.0}, "succeeded", 0.9),  # outside the space: left out
        rec(9, {"y": 0.5}, "succeeded", 0.9),  # another space: left out
    ]
    study = rebuild_study(s, trials)
    got = [(t.state, t.params["x"], t.value, t.intermediate_values) for t in study.trials]
    assert got == [
        (TrialState.COMPLETE, 0.9, 0.8, {}),
        (TrialState.PRUNED, 0.1, None, {1: 0.1, 2: 0.2}),
        (TrialState.PRUNED, 0.2, None, {}),
        (TrialState.FAIL, 0.3, None, {}),
        (TrialState.FAIL, 0.4, None, {}),
        (TrialState.FAIL, 0.5, None, {}),
        (TrialState.RUNNING, 0.6, None, {}),
        (TrialState.RUNNING, 0.7, None, {}),
    ]
    assert study.best_value == 0.8


def test_tpe_with_pruned_and_failed_records_proposes_inside_the_space():
    trials = line(8) + [
        rec(8 + i, {"x": 0.05 * i}, "pruned", intermediate={1: 0.0}) for i in range(4)
    ]
    trials += [rec(12 + i, {"x": 0.5}, "failed") for i in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        points = propose(spec("tpe", X, seed=1, max_trials=20), trials, 5)
    assert len(points) == 5 and all(0 <= p["x"] <= 1 for p in points)


def test_tpe_takes_one_path_with_different_kinds_in_two_branches():
    space = {
        "model.name": {
            "choice": [
                {"value": "mlp", "space": {"model.params.layers": {"int": [1, 4]}}},
                {"value": "cnn", "space": {"model.params.layers": {"choice": [2, 3]}}},
            ]
        }
    }
    trials = [
        rec(i, p, value=float(p["model.params.layers"]))
        for i, p in enumerate(propose(spec("random", space), [], 10))
    ]
    points = propose(spec("tpe", space, seed=0, max_trials=20), trials, 10)
    for p in points:
        allowed = {1, 2, 3, 4} if p["model.name"] == "mlp" else {2, 3}
        assert p["model.params.layers"] in allowed


def test_startup_trials_fit_small_sweeps():
    assert startup_trials(8) == 4
    assert startup_trials(20) == 5
    assert startup_trials(40) == 10
    assert startup_trials(1000) == 10
