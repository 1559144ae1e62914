"""worker/training on CPU: real (small) training runs on sklearn's digits."""

from __future__ import annotations

import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

import torch.nn.functional as F  # noqa: E402

from shared.registry import DATASETS  # noqa: E402
from shared.spec import EvaluateSpec, TrainSpec, parse_spec  # noqa: E402
from worker.training import (  # noqa: E402
    JobCancelled,
    ListSink,
    Sink,
    UserError,
    evaluate_job,
    pick_device,
    train_job,
)
from worker.training import train as train_module  # noqa: E402
from worker.training.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from worker.training.datasets import load_dataset  # noqa: E402
from worker.training.models import build_model  # noqa: E402
from worker.training.optimizers import build_optimizer  # noqa: E402

CPU = torch.device("cpu")
# Wall-clock keys differ between identical runs; everything else must not.
TIMING_KEYS = {"duration_s", "train_time_s", "samples_per_s"}
# 3 epochs reach 0.84-0.93 val accuracy depending on the seed; 8 reach >= 0.92 for
# seeds 0-5, so the quality gate below does not hinge on one lucky seed.
CNN_EPOCHS = 8


def train_spec(**overrides: Any) -> TrainSpec:
    data: dict[str, Any] = {
        "kind": "train",
        "dataset": {"name": "digits"},
        "model": {"name": "cnn"},
        "epochs": 3,
        "batch_size": 32,
        "seed": 0,
    }
    data.update(overrides)
    spec = parse_spec(data)
    assert isinstance(spec, TrainSpec)
    return spec


def mlp_spec(**overrides: Any) -> TrainSpec:
    return train_spec(model={"name": "mlp", "params": {"dropout": 0.2}}, **overrides)


def eval_spec(**dataset: Any) -> EvaluateSpec:
    spec = parse_spec({"kind": "evaluate", "source_job_id": 1, "dataset": dataset})
    assert isinstance(spec, EvaluateSpec)
    return spec


def without_timing(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in TIMING_KEYS}


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    spec = train_spec(epochs=CNN_EPOCHS)
    sink = ListSink()
    path = tmp_path_factory.mktemp("cnn") / "model.pt"
    result = train_job(spec, CPU, sink, path)
    return SimpleNamespace(spec=spec, sink=sink, path=path, result=result)


# ---------------------------------------------------------------- train_job


def test_cnn_learns_digits(cnn_run: SimpleNamespace) -> None:
    result = cnn_run.result
    assert result["val_accuracy"] >= 0.9
    assert result["best_val_accuracy"] >= result["val_accuracy"]
    assert result["epochs_run"] == CNN_EPOCHS
    assert result["num_train_samples"] + result["num_val_samples"] == 1797 - 360
    assert result["samples_per_s"] > 0 and result["duration_s"] > 0
    assert result["device"] == "cpu"
    assert result["torch_version"] == torch.__version__
    assert result["seed"] == 0
    assert result["num_parameters"] == sum(
        p.numel() for p in build_model(cnn_run.spec.model, DATASETS["digits"]).parameters()
    )
    assert all(math.isfinite(result[k]) for k in ("train_loss", "val_loss", "val_accuracy"))


def test_one_point_per_epoch_for_each_epoch_series(cnn_run: SimpleNamespace) -> None:
    sink: ListSink = cnn_run.sink
    for key in ("train_loss", "val_loss", "val_accuracy", "lr"):
        points = [p for p in sink.points if p.key == key]
        assert [(p.step, p.epoch) for p in points] == [(e, e) for e in range(1, CNN_EPOCHS + 1)]
    assert sink.series("val_loss")[-1] == cnn_run.result["val_loss"]
    assert sink.series("lr") == [1e-3] * CNN_EPOCHS
    step_points = [p for p in sink.points if p.key == "step_loss"]
    steps = [p.step for p in step_points]
    assert len(step_points) >= CNN_EPOCHS and steps == sorted(steps)
    assert all(math.isfinite(p.value) for p in step_points)


def test_progress_reports_reach_the_end(cnn_run: SimpleNamespace) -> None:
    updates = cnn_run.sink.progress_updates
    assert len(updates) >= CNN_EPOCHS  # at least one per epoch end
    last = updates[-1]
    assert set(last) >= {
        "epoch",
        "epochs",
        "step",
        "steps_total",
        "samples_per_s",
        "eta_s",
        "fraction",
    }
    assert last["step"] == last["steps_total"] == CNN_EPOCHS * math.ceil(1149 / 32)
    assert last["fraction"] == 1.0 and last["eta_s"] == 0.0
    assert [u["epoch"] for u in updates] == sorted(u["epoch"] for u in updates)


def test_checkpoint_is_plain_data(cnn_run: SimpleNamespace) -> None:
    assert cnn_run.path.is_file()
    assert not list(cnn_run.path.parent.glob("*.tmp"))
    ckpt = torch.load(cnn_run.path, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == CNN_EPOCHS
    assert ckpt["spec"] == cnn_run.spec.model_dump(mode="json")
    assert set(ckpt["rng"]) >= {"torch", "batch_order"}
    assert "state" in ckpt["optimizer"]
    model = build_model(cnn_run.spec.model, DATASETS["digits"])
    model.load_state_dict(ckpt["model"])


def test_mlp_loss_drops(tmp_path: Path) -> None:
    sink = ListSink()
    result = train_job(mlp_spec(epochs=4), CPU, sink, tmp_path / "mlp.pt")
    losses = sink.series("train_loss")
    assert len(losses) == 4
    assert losses[-1] < 0.5 * losses[0]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False))
    assert result["val_accuracy"] > 0.8


def test_same_seed_same_metrics(tmp_path: Path) -> None:
    # The CNN has dropout, so this also covers the global RNG being reseeded.
    runs = []
    for name in ("a", "b"):
        sink = ListSink()
        result = train_job(train_spec(epochs=2), CPU, sink, tmp_path / f"{name}.pt")
        runs.append((without_timing(result), sink.points))
    assert runs[0] == runs[1]
    other = train_job(train_spec(epochs=2, seed=1), CPU, ListSink(), tmp_path / "c.pt")
    assert without_timing(other) != runs[0][0]


def test_sgd_with_momentum_trains(tmp_path: Path) -> None:
    sink = ListSink()
    spec = mlp_spec(epochs=5, optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9})
    result = train_job(spec, CPU, sink, tmp_path / "sgd.pt")
    losses = sink.series("train_loss")
    assert losses[-1] < 0.5 * losses[0]
    assert result["val_accuracy"] > 0.85


# ---------------------------------------------------------------- stopping and failing


def test_should_stop_cancels_at_once(tmp_path: Path) -> None:
    path = tmp_path / "never.pt"
    started = time.perf_counter()
    with pytest.raises(JobCancelled):
        train_job(train_spec(epochs=50), CPU, ListSink(), path, should_stop=lambda: True)
    assert time.perf_counter() - started < 5
    assert not path.exists()


def test_should_stop_mid_epoch_stops_at_the_next_step(tmp_path: Path) -> None:
    calls = 0

    def stop_after_ten() -> bool:
        nonlocal calls
        calls += 1
        return calls > 10

    sink = ListSink()
    with pytest.raises(JobCancelled, match="step 10"):
        train_job(mlp_spec(epochs=50), CPU, sink, tmp_path / "x.pt", should_stop=stop_after_ten)
    assert calls == 11
    assert not sink.series("val_loss")


def test_non_finite_loss_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def nan_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target) * float("nan")

    monkeypatch.setitem(train_module.LOSSES, "cross_entropy", nan_loss)
    with pytest.raises(UserError, match="non-finite"):
        train_job(mlp_spec(epochs=2), CPU, ListSink(), tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


# ---------------------------------------------------------------- resume


def test_resume_continues_exactly_where_it_stopped(tmp_path: Path) -> None:
    straight_sink = ListSink()
    straight = train_job(mlp_spec(epochs=3), CPU, straight_sink, tmp_path / "straight.pt")

    first = tmp_path / "first.pt"
    train_job(mlp_spec(epochs=2), CPU, ListSink(), first)
    resumed_sink = ListSink()
    resumed = train_job(
        mlp_spec(epochs=3), CPU, resumed_sink, tmp_path / "resumed.pt", resume_from=first
    )

    assert resumed["resumed_from_epoch"] == 2 and resumed["epochs_run"] == 3
    skip = TIMING_KEYS | {"resumed_from_epoch"}
    assert {k: v for k, v in resumed.items() if k not in skip} == {
        k: v for k, v in straight.items() if k not in skip
    }
    third_epoch = [p for p in straight_sink.points if p.epoch == 3]
    assert resumed_sink.points == third_epoch


def test_resume_from_a_different_model_is_a_user_error(
    cnn_run: SimpleNamespace, tmp_path: Path
) -> None:
    with pytest.raises(UserError, match="model"):
        train_job(mlp_spec(), CPU, ListSink(), tmp_path / "x.pt", resume_from=cnn_run.path)
    with pytest.raises(UserError, match="not found"):
        train_job(mlp_spec(), CPU, ListSink(), tmp_path / "x.pt", resume_from=tmp_path / "nope.pt")


# ---------------------------------------------------------------- evaluate_job


def test_evaluate_test_split(cnn_run: SimpleNamespace) -> None:
    result = evaluate_job(eval_spec(), cnn_run.spec, cnn_run.path, CPU)
    assert result["accuracy"] >= 0.9
    assert result["split"] == "test" and result["dataset"] == "digits"
    assert result["num_samples"] == DATASETS["digits"].test_size == 360
    matrix = result["confusion_matrix"]
    assert len(matrix) == 10 and all(len(row) == 10 for row in matrix)
    assert sum(map(sum, matrix)) == 360
    assert all(isinstance(v, int) for row in matrix for v in row)
    assert sum(matrix[i][i] for i in range(10)) / 360 == pytest.approx(result["accuracy"])
    assert [c["support"] for c in result["per_class"]] == [sum(row) for row in matrix]
    assert [c["class"] for c in result["per_class"]] == list(range(10))
    for key in ("precision", "recall", "f1"):
        assert 0.0 <= result[key] <= 1.0
        assert result[key] == pytest.approx(sum(c[key] for c in result["per_class"]) / 10)
    assert math.isfinite(result["loss"]) and result["loss"] > 0


def test_evaluate_val_split_matches_training(cnn_run: SimpleNamespace) -> None:
    result = evaluate_job(eval_spec(split="val"), cnn_run.spec, cnn_run.path, CPU)
    assert result["num_samples"] == cnn_run.result["num_val_samples"]
    assert result["accuracy"] == pytest.approx(cnn_run.result["val_accuracy"])
    assert result["loss"] == pytest.approx(cnn_run.result["val_loss"], rel=1e-5)


def test_evaluate_rejects_a_checkpoint_of_another_model(
    cnn_run: SimpleNamespace, tmp_path: Path
) -> None:
    other = train_spec(model={"name": "cnn", "params": {"channels": 8}})
    with pytest.raises(UserError, match="model"):
        evaluate_job(eval_spec(), other, cnn_run.path, CPU)
    with pytest.raises(UserError, match="not found"):
        evaluate_job(eval_spec(), cnn_run.spec, tmp_path / "missing.pt", CPU)


# ---------------------------------------------------------------- building blocks


def test_digits_splits_are_fixed_and_on_device() -> None:
    splits = load_dataset("digits", 0.2, CPU)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1149, 288, 360)
    assert splits.train.x.dtype == torch.float32 and splits.train.y.dtype == torch.int64
    assert tuple(splits.train.x.shape[1:]) == (1, 8, 8)
    assert float(splits.train.x.min()) >= 0.0 and float(splits.train.x.max()) <= 1.0
    # The test split does not depend on val_fraction (or on any job's seed).
    other = load_dataset("digits", 0.5, CPU)
    assert torch.equal(other.test.x, splits.test.x)
    assert len(other.val) == 719
    # Every class is in the test split in proportion (stratified).
    assert torch.bincount(splits.test.y).min() >= 35


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="cnn, mlp"):
        build_model(SimpleNamespace(name="resnet", params=None), DATASETS["digits"])
    with pytest.raises(ValueError, match="adam, sgd"):
        build_optimizer(SimpleNamespace(name="lbfgs"), [])
    with pytest.raises(ValueError, match="digits"):
        load_dataset("imagenet", 0.2, CPU)


def test_cnn_shapes_follow_the_params() -> None:
    spec = train_spec(
        model={"name": "cnn", "params": {"channels": 4, "hidden": 16, "kernel_size": 5}}
    )
    model = build_model(spec.model, DATASETS["digits"])
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


def test_save_checkpoint_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "ckpt" / "model.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(2)})
    with pytest.raises(Exception):  # noqa: B017 - whatever torch.save raises
        save_checkpoint(path, {"epoch": 2, "bad": lambda: None})
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]


def test_load_checkpoint_refuses_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"obj": SimpleNamespace(a=1)}, path)
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_checkpoint(path)


def test_public_api() -> None:
    assert pick_device() == (torch.device("cuda", 0) if torch.cuda.is_available() else CPU)
    assert isinstance(ListSink(), Sink)
