"""Reproducibility and resume on CPU (issue 3).

(a) The same spec and seed twice give identical metrics and metric points.
(b) A run stopped by should_stop (mid-epoch, at an epoch boundary, between training
    and validation) and resumed from the last.pt it wrote ends with exactly the final
    metrics, metric points and weights of an uninterrupted run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from shared.spec import TrainSpec, parse_spec  # noqa: E402
from worker.training import DataPaths, JobCancelled, ListSink, UserError, train_job  # noqa: E402
from worker.training.checkpoint import load_checkpoint  # noqa: E402

CPU = torch.device("cpu")
PATHS = DataPaths(data_dir=Path("/nonexistent/data"), uploads_dir=Path("/nonexistent/uploads"))
# Wall-clock keys differ between identical runs; where a run resumed from differs by design.
TIMING_KEYS = {"duration_s", "train_time_s", "samples_per_s"}
RESUME_KEYS = TIMING_KEYS | {"resumed_from_epoch", "resumed_from_step"}

# An MLP with dropout (the global RNG matters) and a CNN with dropout and every
# augmentation on (the augmentation generator matters too), plus gradient accumulation,
# a schedule, clipping and L1 so that their state is exercised by a resume.
MLP_DROPOUT: dict[str, Any] = {
    "dataset": {"name": "digits"},
    "model": {"name": "mlp", "params": {"hidden": 64, "dropout": 0.3}},
    "optimizer": {"name": "adamw", "lr": 0.003},
    "schedule": {"name": "cosine", "warmup_epochs": 0.5},
    "epochs": 3,
    "batch_size": 64,  # 18 batches per epoch
}
CNN_AUGMENT: dict[str, Any] = {
    "dataset": {
        "name": "digits",
        "augment": {"hflip": True, "crop_padding": 1, "rotation_degrees": 10},
    },
    "model": {"name": "cnn", "params": {"channels": 8, "hidden": 32, "dropout": 0.3}},
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True},
    "schedule": {"name": "step", "step_epochs": 1, "gamma": 0.5},
    "epochs": 3,
    "batch_size": 64,
}
MLP_ACCUM: dict[str, Any] = {
    **MLP_DROPOUT,
    "grad_accum_steps": 4,  # 18 batches: windows of 4, 4, 4, 4, 2
    "grad_clip_norm": 0.5,
    "regularization": {"l1": 1e-4},
}
BATCHES = math.ceil(1149 / 64)


def make_spec(base: dict[str, Any], **overrides: Any) -> TrainSpec:
    spec = parse_spec({"kind": "train", "seed": 3, **base, **overrides})
    assert isinstance(spec, TrainSpec)
    return spec


def stop_on_call(n: int) -> Callable[[], bool]:
    """should_stop that answers True from its n-th call on (1-based).

    train_job asks once before every batch and once after each epoch's last batch,
    so epoch e (1-based) asks on calls (e-1)*(BATCHES+1) + 1 .. e*(BATCHES+1).
    """
    calls = 0

    def should_stop() -> bool:
        nonlocal calls
        calls += 1
        return calls >= n

    return should_stop


def without(result: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in keys}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


# ---------------------------------------------------------------- (a) same seed


@pytest.mark.parametrize("base", [MLP_DROPOUT, CNN_AUGMENT], ids=["mlp-dropout", "cnn-augment"])
def test_same_spec_and_seed_give_identical_metrics(tmp_path: Path, base: dict[str, Any]) -> None:
    runs = []
    for name in ("a", "b"):
        sink = ListSink()
        result = train_job(make_spec(base, epochs=2), CPU, sink, tmp_path / name, paths=PATHS)
        runs.append((without(result, TIMING_KEYS), sink.points))
    assert runs[0] == runs[1]
    assert_same_weights(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")
    other = train_job(
        make_spec(base, epochs=2, seed=4), CPU, ListSink(), tmp_path / "c", paths=PATHS
    )
    assert other["val_loss"] != runs[0][0]["val_loss"]


# ---------------------------------------------------------------- (b) stop and resume

# (name, base spec, the should_stop call that stops the first attempt)
INTERRUPTIONS = [
    ("mlp-dropout-mid-epoch-2", MLP_DROPOUT, (BATCHES + 1) + 7),
    ("cnn-augment-mid-epoch-2", CNN_AUGMENT, (BATCHES + 1) + 11),
    ("cnn-augment-epoch-boundary", CNN_AUGMENT, (BATCHES + 1) + 1),  # before epoch 2's first batch
    ("mlp-before-validation", MLP_DROPOUT, 2 * (BATCHES + 1)),  # epoch 2 trained, not validated
    ("mlp-accum-mid-window", MLP_ACCUM, (BATCHES + 1) + 6),  # 5 batches done: inside window 2
]


@pytest.mark.parametrize(
    ("base", "stop_call"), [i[1:] for i in INTERRUPTIONS], ids=[i[0] for i in INTERRUPTIONS]
)
def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(
    tmp_path: Path, base: dict[str, Any], stop_call: int
) -> None:
    spec = make_spec(base)
    straight_sink = ListSink()
    straight = train_job(spec, CPU, straight_sink, tmp_path / "straight", paths=PATHS)

    first_sink = ListSink()
    with pytest.raises(JobCancelled):
        train_job(spec, CPU, first_sink, tmp_path / "run", stop_on_call(stop_call), paths=PATHS)
    last = tmp_path / "run" / "last.pt"
    stopped = load_checkpoint(last)
    assert stopped["step"] == stop_call - 1 - (stop_call - 1) // (BATCHES + 1)  # batches done
    assert stopped["epoch"] == 1

    resumed_sink = ListSink()
    resumed = train_job(spec, CPU, resumed_sink, tmp_path / "run", resume_from=last, paths=PATHS)

    assert without(resumed, RESUME_KEYS) == without(straight, RESUME_KEYS)
    assert (resumed["resumed_from_epoch"], resumed["resumed_from_step"]) == (1, stopped["step"])
    # What the two attempts logged is exactly what the uninterrupted run logged.
    assert first_sink.points + resumed_sink.points == straight_sink.points
    assert_same_weights(tmp_path / "run" / "last.pt", tmp_path / "straight" / "last.pt")
    assert_same_weights(tmp_path / "run" / "best.pt", tmp_path / "straight" / "best.pt")


def test_a_finished_run_can_be_extended(tmp_path: Path) -> None:
    # `epochs` may grow: 2 epochs, then resumed to 3, equals 3 straight (constant lr).
    base = {**MLP_DROPOUT, "schedule": {"name": "constant"}}
    straight_sink = ListSink()
    straight = train_job(make_spec(base), CPU, straight_sink, tmp_path / "straight", paths=PATHS)
    train_job(make_spec(base, epochs=2), CPU, ListSink(), tmp_path / "short", paths=PATHS)
    sink = ListSink()
    resumed = train_job(make_spec(base), CPU, sink, tmp_path / "long",
                        resume_from=tmp_path / "short" / "last.pt", paths=PATHS)  # fmt: skip
    assert resumed["resumed_from_epoch"] == 2 and resumed["epochs_run"] == 3
    assert without(resumed, RESUME_KEYS) == without(straight, RESUME_KEYS)
    assert sink.points == [p for p in straight_sink.points if p.epoch == 3]
    # The best checkpoint came along to the new directory.
    assert (tmp_path / "long" / "best.pt").is_file()


def test_resuming_a_finished_run_trains_no_more(tmp_path: Path) -> None:
    spec = make_spec(MLP_DROPOUT, epochs=2)
    first = train_job(spec, CPU, ListSink(), tmp_path / "a", paths=PATHS)
    sink = ListSink()
    again = train_job(
        spec, CPU, sink, tmp_path / "a", resume_from=tmp_path / "a" / "last.pt", paths=PATHS
    )
    assert without(again, RESUME_KEYS) == without(first, RESUME_KEYS)
    assert not sink.points


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"model": {"name": "mlp", "params": {"hidden": 32, "dropout": 0.3}}}, "model"),
        ({"batch_size": 32}, "batch_size"),
        ({"seed": 9}, "seed"),
        ({"optimizer": {"name": "adam", "lr": 0.003}}, "optimizer"),
        ({"schedule": {"name": "constant"}}, "schedule"),
        ({"epochs": 1}, "epoch"),
    ],
)
def test_resume_refuses_a_different_job(tmp_path: Path, change: dict[str, Any], field: str) -> None:
    train_job(make_spec(MLP_DROPOUT, epochs=2), CPU, ListSink(), tmp_path / "a", paths=PATHS)
    with pytest.raises(UserError, match=field):
        train_job(make_spec(MLP_DROPOUT, **change), CPU, ListSink(), tmp_path / "b",
                  resume_from=tmp_path / "a" / "last.pt", paths=PATHS)  # fmt: skip


def test_resume_from_a_missing_or_foreign_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        train_job(make_spec(MLP_DROPOUT), CPU, ListSink(), tmp_path / "a",
                  resume_from=tmp_path / "nope.pt", paths=PATHS)  # fmt: skip
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read"):
        train_job(make_spec(MLP_DROPOUT), CPU, ListSink(), tmp_path / "a",
                  resume_from=tmp_path / "junk.pt", paths=PATHS)  # fmt: skip
