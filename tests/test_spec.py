"""JobSpec validation: every bad input names its field."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.dataset_catalog import CatalogContext, ColumnInfo, UploadInfo
from shared.spec import CPU_QUEUE, GPU_QUEUE, EvaluateSpec, SpecError, TrainSpec, parse_spec
from tests.helpers import evaluate_spec, train_spec

UPLOAD = UploadInfo(
    id=7,
    filename="houses.csv",
    rows=100,
    columns=(
        ColumnInfo("area", True, 90),
        ColumnInfo("rooms", True, 6),
        ColumnInfo("city", False, 4),
        ColumnInfo("price", True, 100),
        ColumnInfo("kind", False, 3),
        ColumnInfo("id", True, 1001),
    ),
)
CTX = CatalogContext(
    data_dir=Path("/nonexistent-data"), find_upload=lambda i: UPLOAD if i == 7 else None
)


def fields_of(data: object) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        parse_spec(data, CTX)
    return info.value.fields


def test_valid_train_spec_gets_defaults() -> None:
    spec = parse_spec(
        {"kind": "train", "dataset": {"name": "digits"}, "model": {"name": "mlp"}}, CTX
    )
    assert isinstance(spec, TrainSpec)
    assert spec.optimizer.name == "adam" and spec.epochs == 10 and spec.queue == CPU_QUEUE
    assert spec.model.params.hidden == 128
    assert spec.loss is not None and spec.loss.name == "cross_entropy"
    assert spec.schedule.name == "constant" and spec.precision == "fp32"


def test_regression_gets_mse_by_default() -> None:
    spec = parse_spec(
        {"kind": "train", "dataset": {"name": "synthetic_regression"}, "model": {"name": "mlp"}},
        CTX,
    )
    assert isinstance(spec, TrainSpec) and spec.loss and spec.loss.name == "mse"


@pytest.mark.parametrize(
    "spec",
    [
        train_spec(
            model={"name": "resnet", "params": {"depth": 8, "width": 8}},
            dataset={"name": "synthetic_images"},
        ),
        train_spec(
            model={"name": "resnet", "params": {"depth": 18}}, dataset={"name": "synthetic_images"}
        ),
        train_spec(model={"name": "lstm"}, dataset={"name": "synthetic_sequences"}),
        train_spec(
            model={"name": "gru", "params": {"bidirectional": True, "layers": 2}},
            dataset={"name": "synthetic_sequences"},
        ),
        train_spec(
            model={"name": "transformer", "params": {"d_model": 32, "heads": 4}},
            dataset={"name": "synthetic_sequences"},
        ),
        train_spec(model={"name": "mlp"}, dataset={"name": "iris"}, optimizer={"name": "adamw"}),
        train_spec(
            model={"name": "mlp"},
            dataset={"name": "wine"},
            optimizer={"name": "rmsprop"},
            schedule={"name": "cosine", "warmup_epochs": 1},
        ),
        train_spec(
            model={"name": "mlp"},
            dataset={"name": "breast_cancer"},
            optimizer={"name": "adagrad"},
            schedule={"name": "step", "step_epochs": 1},
        ),
        train_spec(
            model={"name": "mlp"},
            dataset={
                "name": "csv",
                "params": {"upload_id": 7, "target": "price", "task": "regression"},
            },
            loss="l1",
        ),
        train_spec(
            model={"name": "mlp"},
            dataset={"name": "csv", "params": {"upload_id": 7, "target": "kind"}},
            loss={"name": "cross_entropy", "label_smoothing": 0.1},
        ),
        train_spec(
            schedule={"name": "onecycle"},
            early_stopping={"metric": "val_accuracy", "patience": 2},
            grad_clip_norm=1.0,
            grad_accum_steps=2,
            precision="bf16",
        ),
        train_spec(
            dataset={
                "name": "digits",
                "augment": {"hflip": True, "crop_padding": 1, "rotation_degrees": 10},
                "normalize": "standardize",
            }
        ),
    ],
)
def test_valid_combinations(spec: dict) -> None:
    assert isinstance(parse_spec(spec, CTX), TrainSpec)


def test_gpu_jobs_route_to_gpu_queue() -> None:
    assert parse_spec(train_spec(resources={"gpus": 1}), CTX).queue == GPU_QUEUE


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
        (evaluate_spec(1, checkpoint="middle"), "checkpoint"),
        # bad combinations, caught at submission with the field named
        (train_spec(model={"name": "lstm"}), "model.name"),
        (train_spec(model={"name": "cnn"}, dataset={"name": "iris"}), "model.name"),
        (train_spec(model={"name": "transformer"}, dataset={"name": "digits"}), "model.name"),
        (train_spec(model={"name": "cnn", "params": {"blocks": 4}}), "model.params.blocks"),
        (
            train_spec(
                model={"name": "resnet", "params": {"depth": 18}},
                dataset={"name": "synthetic_images", "params": {"height": 4, "width": 4}},
            ),
            "model.params.depth",
        ),
        (
            train_spec(
                model={"name": "resnet", "params": {"depth": 10}},
                dataset={"name": "synthetic_images"},
            ),
            "model.params.depth",
        ),
        (
            train_spec(
                model={"name": "transformer", "params": {"d_model": 64, "heads": 5}},
                dataset={"name": "synthetic_sequences"},
            ),
            "model.params.heads",
        ),
        (
            train_spec(model={"name": "lstm"}, dataset={"name": "synthetic_sequences"}, loss="mse"),
            "loss.name",
        ),
        (
            train_spec(
                model={"name": "mlp"},
                dataset={"name": "synthetic_regression"},
                loss="cross_entropy",
            ),
            "loss.name",
        ),
        (
            train_spec(
                model={"name": "mlp"},
                dataset={"name": "synthetic_regression"},
                loss={"name": "mse", "label_smoothing": 0.1},
            ),
            "loss.label_smoothing",
        ),
        (
            train_spec(loss={"name": "cross_entropy", "label_smoothing": 1.0}),
            "loss.label_smoothing",
        ),
        (train_spec(loss="hinge"), "loss.name"),
        (
            train_spec(
                model={"name": "mlp"},
                dataset={"name": "synthetic_regression"},
                early_stopping={"metric": "val_accuracy"},
            ),
            "early_stopping.metric",
        ),
        (train_spec(early_stopping={"metric": "val_r2"}), "early_stopping.metric"),
        (
            train_spec(early_stopping={"metric": "val_loss", "patience": 0}),
            "early_stopping.patience",
        ),
        (
            train_spec(model={"name": "mlp"}, dataset={"name": "iris", "augment": {"hflip": True}}),
            "dataset.augment",
        ),
        (
            train_spec(
                model={"name": "lstm"},
                dataset={"name": "synthetic_sequences", "normalize": "standardize"},
            ),
            "dataset.normalize",
        ),
        (
            train_spec(dataset={"name": "digits", "augment": {"rotation_degrees": 90}}),
            "dataset.augment.rotation_degrees",
        ),
        (train_spec(dataset={"name": "mnist"}), "dataset.name"),
        (train_spec(dataset={"name": "fashion_mnist"}), "dataset.name"),
        (train_spec(dataset={"name": "cifar10"}), "dataset.name"),
        (
            train_spec(dataset={"name": "synthetic_images", "params": {"channels": 9}}),
            "dataset.params.channels",
        ),
        (
            train_spec(
                dataset={
                    "name": "synthetic_images",
                    "params": {"height": 256, "width": 256, "num_samples": 1000000},
                }
            ),
            "dataset.params.num_samples",
        ),
        (train_spec(dataset={"name": "digits", "params": {"size": 3}}), "dataset.params.size"),
        (train_spec(model={"name": "mlp"}, dataset={"name": "csv"}), "dataset.params"),
        (
            train_spec(
                model={"name": "mlp"},
                dataset={"name": "csv", "params": {"upload_id": 8, "target": "price"}},
            ),
            "dataset.params.upload_id",
        ),
        (
            train_spec(
                model={"name": "mlp"},
                dataset={"name": "csv", "params": {"upload_id": 7, "target": "cost"}},
            ),
            "dataset.params.target",
        ),
        (
            train_spec(
                model={"name": "mlp"},
                dataset={
                    "name": "csv",
                    "params": {"upload_id": 7, "target": "city", "task": "regression"},
                },
            ),
            "dataset.params.target",
        ),
        (
            train_spec(
                model={"name": "mlp"},
                dataset={
                    "name": "csv",
                    "params": {"upload_id": 7, "target": "price", "features": ["city"]},
                },
            ),
            "dataset.params.features",
        ),
        (
            train_spec(
                model={"name": "mlp"},
                dataset={"name": "csv", "params": {"upload_id": 7, "target": "id"}},
            ),
            "dataset.params.target",
        ),
        (train_spec(optimizer={"name": "adamw", "betas": [0.9, 1.5]}), "optimizer.betas"),
        (train_spec(optimizer={"name": "rmsprop", "alpha": 1.0}), "optimizer.alpha"),
        (train_spec(optimizer={"name": "adagrad", "momentum": 0.9}), "optimizer.momentum"),
        (train_spec(schedule={"name": "cosine", "warmup_epochs": 3}), "schedule.warmup_epochs"),
        (train_spec(schedule={"name": "step", "step_epochs": 0}), "schedule.step_epochs"),
        (train_spec(schedule={"name": "linear"}), "schedule.name"),
        (train_spec(schedule={"name": "onecycle", "max_lr": 0.0001}), "schedule.max_lr"),
        (train_spec(schedule={"name": "onecycle", "warmup_epochs": 1}), "schedule.warmup_epochs"),
        (train_spec(grad_clip_norm=0), "grad_clip_norm"),
        (train_spec(grad_accum_steps=0), "grad_accum_steps"),
        (train_spec(precision="fp8"), "precision"),
        (train_spec(regularization={"l1": -1}), "regularization.l1"),
        (train_spec(checkpoint_every_epochs=0), "checkpoint_every_epochs"),
        (train_spec(model={"name": "resnet", "params": {"depth": 8}}, batch_size=1), "batch_size"),
        (
            train_spec(model={"name": "cnn", "params": {"batch_norm": True}}, batch_size=1),
            "batch_size",
        ),
    ],
)
def test_bad_specs_name_the_field(data: object, field: str) -> None:
    fields = fields_of(data)
    assert field in fields, fields


def test_unknown_names_list_the_choices() -> None:
    fields = fields_of(train_spec(model={"name": "vgg"}, optimizer={"name": "lion"}))
    assert "mlp" in fields["model.name"] and "cnn" in fields["model.name"]
    assert "adam" in fields["optimizer.name"] and "sgd" in fields["optimizer.name"]
