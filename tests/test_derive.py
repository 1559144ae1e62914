"""worker/training/derive.py (the prune and quantize job bodies), model_file.py and
model_report.py, on tiny models trained on digits and on generated sequences.
The export job is tested in test_export.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from shared.spec import EvaluateSpec, PruneSpec, QuantizeSpec, parse_spec  # noqa: E402
from tests.derive_helpers import (  # noqa: E402
    CNN,
    CPU,
    DIGITS,
    LSTM,
    MLP,
    PATHS,
    SEQUENCES,
    dataset_info,
    train_source,
    train_spec,
)
from worker.training import JobCancelled, ListSink, UserError, evaluate_job  # noqa: E402
from worker.training.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from worker.training.datasets import Split  # noqa: E402
from worker.training.derive import export_job, prune_job, quantize_job  # noqa: E402
from worker.training.model_file import load_model_file  # noqa: E402
from worker.training.model_report import measure  # noqa: E402
from worker.training.models import build_model  # noqa: E402

MEASURED = ("size_bytes", "num_parameters", "nonzero_fraction", "latency_ms")


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("derive")
    return SimpleNamespace(
        mlp=train_source(root / "mlp", MLP, DIGITS),
        cnn=train_source(root / "cnn", CNN, DIGITS),
        lstm=train_source(root / "lstm", LSTM, SEQUENCES, epochs=3),
    )


def prune_spec(**fields: Any) -> PruneSpec:
    spec = parse_spec({"kind": "prune", "source_job_id": 1, **fields})
    assert isinstance(spec, PruneSpec)
    return spec


def quantize_spec() -> QuantizeSpec:
    spec = parse_spec({"kind": "quantize", "source_job_id": 1})
    assert isinstance(spec, QuantizeSpec)
    return spec


def _before_after_keys(task_keys: tuple[str, ...]) -> set[str]:
    return {f"{when}_{k}" for when in ("before", "after") for k in MEASURED + task_keys}


# ---------------------------------------------------------------- prune


def test_prune_job_writes_a_pruned_model_evaluation_can_read(
    sources: SimpleNamespace, tmp_path: Path
) -> None:
    sink = ListSink()
    result = prune_job(prune_spec(sparsity=0.5), sources.mlp, tmp_path, CPU, paths=PATHS, sink=sink)
    assert _before_after_keys(("accuracy", "f1")) <= set(result)
    assert abs(result["sparsity_achieved"] - 0.5) <= 0.01 and result["sparsity_target"] == 0.5
    assert result["pruned_tensors"] == 2 and result["pruned_channels"] == 0
    assert result["fine_tune_epochs"] == 0 and result["fine_tune_lr"] is None
    assert result["before_nonzero_fraction"] == 1.0
    assert 0.45 <= result["after_nonzero_fraction"] <= 0.55  # biases are not pruned
    assert result["before_num_parameters"] == result["after_num_parameters"]
    assert result["before_accuracy"] >= 0.8 and result["after_accuracy"] >= 0.6
    assert result["num_samples"] == 360 and result["device"] == "cpu"
    assert sink.points == []  # no fine-tuning, nothing per epoch

    ckpt = load_checkpoint(tmp_path / "best.pt")  # weights_only
    assert not any(k.endswith(("_orig", "_mask")) for k in ckpt["model"])
    assert {"format", "model", "spec", "dataset_info", "stats", "epoch"} <= set(ckpt)
    assert ckpt["extra"]["pruning"]["scope"] == "global"
    assert (tmp_path / "last.pt").read_bytes() == (tmp_path / "best.pt").read_bytes()
    loaded = load_model_file(tmp_path / "best.pt")
    assert loaded.derived and loaded.quantized is None and loaded.train_spec.model.name == "mlp"

    # evaluation.py reads it as the train checkpoint of the source's spec.
    spec = parse_spec({"kind": "evaluate", "source_job_id": 1})
    assert isinstance(spec, EvaluateSpec)
    scored = evaluate_job(spec, loaded.train_spec, tmp_path, CPU, paths=PATHS)
    assert scored["accuracy"] == pytest.approx(result["after_accuracy"])


def test_prune_with_fine_tuning_reports_epochs_and_keeps_the_zeros(
    sources: SimpleNamespace, tmp_path: Path
) -> None:
    sink = ListSink()
    spec = prune_spec(sparsity=0.5, scope="layer", structured=True, fine_tune_epochs=2)
    result = prune_job(spec, sources.cnn, tmp_path, CPU, paths=PATHS, sink=sink)
    for key in ("train_loss", "val_loss", "val_accuracy", "val_f1"):
        assert [(p.step, p.epoch) for p in sink.points if p.key == key] == [(1, 1), (2, 2)]
    assert sink.progress_updates and sink.progress_updates[-1]["epoch"] == 2
    assert result["fine_tune_lr"] == pytest.approx(0.001)  # a tenth of the source's 0.01
    assert result["pruned_channels"] == 4 + 8  # half of the 8 and of the 16 conv channels
    assert abs(result["sparsity_achieved"] - 0.5) <= 0.02
    # Half the channels cost this model ~0.25 of its 0.8 accuracy; two epochs win most back.
    assert result["after_accuracy"] >= 0.7
    model = load_model_file(tmp_path / "best.pt").model
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [int((c.weight.flatten(1).abs().sum(1) == 0).sum()) for c in convs] == [4, 8]

    # A pruned model is a source like any other: prune it further.
    again = prune_job(prune_spec(sparsity=0.8), tmp_path / "best.pt", tmp_path / "again", CPU,
                      paths=PATHS, sink=ListSink())  # fmt: skip
    assert abs(again["sparsity_achieved"] - 0.8) <= 0.01
    assert again["before_nonzero_fraction"] == pytest.approx(result["after_nonzero_fraction"])


def test_prune_fine_tuning_stops_when_asked(sources: SimpleNamespace, tmp_path: Path) -> None:
    with pytest.raises(JobCancelled):
        prune_job(prune_spec(sparsity=0.5, fine_tune_epochs=3), sources.mlp, tmp_path, CPU,
                  paths=PATHS, sink=ListSink(), should_stop=lambda: True)  # fmt: skip
    assert not (tmp_path / "best.pt").exists()


def test_prune_lstm_with_fine_tuning(sources: SimpleNamespace, tmp_path: Path) -> None:
    spec = prune_spec(sparsity=0.5, fine_tune_epochs=1)
    result = prune_job(spec, sources.lstm, tmp_path, CPU, paths=PATHS, sink=ListSink())
    assert abs(result["sparsity_achieved"] - 0.5) <= 0.01
    assert result["pruned_tensors"] == 3  # weight_ih_l0, weight_hh_l0, the classifier
    assert result["num_samples"] == 80 and result["dataset"] == "synthetic_sequences"
    load_model_file(tmp_path / "best.pt")


# ---------------------------------------------------------------- quantize


@pytest.mark.parametrize("name", ["mlp", "lstm"])
def test_quantize_job_writes_a_smaller_int8_model(
    sources: SimpleNamespace, tmp_path: Path, name: str
) -> None:
    result = quantize_job(quantize_spec(), getattr(sources, name), tmp_path, CPU, paths=PATHS)
    assert _before_after_keys(("accuracy", "f1")) <= set(result)
    assert result["quantized_layers"] == 2
    assert result["float_layers"] == (0 if name == "mlp" else 1)  # the LSTM's embedding
    assert result["after_size_bytes"] < 0.75 * result["before_size_bytes"]
    assert result["after_num_parameters"] == result["before_num_parameters"]
    assert abs(result["after_accuracy"] - result["before_accuracy"]) <= 0.05
    assert result["after_latency_ms"] > 0 and result["before_latency_ms"] > 0

    loaded = load_model_file(tmp_path / "model.pt")
    assert loaded.quantized == "dynamic_int8"
    assert loaded.extra["quantized_layers"] == (
        ["1", "3"] if name == "mlp" else ["rnn", "classifier"]
    )
    assert (tmp_path / "model.pt").stat().st_size < getattr(sources, name).stat().st_size
    again = measure(loaded.model, _test_split(loaded), task="classification",
                    num_classes=loaded.info.num_classes, batch_size=256)  # fmt: skip
    assert again["accuracy"] == result["after_accuracy"]

    with pytest.raises(UserError, match="already quantized"):
        quantize_job(quantize_spec(), tmp_path / "model.pt", tmp_path / "q2", CPU, paths=PATHS)
    with pytest.raises(UserError, match="quantized"):
        prune_job(prune_spec(sparsity=0.5), tmp_path / "model.pt", tmp_path / "p", CPU,
                  paths=PATHS, sink=ListSink())  # fmt: skip
    export = parse_spec({"kind": "export", "source_job_id": 1})
    with pytest.raises(UserError, match="dynamic quantization"):
        export_job(export, tmp_path / "model.pt", tmp_path / "e", CPU, paths=PATHS)  # type: ignore[arg-type]


def _test_split(loaded: Any) -> Split:
    from worker.training.datasets import load_dataset

    spec = loaded.train_spec
    return load_dataset(
        spec.dataset.name, spec.dataset.params, spec.dataset.val_fraction, "none", CPU,
        stats=loaded.stats, paths=PATHS,
    ).test  # fmt: skip


# ---------------------------------------------------------------- files and measurements


def test_bad_source_files_are_user_errors(sources: SimpleNamespace, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_model_file(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read"):
        load_model_file(tmp_path / "junk.pt")
    ckpt = load_checkpoint(sources.mlp)
    ckpt["model"] = {k: v[..., :1] for k, v in ckpt["model"].items()}
    save_checkpoint(tmp_path / "shrunk.pt", ckpt)
    with pytest.raises(UserError, match="does not fit"):
        load_model_file(tmp_path / "shrunk.pt")


def test_measure_reports_costs_and_scores() -> None:
    spec = train_spec(MLP, {"name": "synthetic_regression"})
    info = dataset_info({"name": "synthetic_regression"})
    model = build_model(spec.model, info)
    gen = torch.Generator().manual_seed(0)
    split = Split(torch.randn(40, *info.input_shape, generator=gen), torch.randn(40, generator=gen))
    out = measure(model, split, task="regression", num_classes=0, batch_size=16, repeats=3)
    assert set(out) == {*MEASURED, "r2", "mse", "mae"}
    assert out["latency_ms"] > 0 and out["size_bytes"] > 0
    assert out["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert out["nonzero_fraction"] == 1.0 and out["mse"] > 0
