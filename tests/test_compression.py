"""worker/training/compression.py: pruning (masks held, then made permanent) and int8
dynamic quantization, on tiny trained zoo models."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from torch import nn  # noqa: E402

from tests.derive_helpers import (  # noqa: E402
    CNN,
    DIGITS,
    GRU,
    LSTM,
    MLP,
    SEQUENCES,
    dataset_info,
    train_source,
    train_spec,
)
from worker.training.compression import (  # noqa: E402
    float_layer_names,
    make_permanent,
    prunable_weights,
    prune_model,
    quantize_model,
    quantized_weights,
    sparsity,
)
from worker.training.model_file import load_model_file  # noqa: E402
from worker.training.models import build_model  # noqa: E402
from worker.training.train import read_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("compression")
    return SimpleNamespace(
        mlp=train_source(root / "mlp", MLP, DIGITS),
        cnn=train_source(root / "cnn", CNN, DIGITS),
        lstm=train_source(root / "lstm", LSTM, SEQUENCES),
        gru=train_source(root / "gru", GRU, SEQUENCES, epochs=1),
    )


def _load(path: Path) -> nn.Module:
    return load_model_file(path).model


def _digits_batch(n: int = 64) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _tokens(n: int = 32) -> torch.Tensor:
    return torch.randint(0, 16, (n, 12), generator=torch.Generator().manual_seed(0))


def _no_masks(model: nn.Module) -> bool:
    return not any(k.endswith(("_orig", "_mask")) for k in model.state_dict())


# ---------------------------------------------------------------- pruning


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("target", [0.3, 0.8])
def test_unstructured_sparsity_is_within_one_percent(
    sources: SimpleNamespace, name: str, scope: str, target: float
) -> None:
    model = _load(getattr(sources, name))
    done = prune_model(model, target, scope)
    assert abs(done["sparsity_achieved"] - target) <= 0.01
    assert done["pruned_channels"] == 0
    assert done["pruned_tensors"] == len(prunable_weights(model)) == (2 if name == "mlp" else 4)
    assert any(k.endswith("_mask") for k in model.state_dict())  # masks stay on
    if scope == "layer":  # every layer alike, not just the total
        for _, module, pname in prunable_weights(model):
            w = getattr(module, pname)
            assert abs(float((w == 0).float().mean()) - target) <= 0.01

    make_permanent(model)
    assert _no_masks(model)
    assert abs(sparsity(model) - target) <= 0.01
    # Plain weights: they load into a freshly built model.
    fresh = build_model(
        train_spec(MLP if name == "mlp" else CNN, DIGITS).model, dataset_info(DIGITS)
    )
    fresh.load_state_dict(model.state_dict())
    with torch.inference_mode():
        assert torch.equal(fresh.eval()(_digits_batch()), model.eval()(_digits_batch()))


def test_global_scope_ranks_all_layers_together(sources: SimpleNamespace) -> None:
    model = _load(sources.mlp)
    prune_model(model, 0.5, "global")
    per_layer = [float((getattr(m, p) == 0).float().mean()) for _, m, p in prunable_weights(model)]
    # One threshold over the whole model: the layers end up pruned unequally.
    assert max(per_layer) - min(per_layer) > 0.05


def test_structured_pruning_removes_whole_conv_channels(sources: SimpleNamespace) -> None:
    model = _load(sources.cnn)
    done = prune_model(model, 0.5, "layer", structured=True)
    convs = [m for _, m, _ in prunable_weights(model) if isinstance(m, nn.Conv2d)]
    expected_channels = 0
    for conv in convs:
        per_channel = conv.weight.flatten(1).abs().sum(dim=1)
        zero_channels = int((per_channel == 0).sum())
        assert zero_channels == round(0.5 * conv.out_channels)
        # Whole channels or nothing: a channel is all zeros or has no forced zeros.
        assert bool(((per_channel == 0) | (conv.weight.flatten(1) != 0).all(dim=1)).all())
        expected_channels += zero_channels
    assert done["pruned_channels"] == expected_channels == 4 + 8
    # The linear layers are pruned unstructured, so the total is still about the target.
    assert abs(done["sparsity_achieved"] - 0.5) <= 0.02


def test_pruning_refuses_bad_requests(sources: SimpleNamespace) -> None:
    model = _load(sources.mlp)
    with pytest.raises(ValueError, match="scope 'layer'"):
        prune_model(model, 0.5, "global", structured=True)
    with pytest.raises(ValueError, match="between 0 and 1"):
        prune_model(model, 1.0)
    with pytest.raises(ValueError, match="no prunable layers"):
        prune_model(nn.Sequential(nn.ReLU()), 0.5)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_recurrent_weights_are_pruned(sources: SimpleNamespace, name: str) -> None:
    model = _load(getattr(sources, name))
    pruned = {p for _, m, p in prunable_weights(model) if isinstance(m, nn.LSTM | nn.GRU)}
    assert {"weight_ih_l0", "weight_hh_l0"} <= pruned
    done = prune_model(model, 0.6, "global")
    assert abs(done["sparsity_achieved"] - 0.6) <= 0.01
    with torch.inference_mode():
        masked = model.eval()(_tokens())
    make_permanent(model)
    assert _no_masks(model)
    with torch.inference_mode():
        assert torch.allclose(model(_tokens()), masked)
    assert float((model.rnn.weight_hh_l0 == 0).float().mean()) > 0.2


def test_masks_hold_while_fine_tuning(sources: SimpleNamespace) -> None:
    model = _load(sources.mlp).train()
    prune_model(model, 0.7, "layer")
    zeros = {(n, p): getattr(m, p) == 0 for n, m, p in prunable_weights(model)}
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    x, y = _digits_batch(), torch.randint(0, 10, (64,))
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    make_permanent(model)
    for name, module, pname in prunable_weights(model):
        assert bool((getattr(module, pname)[zeros[name, pname]] == 0).all())
    assert abs(sparsity(model) - 0.7) <= 0.01


def test_attention_projections_are_not_pruned() -> None:
    # Attention reads out_proj.weight without calling out_proj: a mask there would never
    # be refreshed, so fine-tuning would train a stale weight (or fail on backward).
    spec = train_spec(
        {"name": "transformer", "params": {"d_model": 16, "heads": 2, "layers": 1, "ff_dim": 32}},
        SEQUENCES,
    )
    model = build_model(spec.model, dataset_info(SEQUENCES))
    names = [n for n, _, _ in prunable_weights(model)]
    assert not any("self_attn" in n for n in names)
    assert "encoder.layers.0.linear1" in names and "classifier" in names
    prune_model(model, 0.5, "global")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # twice: a stale masked weight would fail the second backward
        optimizer.zero_grad()
        model(_tokens()).sum().backward()
        optimizer.step()
    make_permanent(model)
    assert _no_masks(model)


# ---------------------------------------------------------------- quantization


def _bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


@pytest.mark.parametrize(
    ("name", "layers", "batch"),
    [
        ("mlp", ["1", "3"], _digits_batch),
        ("cnn", ["7", "10"], _digits_batch),
        ("lstm", ["rnn", "classifier"], _tokens),
        ("gru", ["rnn", "classifier"], _tokens),
    ],
)
def test_quantize_makes_int8_layers_close_to_float(
    sources: SimpleNamespace, name: str, layers: list[str], batch: object
) -> None:
    model = _load(getattr(sources, name))
    x = batch()  # type: ignore[operator]
    with torch.inference_mode():
        expected = model(x)
    qmodel, quantized = quantize_model(model)
    assert quantized == layers
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the source is untouched
    with torch.inference_mode():
        got = qmodel(x)
    scale = float(expected.abs().max())
    assert float((got - expected).abs().max()) <= 0.05 * scale
    assert float((got.argmax(1) == expected.argmax(1)).float().mean()) >= 0.9
    weights = dict(quantized_weights(qmodel))
    assert all(w.dtype == torch.qint8 for k, w in weights.items() if ".weight" in k)
    if name == "cnn":
        assert float_layer_names(qmodel) == ["0", "3"]  # the convs stay float
        assert _bytes(qmodel) < _bytes(model)
    else:
        assert _bytes(qmodel) < 0.7 * _bytes(model)


def test_quantized_zeros_stay_zero(sources: SimpleNamespace) -> None:
    model = _load(sources.mlp)
    prune_model(model, 0.5, "global")
    make_permanent(model)
    qmodel, _ = quantize_model(model)
    int8 = [w for k, w in quantized_weights(qmodel) if k.endswith("weight")]
    zeros = sum(int((w.int_repr() == 0).sum()) for w in int8)
    total = sum(w.numel() for w in int8)
    assert zeros / total >= 0.5  # symmetric int8: a pruned zero is an exact zero


def test_train_checkpoint_loads_with_weights_only(sources: SimpleNamespace) -> None:
    # The loader accepts a train job's own checkpoint as it is.
    ckpt = read_checkpoint(sources.mlp, "source")
    loaded = load_model_file(sources.mlp)
    assert loaded.derived is False and loaded.quantized is None
    assert loaded.epoch == ckpt["epoch"] and not loaded.model.training
    assert loaded.train_spec.model.name == "mlp" and loaded.info.name == "digits"


def test_quantized_transformer_runs_in_inference_mode() -> None:
    # torch's fused encoder path would read the int8 Linear's weight as a tensor and fail.
    spec = train_spec(
        {"name": "transformer", "params": {"d_model": 16, "heads": 2, "layers": 1, "ff_dim": 32}},
        SEQUENCES,
    )
    model = build_model(spec.model, dataset_info(SEQUENCES)).eval()
    qmodel, quantized = quantize_model(model)
    assert quantized == ["encoder.layers.0.linear1", "encoder.layers.0.linear2", "classifier"]
    assert "encoder.layers.0.self_attn" in float_layer_names(qmodel)
    with torch.inference_mode():
        expected, got = model(_tokens()), qmodel(_tokens())
    assert float((got - expected).abs().max()) <= 0.05 * float(expected.abs().max())
