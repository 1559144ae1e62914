"""The sweep spec (shared/sweep_spec.py): its grammar, its bounds, the points a sweep
runs or is checked on, and every invalid point refused naming the parameter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shared.dataset_catalog import CatalogContext
from shared.sweep_spec import (
    INT_VALUES_CHECKED,
    Choice,
    IntRange,
    LogUniform,
    SweepSpec,
    SweepSpecError,
    Uniform,
    apply,
    grid_points,
    grid_size,
    iter_grid,
    load_sweep_spec,
    parse_space,
    parse_sweep_spec,
    points_to_check,
    sweep_to_json,
    validate,
)
from tests.helpers import train_spec

CTX = CatalogContext(data_dir=Path("/nonexistent-data"))
MLP = train_spec(model={"name": "mlp"})


def sweep(space: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "s",
        "base": MLP,
        "space": space,
        "method": "random",
        "metric": "val_accuracy",
        "max_trials": 8,
    }
    data.update(overrides)
    return data


def spec_of(space: dict[str, Any], **overrides: Any) -> SweepSpec:
    return parse_sweep_spec(sweep(space, **overrides))


def errors_of(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(SweepSpecError) as info:
        parse_sweep_spec(data)
    return info.value.fields


def invalid_points(data: dict[str, Any], ctx: CatalogContext = CTX, **kw: Any) -> dict[str, str]:
    with pytest.raises(SweepSpecError) as info:
        validate(parse_sweep_spec(data), ctx, **kw)
    return info.value.fields


# ---------------------------------------------------------------- the grammar


@pytest.mark.parametrize(
    ("text", "obj", "expected"),
    [
        ("uniform(0, 0.5)", {"uniform": [0, 0.5]}, Uniform(low=0, high=0.5)),
        ("loguniform(1e-4, 1e-1)", {"loguniform": [1e-4, 0.1]}, LogUniform(low=1e-4, high=0.1)),
        ("int(1, 4)", {"int": [1, 4]}, IntRange(low=1, high=4)),
        (
            "int(16, 256, log)",
            {"int": [16, 256], "log": True},
            IntRange(low=16, high=256, log=True),
        ),
        ("int(0, 100, step=10)", {"int": [0, 100], "step": 10}, IntRange(low=0, high=100, step=10)),
    ],
)
def test_the_string_and_object_forms_parse_to_one_distribution(
    text: str, obj: dict[str, Any], expected: Any
) -> None:
    by_text, by_obj = parse_space({"p": text})["p"], parse_space({"p": obj})["p"]
    assert by_text == by_obj == expected
    assert type(by_text) is type(expected)


def test_choices_parse_words_numbers_quotes_and_constants_alike() -> None:
    text = parse_space({"p": "choice([relu, 0.01, 3, 'a b', true, null])"})["p"]
    obj = parse_space({"p": {"choice": ["relu", 0.01, 3, "a b", True, None]}})["p"]
    assert isinstance(text, Choice) and text == obj
    assert text.values == ["relu", 0.01, 3, "a b", True, None]
    assert (
        parse_space({"p": "choice(relu, gelu)"})["p"]
        == parse_space({"p": "choice([relu, gelu])"})["p"]
    )


def test_a_stored_sweep_round_trips_through_its_canonical_json() -> None:
    spec = spec_of(
        {
            "optimizer.lr": "loguniform(1e-4, 1e-1)",
            "model.params.layers": "int(1, 4)",
            "model.name": {
                "choice": [
                    "mlp",
                    {"value": "cnn", "space": {"model.params.channels": "int(8, 64, log)"}},
                ]
            },
        },
        early_stopping={"rule": "asha", "max_epochs": 9},
    )
    stored = sweep_to_json(spec)
    assert stored["space"]["optimizer.lr"] == {"loguniform": [1e-4, 0.1]}
    assert stored["space"]["model.name"] == {
        "choice": [
            "mlp",
            {"value": "cnn", "space": {"model.params.channels": {"int": [8, 64], "log": True}}},
        ]
    }
    assert stored["early_stopping"] == {
        "rule": "asha",
        "min_epochs": 1,
        "reduction_factor": 3,
        "max_epochs": 9,
    }
    assert load_sweep_spec(stored) == spec


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("uniform(0.5, 0.1)", "uniform(0.5, 0.1): low must be less than high"),
        ({"uniform": [1, 1]}, "low must be less than high"),
        ("loguniform(0, 0.1)", "low must be above 0"),
        ("loguniform(-1, 1)", "low must be above 0"),
        ("int(1.5, 4)", "int's bounds must be whole numbers; got 1.5"),
        ({"int": [1, 4.0]}, "whole numbers"),
        ("int(4, 1)", "low must be less than high"),
        ("int(0, 8, log)", "low must be at least 1 on a log scale"),
        ("int(0, 10, step=3)", "multiple of the step"),
        ({"int": [1, 9], "step": 0}, "step must be a whole number of at least 1"),
        ({"int": [1, 9], "log": True, "step": 2}, "a log scale takes no step"),
        ("choice([])", "non-empty"),
        ({"choice": []}, "non-empty"),
        ("choice([relu, gelu, relu])", "choice lists relu twice"),
        ({"choice": [1, 1.0]}, "choice lists 1 twice"),
        ({"choice": [[1, 2]]}, "choice values must be strings, numbers"),
        ({"uniform": [True, 2]}, "bounds must be numbers"),
        ({"uniform": [0, float("inf")]}, "finite"),
        ("uniform(0)", "takes two numbers"),
        ("normal(0, 1)", "unknown distribution 'normal'"),
        ("int(1, 4, logg)", "int takes `log` or `step=N`"),
        ({"uniform": [0, 1], "log": True}, "uniform does not take 'log'"),
        ({"uniform": [0, 1], "int": [0, 1]}, "exactly one distribution"),
        (0.5, "must be a distribution"),
        (["relu", "gelu"], "must be a distribution"),
        ("lots", "is not a distribution"),
    ],
)
def test_every_bound_error_names_the_parameter(raw: Any, message: str) -> None:
    fields = errors_of(sweep({"optimizer.lr": raw}))
    assert list(fields) == ["space.optimizer.lr"]
    assert message in fields["space.optimizer.lr"]


def test_every_bad_parameter_is_named_at_once() -> None:
    fields = errors_of(
        sweep({"optimizer.lr": "uniform(1, 0)", "epochs": "int(0.5, 3)", "seed": "x"})
    )
    assert set(fields) == {"space.optimizer.lr", "space.epochs", "space.seed"}


@pytest.mark.parametrize(
    ("space", "field", "message"),
    [
        ({"model params": "int(1, 2)"}, "space.model params", "dotted path of field names"),
        ({"model..layers": "int(1, 2)"}, "space.model..layers", "dotted path"),
        ({"1st": "int(1, 2)"}, "space.1st", "dotted path"),
        ({"kind": "choice([train, script])"}, "space.kind", "cannot be searched"),
        (
            {"model.params": "choice([a])", "model.params.layers": "int(1, 2)"},
            "space.model.params.layers",
            "overlaps model.params",
        ),
        (
            {
                "model.params.layers": "int(1, 3)",
                "model.name": {
                    "choice": [{"value": "mlp", "space": {"model.params.layers": "int(1, 2)"}}]
                },
            },
            "space.model.params.layers",
            "already in the space",
        ),
        ({}, "space", "at least one parameter"),
    ],
)
def test_paths_are_dotted_fields_set_once(space: dict[str, Any], field: str, message: str) -> None:
    fields = errors_of(sweep(space))
    assert message in fields[field], fields


def test_a_conditional_option_is_value_and_space_only() -> None:
    fields = errors_of(sweep({"model.name": {"choice": [{"value": "cnn", "params": {}}]}}))
    assert "unknown key 'params'" in fields["space.model.name"]
    nested = errors_of(
        sweep(
            {
                "model.name": {
                    "choice": [{"value": "cnn", "space": {"model.params.blocks": "int(3, 1)"}}]
                }
            }
        )
    )
    assert "low must be less than high" in nested["space.model.params.blocks"]


# ---------------------------------------------------------------- the rest of the spec


def test_direction_comes_from_the_metric_catalogue() -> None:
    assert spec_of({"epochs": "int(1, 3)"}, metric="val_accuracy").direction == "max"
    assert spec_of({"epochs": "int(1, 3)"}, metric="val_loss").direction == "min"
    assert spec_of({"epochs": "int(1, 3)"}, metric="val_loss", direction="max").direction == "max"


def test_a_metric_of_unknown_direction_needs_one() -> None:
    script = {"kind": "script", "bundle_id": 1, "entry": "train.py"}
    fields = errors_of(sweep({"params.lr": "uniform(0, 1)"}, base=script, metric="reward"))
    assert fields == {
        "direction": "metric reward has no known better direction; set direction: max or min"
    }
    ok = parse_sweep_spec(
        sweep({"params.lr": "uniform(0, 1)"}, base=script, metric="reward", direction="max")
    )
    assert ok.direction == "max"


def test_max_trials_is_needed_except_by_a_grid_and_capped() -> None:
    data = sweep({"epochs": "int(1, 3)"})
    del data["max_trials"]
    assert "need a number of trials" in errors_of(data)["max_trials"]
    assert parse_sweep_spec({**data, "method": "grid"}).max_trials == 3
    assert parse_sweep_spec({**data, "method": "grid", "max_trials": 10}).max_trials == 3
    too_many = sweep({"epochs": "int(1, 3)"}, max_trials=1001)
    assert errors_of(too_many) == {"max_trials": "at most 1000 (TRAINYARD_SWEEP_MAX_TRIALS)"}
    with pytest.raises(SweepSpecError) as info:
        parse_sweep_spec(sweep({"epochs": "int(1, 3)"}, max_trials=11), max_trials_cap=10)
    assert info.value.fields == {"max_trials": "at most 10 (TRAINYARD_SWEEP_MAX_TRIALS)"}
    big_grid = {**data, "method": "grid", "space": {"batch_size": "int(1, 2000)"}}
    assert "the grid has 2000 points, more than the 1000 trials" in errors_of(big_grid)["space"]


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        (
            sweep({"epochs": "int(1, 3)"}, base={"kind": "evaluate", "source_job_id": 1}),
            "base.kind",
            "train or script",
        ),
        (sweep({"epochs": "int(1, 3)"}, base={"epochs": 3}), "base.kind", "field required"),
        (sweep({"epochs": "int(1, 3)"}, method="bayes"), "method", "'grid', 'random' or 'tpe'"),
        (
            sweep({"epochs": "int(1, 3)"}, parallelism=0),
            "parallelism",
            "greater than or equal to 1",
        ),
        (
            sweep({"epochs": "int(1, 3)"}, time_budget_s=0),
            "time_budget_s",
            "greater than or equal to 1",
        ),
        (
            sweep({"epochs": "int(1, 3)"}, early_stopping={"rule": "hyperband"}),
            "early_stopping.rule",
            "median, asha",
        ),
        (
            sweep({"epochs": "int(1, 3)"}, early_stopping={"min_epochs": 2}),
            "early_stopping.rule",
            "field required: median or asha",
        ),
        (
            sweep({"epochs": "int(1, 3)"}, early_stopping={"rule": "median", "min_epochs": 0}),
            "early_stopping.min_epochs",
            "greater than or equal to 1",
        ),
        (
            sweep(
                {"epochs": "int(1, 3)"},
                early_stopping={"rule": "asha", "min_epochs": 4, "max_epochs": 4},
            ),
            "early_stopping.max_epochs",
            "more than min_epochs (4)",
        ),
        (
            sweep({"epochs": "int(1, 3)"}, early_stopping={"rule": "asha"}),
            "early_stopping.max_epochs",
            "field required",
        ),
        (sweep({"epochs": "int(1, 3)"}, colour="red"), "colour", "unknown field"),
        (sweep({"epochs": "int(1, 3)"}, name="lr\u200b"), "name", "invisible formatting character"),
    ],
)
def test_the_sweep_fields_are_checked(data: dict[str, Any], field: str, message: str) -> None:
    fields = errors_of(data)
    assert message in fields[field], fields


def test_early_stopping_rules_have_defaults() -> None:
    median = spec_of({"epochs": "int(1, 3)"}, early_stopping={"rule": "median"}).early_stopping
    assert median is not None and median.model_dump() == {
        "rule": "median",
        "min_epochs": 1,
        "min_trials": 3,
    }
    asha = spec_of(
        {"epochs": "int(1, 3)"}, early_stopping={"rule": "asha", "max_epochs": 27}
    ).early_stopping
    assert asha is not None and asha.model_dump() == {
        "rule": "asha",
        "min_epochs": 1,
        "reduction_factor": 3,
        "max_epochs": 27,
    }


# ---------------------------------------------------------------- grids


def test_a_2x2_grid_has_4_points_in_a_fixed_order() -> None:
    spec = spec_of(
        {
            "optimizer.lr": "choice([0.001, 0.01])",
            "model.params.activation": "choice([relu, gelu])",
        },
        method="grid",
        max_trials=None,
    )
    assert spec.max_trials == grid_size(spec) == 4
    assert grid_points(spec) == [
        {"optimizer.lr": 0.001, "model.params.activation": "relu"},
        {"optimizer.lr": 0.001, "model.params.activation": "gelu"},
        {"optimizer.lr": 0.01, "model.params.activation": "relu"},
        {"optimizer.lr": 0.01, "model.params.activation": "gelu"},
    ]
    assert grid_points(spec) == list(iter_grid(spec))  # deterministic


def test_a_grid_counts_ints_by_their_step() -> None:
    spec = spec_of(
        {"epochs": "int(2, 8, step=3)", "model.params.layers": "int(1, 2)"}, method="grid"
    )
    assert [(p["epochs"], p["model.params.layers"]) for p in grid_points(spec)] == [
        (2, 1), (2, 2), (5, 1), (5, 2), (8, 1), (8, 2),
    ]  # fmt: skip


def test_a_grid_opens_a_sub_space_only_with_its_value() -> None:
    spec = spec_of(
        {
            "model.name": {
                "choice": [
                    {"value": "mlp", "space": {"model.params.layers": "int(1, 2)"}},
                    {"value": "cnn", "space": {"model.params.blocks": "choice([1, 2, 3])"}},
                    "resnet",
                ]
            },
            "optimizer.lr": "choice([0.001, 0.01])",
        },
        method="grid",
    )
    points = grid_points(spec)
    assert grid_size(spec) == len(points) == (2 + 3 + 1) * 2
    assert points[0] == {"model.name": "mlp", "model.params.layers": 1, "optimizer.lr": 0.001}
    for point in points:
        assert ("model.params.layers" in point) == (point["model.name"] == "mlp")
        assert ("model.params.blocks" in point) == (point["model.name"] == "cnn")
    assert {"model.name": "resnet", "optimizer.lr": 0.01} in points


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            "uniform(0, 1)",
            "a grid needs a finite list of values; uniform(0, 1) has infinitely many",
        ),
        ("loguniform(1e-4, 1e-1)", "has infinitely many"),
        ("int(16, 256, log)", "a grid has no log scale"),
    ],
)
def test_a_grid_refuses_continuous_parameters_naming_them(raw: str, message: str) -> None:
    fields = errors_of(sweep({"epochs": "int(1, 2)", "optimizer.lr": raw}, method="grid"))
    assert list(fields) == ["space.optimizer.lr"] and message in fields["space.optimizer.lr"]


def test_a_grid_inside_a_sub_space_is_checked_too() -> None:
    space = {
        "model.name": {
            "choice": [{"value": "mlp", "space": {"model.params.dropout": "uniform(0, 0.5)"}}]
        }
    }
    assert "infinitely many" in errors_of(sweep(space, method="grid"))["space.model.params.dropout"]


# ---------------------------------------------------------------- points to check


def test_random_checks_every_choice_with_every_numeric_end() -> None:
    spec = spec_of(
        {
            "optimizer.lr": "loguniform(1e-4, 1e-1)",
            "model.params.activation": "choice([relu, gelu])",
            "model.params.dropout": "uniform(0, 0.5)",
        }
    )
    points = points_to_check(spec)
    corners = {
        (p["optimizer.lr"], p["model.params.activation"], p["model.params.dropout"])
        for p in points
        if p["optimizer.lr"] in (1e-4, 0.1) and p["model.params.dropout"] in (0, 0.5)
    }
    assert len(corners) == 2 * 2 * 2
    # Plus each float's middle, the others at all their lows and all their highs.
    assert len(points) == 2 * (4 + 2 * 2)
    assert len({tuple(p.values()) for p in points}) == len(points)
    middles = {p["model.params.dropout"] for p in points} - {0, 0.5}
    assert middles == {0.25}


def test_small_int_ranges_are_checked_at_every_value_wide_ones_at_ends_and_middle() -> None:
    small = spec_of({"model.params.layers": "int(1, 4)"})
    assert sorted(p["model.params.layers"] for p in points_to_check(small)) == [1, 2, 3, 4]
    wide = spec_of({"model.params.hidden": f"int(1, {INT_VALUES_CHECKED + 10})"})
    assert sorted(p["model.params.hidden"] for p in points_to_check(wide)) == [
        1, (INT_VALUES_CHECKED + 11) // 2 + 1, INT_VALUES_CHECKED + 10,
    ]  # fmt: skip


def test_sub_space_points_come_only_with_their_value() -> None:
    spec = spec_of(
        {
            "model.name": {
                "choice": [
                    "mlp",
                    {"value": "cnn", "space": {"model.params.channels": "int(8, 64, log)"}},
                ]
            },
            "optimizer.lr": "uniform(0.001, 0.1)",
        }
    )
    points = points_to_check(spec)
    assert all(("model.params.channels" in p) == (p["model.name"] == "cnn") for p in points)
    assert {p["model.params.channels"] for p in points if "model.params.channels" in p} == set(
        range(8, 65)
    )


def test_a_grid_checks_the_points_it_will_run() -> None:
    spec = spec_of({"epochs": "int(1, 5)", "seed": "int(0, 1)"}, method="grid", max_trials=3)
    assert points_to_check(spec) == grid_points(spec)[:3]


def test_too_many_points_to_check_are_refused_naming_the_space() -> None:
    spec = spec_of({f"params.p{i}": "uniform(0, 1)" for i in range(6)}, base={"kind": "script", "bundle_id": 1, "entry": "t.py"}, metric="loss")  # fmt: skip
    assert len(points_to_check(spec)) == 2**6 + 6 * 2
    with pytest.raises(SweepSpecError) as info:
        points_to_check(spec, limit=50)
    assert list(info.value.fields) == ["space"]
    assert "more than 50 points to check" in info.value.fields["space"]
    with pytest.raises(SweepSpecError) as info:
        validate(spec, CTX, max_points=50)
    assert "TRAINYARD_SWEEP_MAX_POINTS_CHECKED" in info.value.fields["space"]
    grid = spec_of({"epochs": "int(1, 10)", "seed": "int(0, 9)"}, method="grid", max_trials=None)
    with pytest.raises(SweepSpecError) as info:
        points_to_check(grid, limit=50)
    assert "the grid's first 100 points (of 100) are more than the 50" in info.value.fields["space"]


# ---------------------------------------------------------------- apply


def test_apply_sets_nested_paths_into_a_copy() -> None:
    base = train_spec(model={"name": "mlp", "params": {"hidden": 32}}, loss="cross_entropy")
    trial = apply(
        base,
        {
            "optimizer.lr": 0.01,
            "model.params.layers": 3,
            "schedule.name": "cosine",
            "loss.label_smoothing": 0.1,
        },
    )
    assert trial["optimizer"] == {"name": "adam", "lr": 0.01}
    assert trial["model"] == {"name": "mlp", "params": {"hidden": 32, "layers": 3}}
    assert trial["schedule"] == {"name": "cosine"}  # made where the base had none
    assert trial["loss"] == {"name": "cross_entropy", "label_smoothing": 0.1}  # the shorthand
    assert base == train_spec(model={"name": "mlp", "params": {"hidden": 32}}, loss="cross_entropy")


def test_choosing_another_model_starts_from_its_defaults() -> None:
    base = train_spec(model={"name": "mlp", "params": {"hidden": 32, "layers": 3}})
    assert apply(base, {"model.name": "cnn"})["model"] == {"name": "cnn"}
    assert apply(base, {"model.name": "cnn", "model.params.channels": 8})["model"] == {
        "name": "cnn",
        "params": {"channels": 8},
    }
    # The base's own model keeps the base's params.
    assert apply(base, {"model.name": "mlp"})["model"] == base["model"]
    # The same for a dataset: its params belong to the base's dataset; its other
    # settings (val_fraction) stay.
    images = train_spec(
        dataset={"name": "synthetic_images", "params": {"height": 8}, "val_fraction": 0.3}
    )
    assert apply(images, {"dataset.name": "digits"})["dataset"] == {
        "name": "digits",
        "val_fraction": 0.3,
    }


def test_apply_into_a_scalar_of_the_base_names_the_parameter() -> None:
    with pytest.raises(SweepSpecError) as info:
        apply(MLP, {"epochs.count": 3})
    assert info.value.fields == {
        "space.epochs.count": "base's epochs is 3, not an object with fields"
    }


# ---------------------------------------------------------------- validating every point


def test_a_space_within_the_job_spec_is_valid() -> None:
    spec = spec_of(
        {
            "optimizer.lr": "loguniform(1e-4, 1e-1)",
            "model.params.layers": "int(1, 4)",
            "model.params.hidden": "int(16, 256, log)",
            "model.params.activation": "choice([relu, gelu, tanh])",
            "model.params.dropout": "uniform(0, 0.5)",
            "batch_size": "choice([16, 32])",
        }
    )
    assert validate(spec, CTX) is None


def test_an_lr_past_the_optimizers_bound_is_refused_naming_it() -> None:
    fields = invalid_points(sweep({"optimizer.lr": "uniform(0.001, 100)"}))
    assert fields == {
        "space.optimizer.lr": "uniform(0.001, 100) can produce 100, which optimizer.lr refuses: "
        "Input should be less than or equal to 10"
    }


def test_layers_from_0_are_refused_naming_the_parameter() -> None:
    fields = invalid_points(
        sweep({"model.params.layers": "int(0, 3)", "optimizer.lr": "uniform(0.001, 0.1)"})
    )
    assert fields == {
        "space.model.params.layers": "int(0, 3) can produce 0, which model.params.layers refuses: "
        "Input should be greater than or equal to 1"
    }


def test_values_inside_the_range_are_checked() -> None:
    cnn = train_spec()
    fields = invalid_points(sweep({"model.params.kernel_size": "int(3, 7)"}, base=cnn))
    assert fields == {
        "space.model.params.kernel_size": "int(3, 7) can produce 4, which model.params.kernel_size "
        "refuses: must be odd so that padding keeps the image size"
    }
    assert (
        validate(spec_of({"model.params.kernel_size": "int(3, 7, step=2)"}, base=cnn), CTX) is None
    )
    fields = invalid_points(sweep({"epochs": "uniform(2, 6)"}))
    assert "uniform(2, 6) can produce 4.5, which epochs refuses" in fields["space.epochs"]


def test_a_choice_value_the_spec_refuses_is_named() -> None:
    fields = invalid_points(sweep({"model.params.activation": "choice([relu, swish])"}))
    assert fields["space.model.params.activation"].startswith(
        "choice([relu, swish]) can produce swish, which model.params.activation refuses: Input should be"
    )
    fields = invalid_points(sweep({"model.name": "choice([mlp, transformer])"}))
    assert "can produce transformer, which model.name refuses" in fields["space.model.name"]


def test_a_field_only_some_choices_take_points_to_a_sub_space() -> None:
    fields = invalid_points(
        sweep({"model.name": "choice([mlp, resnet])", "model.params.hidden": "int(16, 64)"})
    )
    assert fields == {
        "space.model.params.hidden": "int(16, 64) can produce 16, which model.params.hidden "
        "refuses: unknown field (with model.name=resnet; a sub-space under that choice sets it "
        "only where it applies)"
    }


def test_a_conditional_sub_space_is_checked_with_its_value_only() -> None:
    space = {
        "model.name": {
            "choice": [
                {"value": "mlp", "space": {"model.params.layers": "int(1, 16)"}},
                {
                    "value": "cnn",
                    "space": {
                        "model.params.channels": "int(8, 64, log)",
                        "model.params.blocks": "int(1, 3)",
                    },
                },
            ]
        },
        "optimizer.lr": "loguniform(1e-4, 1e-1)",
    }
    assert validate(parse_sweep_spec(sweep(space)), CTX) is None
    # 4 blocks halve digits' 8x8 images too often: the cnn's sub-space parameter is named.
    space["model.name"]["choice"][1]["space"]["model.params.blocks"] = "int(1, 4)"
    fields = invalid_points(sweep(space))
    assert list(fields) == ["space.model.params.blocks"]
    assert (
        "int(1, 4) can produce 4, which model.params.blocks refuses: 4 blocks halve"
        in fields["space.model.params.blocks"]
    )


def test_a_problem_of_the_base_names_the_base_field() -> None:
    fields = invalid_points(
        sweep({"optimizer.lr": "uniform(0.001, 0.1)"}, base=train_spec(batch_size=0))
    )
    assert fields == {"base.batch_size": "Input should be greater than or equal to 1"}
    # Only some points break it: the message says which.
    warm = train_spec(schedule={"name": "cosine", "warmup_epochs": 4})
    fields = invalid_points(sweep({"epochs": "int(3, 10)"}, base=warm))
    assert fields == {
        "base.schedule.warmup_epochs": "must be less than epochs (3) (when the space sets epochs=3)"
    }


def test_a_train_sweeps_metric_must_be_one_its_trials_report() -> None:
    fields = invalid_points(sweep({"epochs": "int(1, 3)"}, metric="val_r2"))
    assert fields == {
        "metric": "classification train jobs report train_loss, val_accuracy, val_f1, val_loss "
        "per epoch; not val_r2"
    }
    regression = train_spec(dataset={"name": "synthetic_regression"}, model={"name": "mlp"})
    assert validate(spec_of({"epochs": "int(1, 3)"}, base=regression, metric="val_r2"), CTX) is None


SCRIPT = {"kind": "script", "bundle_id": 5, "entry": "train.py", "params": {"lr": 0.1}}


def test_a_script_sweep_searches_its_params() -> None:
    data = sweep(
        {"params.lr": "loguniform(1e-4, 1e-1)", "params.width": "int(8, 64)"},
        base=SCRIPT,
        metric="val_accuracy",
    )
    spec = parse_sweep_spec(data)
    assert apply(spec.base, {"params.lr": 0.01, "params.width": 8})["params"] == {
        "lr": 0.01,
        "width": 8,
    }
    # The bundle is looked up by the function given; without one only the spec is checked.
    assert validate(spec, CTX) is None
    assert validate(spec, CTX, find_bundle=lambda i: i == 5) is None
    fields = invalid_points(data, find_bundle=lambda i: False)
    assert fields == {"base.bundle_id": "bundle 5 does not exist"}
    by_space = sweep({"bundle_id": "choice([5, 6])"}, base=SCRIPT, metric="val_accuracy")
    assert invalid_points(by_space, find_bundle=lambda i: i == 5) == {
        "space.bundle_id": "bundle 6 does not exist"
    }


def test_a_script_sweep_is_checked_against_the_catalogue() -> None:
    fields = invalid_points(
        sweep({"params.lr": "uniform(0, 1)"}, base={**SCRIPT, "dataset": {"name": "mnist"}})
    )
    assert "TRAINYARD_DATA_DIR/mnist" in fields["base.dataset.name"]
    fields = invalid_points(sweep({"stop_grace_s": "int(0, 10)"}, base=SCRIPT))
    assert "int(0, 10) can produce 0, which stop_grace_s refuses" in fields["space.stop_grace_s"]
