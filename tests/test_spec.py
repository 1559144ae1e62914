"""JobSpec validation: every bad input names its field."""

from __future__ import annotations

import pytest

from shared.spec import CPU_QUEUE, GPU_QUEUE, EvaluateSpec, SpecError, TrainSpec, parse_spec
from tests.helpers import evaluate_spec, train_spec


def fields_of(data: object) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    return info.value.fields


def test_valid_train_spec_gets_defaults() -> None:
    spec = parse_spec({"kind": "train", "dataset": {"name": "digits"}, "model": {"name": "mlp"}})
    assert isinstance(spec, TrainSpec)
    assert spec.optimizer.name == "adam" and spec.epochs == 10 and spec.queue == CPU_QUEUE
    assert spec.model.params.hidden == 128


def test_gpu_jobs_route_to_gpu_queue() -> None:
    assert parse_spec(train_spec(resources={"gpus": 1})).queue == GPU_QUEUE


def test_evaluate_spec() -> None:
    spec = parse_spec(evaluate_spec(7))
    assert (
        isinstance(spec, EvaluateSpec) and spec.source_job_id == 7 and spec.dataset.split == "test"
    )


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (train_spec(colour="red"), "colour"),
        (train_spec(model={"name": "cnn", "params": {"depth": 3}}), "model.params.depth"),
        (train_spec(model={"name": "vgg"}), "model.name"),
        (train_spec(dataset={"name": "imagenet"}), "dataset.name"),
        (train_spec(optimizer={"name": "lion", "lr": 0.1}), "optimizer.name"),
        (train_spec(epochs=0), "epochs"),
        (train_spec(epochs=-3), "epochs"),
        (train_spec(optimizer={"name": "adam", "lr": 0}), "optimizer.lr"),
        (train_spec(optimizer={"name": "sgd", "lr": -0.1}), "optimizer.lr"),
        (train_spec(batch_size=0), "batch_size"),
        (
            train_spec(model={"name": "cnn", "params": {"kernel_size": 4}}),
            "model.params.kernel_size",
        ),
        (
            train_spec(model={"name": "cnn", "params": {"kernel_size": 9}}),
            "model.params.kernel_size",
        ),
        (train_spec(epochs="ten"), "epochs"),
        (train_spec(resources={"gpus": -1}), "resources.gpus"),
        (train_spec(optimizer={"name": "sgd", "nesterov": True}), "optimizer.nesterov"),
        ({"kind": "train", "model": {"name": "cnn"}}, "dataset"),
        ({"kind": "retrain"}, "kind"),
        ({}, "kind"),
        ([1, 2], "body"),
        ({"kind": "evaluate"}, "source_job_id"),
        (evaluate_spec(1, dataset={"split": "holdout"}), "dataset.split"),
    ],
)
def test_bad_specs_name_the_field(data: object, field: str) -> None:
    fields = fields_of(data)
    assert field in fields, fields


def test_unknown_names_list_the_choices() -> None:
    fields = fields_of(train_spec(model={"name": "vgg"}, optimizer={"name": "lion"}))
    assert "mlp" in fields["model.name"] and "cnn" in fields["model.name"]
    assert "adam" in fields["optimizer.name"] and "sgd" in fields["optimizer.name"]
