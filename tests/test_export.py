"""worker/training/export.py: state_dict, torch.export (.pt2) and ONNX files of tiny
trained models, each loaded back and compared with the model, and the model card.

Exporting an LSTM/GRU or a Transformer works the same way but the ONNX exporter takes
5-10 s for each on one core; those were checked by hand (issue 16's notes)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from shared.spec import ExportSpec, parse_spec  # noqa: E402
from tests.derive_helpers import CNN, CPU, DIGITS, MLP, PATHS, train_source  # noqa: E402
from worker.training import UserError  # noqa: E402
from worker.training import export as export_module  # noqa: E402
from worker.training.datasets import load_dataset  # noqa: E402
from worker.training.derive import export_job  # noqa: E402
from worker.training.export import export_model, model_card  # noqa: E402
from worker.training.model_file import load_model_file  # noqa: E402
from worker.training.models import build_model  # noqa: E402


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("export")
    mlp = train_source(root / "mlp", MLP, DIGITS, epochs=1)
    loaded = load_model_file(mlp)
    spec = loaded.train_spec
    splits = load_dataset(
        "digits", spec.dataset.params, spec.dataset.val_fraction, "scale", CPU,
        stats=loaded.stats, paths=PATHS,
    )  # fmt: skip
    return SimpleNamespace(
        mlp=mlp, cnn=train_source(root / "cnn", CNN, DIGITS, epochs=1), loaded=loaded, splits=splits
    )


def _card(loaded: object) -> dict:
    return model_card(
        loaded.train_spec.model_dump(mode="json"),  # type: ignore[attr-defined]
        loaded.info,  # type: ignore[attr-defined]
        loaded.stats,  # type: ignore[attr-defined]
        {"accuracy": 0.9},
    )


def test_all_three_formats_load_back_and_agree(sources: SimpleNamespace, tmp_path: Path) -> None:
    loaded, val = sources.loaded, sources.splits.val
    model = loaded.model
    example = val.x[:50]
    results = export_model(
        model, example, tmp_path, _card(loaded), ["state_dict", "torch_export", "onnx"], 1e-4,
        rebuild=lambda: build_model(loaded.train_spec.model, loaded.info),
    )  # fmt: skip
    assert set(results) == {"state_dict", "torch_export", "onnx"}
    for fmt, r in results.items():
        assert r["max_abs_diff"] <= 1e-4, fmt
        assert r["size_bytes"] == sum((tmp_path / f).stat().st_size for f in r["files"]) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.onnx", "model.pt2", "model_card.json", "state_dict.pt",
    ]  # fmt: skip

    # Any batch size: the files were traced on 2 samples and checked on 50; here 7.
    x = val.x[50:57]
    with torch.inference_mode():
        expected = model(x)
        program = torch.export.load(tmp_path / "model.pt2").module()
        assert torch.allclose(program(x), expected, atol=1e-5)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    (out,) = session.run(None, {name: x.numpy()})
    assert out.shape == (7, 10)
    assert torch.allclose(torch.from_numpy(out), expected, atol=1e-5)
    state = torch.load(tmp_path / "state_dict.pt", weights_only=True)
    assert set(state) == set(model.state_dict())

    card = json.loads((tmp_path / "model_card.json").read_text())
    assert card["spec"]["model"]["name"] == "mlp" and card["spec"]["kind"] == "train"
    assert card["input"] == {"shape": ["batch", 1, 8, 8], "dtype": "float32"}
    assert card["tolerance"] == 1e-4 and card["metrics"] == {"accuracy": 0.9}
    assert card["task"] == "classification" and card["num_classes"] == 10
    assert card["class_names"] is None  # DatasetInfo carries no class names
    norm = card["normalization"]
    assert norm["formula"] == "(x - shift) / scale"
    assert norm["scale"] == loaded.stats["scale"].tolist()  # digits: pixels / 16
    assert card["formats"]["onnx"]["file"] == "model.onnx"


def test_a_difference_over_the_tolerance_fails_naming_the_format(
    sources: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = export_module._state_dict

    def off_by_a_bit(*args: object) -> tuple[torch.Tensor, list[Path]]:
        out, files = real(*args)  # type: ignore[arg-type]
        return out + 1e-3, files

    monkeypatch.setattr(export_module, "_state_dict", off_by_a_bit)
    with pytest.raises(UserError, match=r"state_dict export differs .* up to 0\.001.* 0\.0001"):
        export_model(
            sources.loaded.model, sources.splits.val.x[:8], tmp_path, {}, ["state_dict"], 1e-4
        )
    assert not (tmp_path / "model_card.json").exists()


def test_export_job_writes_the_formats_asked_for(sources: SimpleNamespace, tmp_path: Path) -> None:
    spec = parse_spec({"kind": "export", "source_job_id": 1, "formats": ["onnx", "torch_export"]})
    assert isinstance(spec, ExportSpec)
    result = export_job(spec, sources.cnn, tmp_path, CPU, paths=PATHS)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.onnx", "model.pt2", "model_card.json",
    ]  # fmt: skip
    for fmt in ("onnx", "torch_export"):
        assert 0 <= result[f"{fmt}_max_abs_diff"] <= spec.tolerance
        assert result[f"{fmt}_size_bytes"] == (tmp_path / export_module.FILES[fmt]).stat().st_size
    assert "state_dict_size_bytes" not in result
    for key in ("size_bytes", "num_parameters", "nonzero_fraction", "latency_ms", "accuracy", "f1"):
        assert key in result
    assert result["num_samples"] == 360 and result["split"] == "test"
    card = json.loads((tmp_path / "model_card.json").read_text())
    assert card["metrics"]["accuracy"] == result["accuracy"]
    assert card["derived_from"]["file"] == "best.pt"
    assert card["input"]["shape"] == ["batch", 1, 8, 8]
