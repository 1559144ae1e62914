"""The training recipe on CPU: losses, optimizers, schedules, regularization, clipping,
accumulation, early stopping, regression, precision and compile. Tiny models, fast."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

import torch.nn.functional as F  # noqa: E402

from shared.dataset_catalog import CatalogContext, resolve_dataset  # noqa: E402
from shared.spec import TrainSpec, parse_spec  # noqa: E402
from worker.training import DataPaths, ListSink, train_job  # noqa: E402
from worker.training.checkpoint import CheckpointWriter, load_checkpoint  # noqa: E402
from worker.training.losses import build_loss, penalized_parameters  # noqa: E402
from worker.training.metrics import classification_metrics, regression_metrics  # noqa: E402
from worker.training.models import build_model  # noqa: E402
from worker.training.schedules import lr_at  # noqa: E402

CPU = torch.device("cpu")
PATHS = DataPaths(data_dir=Path("/nonexistent/data"), uploads_dir=Path("/nonexistent/uploads"))
CTX = CatalogContext(data_dir=Path("/nonexistent/data"))
TINY_MLP = {"name": "mlp", "params": {"hidden": 32, "layers": 1}}


def spec_of(**overrides: Any) -> TrainSpec:
    data: dict[str, Any] = {
        "kind": "train",
        "dataset": {"name": "iris"},
        "model": TINY_MLP,
        "epochs": 8,
        "batch_size": 16,
        "seed": 0,
    }
    data.update(overrides)
    spec = parse_spec(data, CTX)  # with the catalog: fills in the default loss
    assert isinstance(spec, TrainSpec)
    return spec


def run(
    tmp_path: Path, name: str = "run", **overrides: Any
) -> tuple[dict[str, Any], ListSink, Path]:
    sink = ListSink()
    directory = tmp_path / name
    result = train_job(spec_of(**overrides), CPU, sink, directory, paths=PATHS)
    return result, sink, directory


def initial_model(spec: TrainSpec) -> torch.nn.Module:
    """The weights train_job starts from (it seeds torch right before building)."""
    torch.manual_seed(spec.seed)
    return build_model(spec.model, resolve_dataset(spec.dataset.name, spec.dataset.params, CTX))


def weights(directory: Path, which: str = "last") -> dict[str, torch.Tensor]:
    return load_checkpoint(directory / f"{which}.pt")["model"]


# ---------------------------------------------------------------- optimizers and schedules

OPTIMIZERS = [
    {"name": "adam", "lr": 0.01},
    {"name": "adamw", "lr": 0.01, "weight_decay": 0.01},
    {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4},
    {"name": "adagrad", "lr": 0.1, "lr_decay": 0.001},
    {"name": "rmsprop", "lr": 0.005, "alpha": 0.9, "momentum": 0.5},
]


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: o["name"])
def test_each_optimizer_trains(tmp_path: Path, optimizer: dict[str, Any]) -> None:
    result, sink, _ = run(tmp_path, optimizer=optimizer)
    losses = sink.series("train_loss")
    assert losses[-1] < 0.6 * losses[0], losses
    assert result["val_accuracy"] > 0.6


SCHEDULES = [
    {"name": "constant", "warmup_epochs": 1},
    {"name": "step", "step_epochs": 3, "gamma": 0.5, "warmup_epochs": 0.5},
    {"name": "cosine", "min_lr_ratio": 0.1, "warmup_epochs": 2},
    {"name": "onecycle", "max_lr": 0.05, "pct_start": 0.25},
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s["name"])
def test_each_schedule_trains_and_logs_its_lr(tmp_path: Path, schedule: dict[str, Any]) -> None:
    spec = spec_of(schedule=schedule, optimizer={"name": "adam", "lr": 0.01})
    result, sink, _ = run(tmp_path, schedule=schedule, optimizer={"name": "adam", "lr": 0.01})
    losses = sink.series("train_loss")
    assert losses[-1] < 0.6 * losses[0], losses
    # The logged lr is the one the epoch's last update used: lr_at of that step.
    steps_per_epoch = math.ceil(result["num_train_samples"] / 16)
    expected = [
        lr_at(e * steps_per_epoch - 1, spec.schedule, 0.01, steps_per_epoch, 8 * steps_per_epoch)
        for e in range(1, 9)
    ]
    assert sink.series("lr") == pytest.approx(expected)


def schedule(**data: Any) -> Any:
    return spec_of(schedule=data, epochs=10).schedule


def test_warmup_ramps_linearly_from_about_zero() -> None:
    s = schedule(name="constant", warmup_epochs=2)  # 2 epochs of 10 steps: 20 warmup steps
    lrs = [lr_at(i, s, 1.0, 10, 100) for i in range(25)]
    assert lrs[0] == pytest.approx(1 / 21)
    assert all(b > a for a, b in zip(lrs[:20], lrs[1:20], strict=False))
    assert lrs[19] == pytest.approx(20 / 21) and lrs[20:] == [1.0] * 5
    # Fractions of an epoch count too: 0.5 epochs of 10 steps = 5 steps.
    half = schedule(name="constant", warmup_epochs=0.5)
    assert lr_at(4, half, 1.0, 10, 100) < 1.0 == lr_at(5, half, 1.0, 10, 100)


def test_step_schedule_decays_by_gamma_every_step_epochs() -> None:
    s = schedule(name="step", step_epochs=3, gamma=0.1)
    assert [lr_at(e * 10, s, 1.0, 10, 100) for e in range(10)] == pytest.approx(
        [1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001]
    )
    assert lr_at(29, s, 1.0, 10, 100) == 1.0  # changes at the epoch boundary, not before


def test_cosine_ends_at_min_lr_ratio() -> None:
    s = schedule(name="cosine", min_lr_ratio=0.2, warmup_epochs=1)
    lrs = [lr_at(i, s, 2.0, 10, 100) for i in range(100)]
    assert lrs[9] == pytest.approx(2.0 * 10 / 11) and lrs[10] == pytest.approx(2.0)
    assert all(b <= a for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[-1] == pytest.approx(0.4)
    assert lrs[55] == pytest.approx(0.4 + 1.6 * 0.5 * (1 + math.cos(math.pi * 45 / 89)))


def test_onecycle_peaks_at_max_lr() -> None:
    s = schedule(name="onecycle", max_lr=0.5, pct_start=0.3)
    lrs = [lr_at(i, s, 0.1, 10, 101) for i in range(101)]
    peak = max(range(101), key=lrs.__getitem__)
    assert lrs[peak] == pytest.approx(0.5) and peak == 30
    assert lrs[0] == pytest.approx(0.5 / 25)
    assert lrs[-1] == pytest.approx(0.5 / 25 / 1e4)
    # No max_lr: the optimizer's lr is the peak.
    default = schedule(name="onecycle")
    assert max(lr_at(i, default, 0.1, 10, 101) for i in range(101)) == pytest.approx(0.1)


# ---------------------------------------------------------------- losses and regularization


def test_label_smoothing_changes_the_loss(tmp_path: Path) -> None:
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    target = torch.tensor([0, 1])
    smooth = spec_of(loss={"name": "cross_entropy", "label_smoothing": 0.2}).loss
    assert build_loss(smooth, "classification")(logits, target) == pytest.approx(
        float(F.cross_entropy(logits, target, label_smoothing=0.2))
    )
    assert float(build_loss(None, "classification")(logits, target)) < float(
        build_loss(smooth, "classification")(logits, target)
    )
    fast = {"name": "adam", "lr": 0.02}
    plain, _, _ = run(tmp_path, "plain", optimizer=fast)
    smoothed, _, _ = run(tmp_path, "smooth", optimizer=fast,
                         loss={"name": "cross_entropy", "label_smoothing": 0.2})  # fmt: skip
    assert smoothed["train_loss"] != plain["train_loss"]
    # Smoothed targets keep the loss away from 0 even when the classes are learned.
    assert smoothed["val_loss"] > plain["val_loss"] + 0.1


def test_regression_losses_take_n_by_1_outputs() -> None:
    out, target = torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 1.0])
    mse = build_loss(
        spec_of(dataset={"name": "synthetic_regression"}, loss="mse").loss, "regression"
    )
    l1 = build_loss(spec_of(dataset={"name": "synthetic_regression"}, loss="l1").loss, "regression")
    assert float(mse(out, target)) == pytest.approx((1 + 4) / 2)  # not broadcast to (2, 2)
    assert float(l1(out, target)) == pytest.approx((1 + 2) / 2)
    assert float(build_loss(None, "regression")(out, target)) == pytest.approx(2.5)


def test_l1_penalty_shrinks_the_weights(tmp_path: Path) -> None:
    def l1_norm(directory: Path) -> float:
        state = weights(directory)
        return sum(float(v.abs().sum()) for k, v in state.items() if v.ndim >= 2)

    _, _, none = run(tmp_path, "none", epochs=4, optimizer={"name": "adam", "lr": 0.01})
    _, _, l1 = run(tmp_path, "l1", epochs=4, optimizer={"name": "adam", "lr": 0.01},
                   regularization={"l1": 0.01})  # fmt: skip
    assert l1_norm(l1) < 0.8 * l1_norm(none)
    # Biases are not penalized: only matrices/kernels are.
    model = initial_model(spec_of())
    assert {id(p) for p in penalized_parameters(model)} == {
        id(p) for n, p in model.named_parameters() if n.endswith("weight")
    }


def test_grad_clipping_bounds_the_update(tmp_path: Path) -> None:
    # One full-batch plain-SGD step: the update is lr * grad, so its norm <= lr * clip.
    common = {"epochs": 1, "batch_size": 1024, "optimizer": {"name": "sgd", "lr": 1.0}}
    _, _, clipped = run(tmp_path, "clipped", grad_clip_norm=0.01, **common)
    _, _, free = run(tmp_path, "free", **common)
    start = initial_model(spec_of(**common)).state_dict()

    def update_norm(directory: Path) -> float:
        after = weights(directory)
        return math.sqrt(sum(float((after[k] - start[k]).pow(2).sum()) for k in start))

    assert update_norm(clipped) <= 0.01 * (1 + 1e-4)
    assert update_norm(clipped) == pytest.approx(0.01, rel=1e-3)  # the gradient was larger
    assert update_norm(free) > 0.05


def test_grad_accumulation_matches_the_bigger_batch(tmp_path: Path) -> None:
    # Digits: 1149 training samples, so the last window is short (3 full batches of 8
    # and one of 5), which the per-window weighting must get right too.
    common = {"dataset": {"name": "digits"}, "epochs": 2, "model": TINY_MLP,
              "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}}  # fmt: skip
    big, _, big_dir = run(tmp_path, "big", batch_size=32, **common)
    acc, _, acc_dir = run(tmp_path, "acc", batch_size=8, grad_accum_steps=4, **common)
    for key, value in weights(big_dir).items():
        torch.testing.assert_close(weights(acc_dir)[key], value, rtol=1e-4, atol=1e-5)
    assert acc["train_loss"] == pytest.approx(big["train_loss"], rel=1e-4)
    assert acc["val_loss"] == pytest.approx(big["val_loss"], rel=1e-4)
    assert acc["steps"] == 4 * big["steps"]  # batches: 144 per epoch vs 36


# ---------------------------------------------------------------- early stopping and best.pt


def test_early_stopping_stops_after_patience_and_keeps_the_best(tmp_path: Path) -> None:
    # min_delta 10 on val_loss: only the first epoch counts as an improvement.
    result, sink, directory = run(
        tmp_path, epochs=20, early_stopping={"metric": "val_loss", "patience": 2, "min_delta": 10.0}
    )
    assert result["stopped_early"] is True
    assert result["epochs_run"] == 3 and len(sink.series("val_loss")) == 3
    assert (result["best_epoch"], result["best_metric"]) == (1, "val_loss")
    assert result["best_metric_value"] == sink.series("val_loss")[0]
    best, last = load_checkpoint(directory / "best.pt"), load_checkpoint(directory / "last.pt")
    assert best["epoch"] == 1 and last["epoch"] == 3 and last["stopped_early"] is True
    assert not torch.equal(best["model"]["1.weight"], last["model"]["1.weight"])


def test_best_checkpoint_follows_a_max_metric(tmp_path: Path) -> None:
    result, sink, directory = run(
        tmp_path, epochs=6, early_stopping={"metric": "val_accuracy", "patience": 100}
    )
    accuracies = sink.series("val_accuracy")
    best_epoch = accuracies.index(max(accuracies)) + 1  # the first epoch reaching the max
    assert result["best_epoch"] == best_epoch and result["best_metric_value"] == max(accuracies)
    assert result["stopped_early"] is False and result["epochs_run"] == 6
    assert load_checkpoint(directory / "best.pt")["epoch"] == best_epoch


def test_checkpoint_every_n_epochs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[tuple[int, list[str]]] = []
    original = CheckpointWriter.submit

    def spy(self: CheckpointWriter, path: Path, payload: dict[str, Any], *, also: Any = ()) -> None:
        written.append((payload["epoch"], sorted(p.name for p in (path, *also))))
        original(self, path, payload, also=also)

    monkeypatch.setattr(CheckpointWriter, "submit", spy)
    # lr 0.02: val_loss improves every epoch, so best.pt is written every epoch too.
    result, _, directory = run(tmp_path, epochs=7, checkpoint_every_epochs=3,
                               optimizer={"name": "adam", "lr": 0.02})  # fmt: skip
    assert result["best_epoch"] == 7
    both, best = ["best.pt", "last.pt"], ["best.pt"]
    assert written == [(1, best), (2, best), (3, both), (4, best), (5, best), (6, both), (7, both)]
    # best.pt and last.pt written together are one file under two names, and stay
    # separate files once last.pt is replaced.
    assert (directory / "best.pt").stat().st_ino == (directory / "last.pt").stat().st_ino
    _, _, stopped = run(tmp_path, "stopped", epochs=8, checkpoint_every_epochs=3,
                        early_stopping={"metric": "val_loss", "patience": 1, "min_delta": 10.0})  # fmt: skip
    best_ckpt, last_ckpt = (load_checkpoint(stopped / f"{w}.pt") for w in ("best", "last"))
    assert (best_ckpt["epoch"], last_ckpt["epoch"]) == (1, 2)


# ---------------------------------------------------------------- regression


def test_regression_job_reports_mse_mae_r2(tmp_path: Path) -> None:
    result, sink, _ = run(
        tmp_path,
        dataset={
            "name": "synthetic_regression",
            "params": {"num_samples": 1000, "num_features": 8},
        },
        model={"name": "mlp", "params": {"hidden": 64}},
        optimizer={"name": "adam", "lr": 0.003},
        epochs=10,
        batch_size=32,
    )
    for key in ("train_loss", "val_loss", "val_mse", "val_mae", "val_r2", "lr"):
        assert len(sink.series(key)) == 10, key
    assert "val_accuracy" not in result
    assert result["val_r2"] > 0.5
    assert result["val_mse"] == pytest.approx(result["val_loss"], rel=1e-5)  # loss is mse
    assert result["val_mae"] > 0 and result["best_metric"] == "val_loss"


def test_metric_functions_match_scikit_learn() -> None:
    from sklearn.metrics import f1_score, mean_absolute_error, precision_score, r2_score

    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (200,), generator=gen)
    pred = torch.where(
        torch.rand(200, generator=gen) < 0.7, y, torch.randint(0, 4, (200,), generator=gen)
    )
    pred[pred == 3] = 2  # class 3 never predicted: zero_division=0
    got = classification_metrics(y, pred, 4)
    assert got["precision"] == pytest.approx(
        precision_score(y, pred, average="macro", zero_division=0)
    )
    assert got["f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    target, out = torch.randn(100, generator=gen), torch.randn(100, generator=gen)
    reg = regression_metrics(target, out)
    assert reg["r2"] == pytest.approx(r2_score(target, out))
    assert reg["mae"] == pytest.approx(mean_absolute_error(target, out))


# ---------------------------------------------------------------- precision and compile


def test_bf16_is_accepted_and_a_no_op_on_cpu(tmp_path: Path) -> None:
    fp32, _, fp32_dir = run(tmp_path, "fp32", epochs=2)
    for precision in ("bf16", "fp16"):
        other, _, other_dir = run(tmp_path, precision, epochs=2, precision=precision)
        assert other["val_loss"] == fp32["val_loss"]
        assert load_checkpoint(other_dir / "last.pt")["scaler"] is None  # no GradScaler on CPU
    assert load_checkpoint(fp32_dir / "last.pt")["scaler"] is None


def test_compile_runs_the_compiled_module_and_saves_the_plain_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Inductor's C++ codegen takes ~10 s on 2 cores; the "eager" backend still goes
    # through torch.compile's wrapper (the wiring under test) and takes well under 1 s.
    calls = []
    real = torch.compile

    def compile_eager(model: torch.nn.Module, **kwargs: Any) -> Any:
        calls.append(model)
        return real(model, backend="eager", **kwargs)

    plain, _, _ = run(tmp_path, "plain", epochs=3)
    monkeypatch.setattr(torch, "compile", compile_eager)
    result, _, directory = run(tmp_path, "compiled", epochs=3, compile=True)
    assert len(calls) == 1
    # The checkpoint holds the module's own names, not the wrapper's "_orig_mod." ones.
    assert set(weights(directory)) == set(initial_model(spec_of()).state_dict())
    assert result["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-5)


@pytest.mark.skipif(
    not os.environ.get("TRAINYARD_SLOW_TESTS"),
    reason="inductor compile takes ~10-20 s on 2 cores; set TRAINYARD_SLOW_TESTS=1",
)
def test_compile_with_inductor_on_cpu(tmp_path: Path) -> None:
    result, _, _ = run(tmp_path, epochs=2, compile=True, precision="bf16")
    assert math.isfinite(result["val_loss"])
