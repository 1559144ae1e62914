"""The submission-time estimate (shared/job_estimate.py, the size formulas in
shared/model_catalog.py) held to the real thing: each family's module as the worker
builds it, torch's own gradients and optimizer state after a step, and what autograd
saves for one batch.

Everything runs on CPU with small widths; the whole file takes a few seconds.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

from shared.dataset_catalog import DatasetInfo  # noqa: E402
from shared.job_estimate import (  # noqa: E402
    FLOAT_BYTES,
    data_bytes,
    estimate_train,
    optimizer_state_values,
)
from shared.model_catalog import MODELS  # noqa: E402
from shared.spec import TrainSpec, parse_spec  # noqa: E402
from worker.training.models import build_model, count_parameters  # noqa: E402
from worker.training.optimizers import build_optimizer  # noqa: E402


def image(c: int, h: int, w: int, classes: int = 10) -> DatasetInfo:
    task = "classification" if classes else "regression"
    return DatasetInfo(f"img{c}x{h}x{w}", "image", task, (c, h, w), classes, 200, 50)


def table(features: int, classes: int = 3) -> DatasetInfo:
    task = "classification" if classes else "regression"
    return DatasetInfo(f"tab{features}", "tabular", task, (features,), classes, 200, 50)


def tokens(seq_len: int, vocab: int, classes: int = 4) -> DatasetInfo:
    return DatasetInfo(
        f"seq{seq_len}", "sequence", "classification", (seq_len,), classes, 200, 50, vocab
    )


# (model, params, dataset): every family, its defaults first, then the knobs that change
# its shape (layers, widths, kernels, batch norm, depths, directions, pooling).
CASES: list[tuple[str, dict[str, Any], DatasetInfo]] = [
    ("mlp", {}, table(4)),
    ("mlp", {}, image(1, 8, 8)),
    ("mlp", {"hidden": 300, "layers": 4, "dropout": 0.3}, image(3, 16, 16)),
    ("mlp", {"hidden": 64, "layers": 1, "activation": "gelu"}, table(13, classes=0)),
    ("mlp", {"hidden": 96, "layers": 3, "activation": "tanh", "dropout": 0.1}, table(30, 2)),
    ("cnn", {}, image(1, 8, 8)),
    ("cnn", {}, image(3, 32, 32)),
    ("cnn", {"channels": 8, "blocks": 3, "kernel_size": 5, "batch_norm": True}, image(3, 32, 32)),
    ("cnn", {"channels": 4, "blocks": 1, "hidden": 16, "kernel_size": 1}, image(1, 9, 7, 0)),
    ("cnn", {"channels": 6, "blocks": 4, "kernel_size": 7, "dropout": 0.0}, image(4, 17, 33)),
    ("resnet", {}, image(3, 32, 32)),
    ("resnet", {"depth": 8, "width": 4}, image(1, 8, 8)),
    ("resnet", {"depth": 14, "width": 8, "dropout": 0.2}, image(3, 15, 15, 0)),
    ("resnet", {"depth": 18, "width": 4}, image(3, 32, 32)),
    ("resnet", {"depth": 34, "width": 4}, image(1, 16, 16)),
    ("lstm", {}, tokens(32, 64)),
    ("lstm", {"hidden": 48, "layers": 2, "bidirectional": True}, tokens(16, 100)),
    ("lstm", {"embedding_dim": 8, "hidden": 20, "layers": 3, "dropout": 0.2}, tokens(12, 30)),
    ("gru", {}, tokens(32, 64)),
    ("gru", {"hidden": 64, "layers": 3, "bidirectional": True, "dropout": 0.1}, tokens(16, 100)),
    ("gru", {"embedding_dim": 16, "hidden": 8}, tokens(40, 500, classes=7)),
    ("transformer", {}, tokens(32, 64)),
    ("transformer", {"d_model": 32, "heads": 2, "layers": 3, "ff_dim": 64, "pooling": "cls"},
     tokens(20, 50)),
    ("transformer", {"d_model": 128, "heads": 8, "layers": 2, "ff_dim": 512}, tokens(64, 50)),
    ("transformer", {"d_model": 24, "heads": 3, "layers": 1, "ff_dim": 8, "dropout": 0.0},
     tokens(9, 1000, classes=2)),
    # Activations have no weights; those not applied in place keep more (the ResNet's).
    ("mlp", {"hidden": 32, "activation": "sigmoid"}, table(6)),
    ("cnn", {"channels": 4, "hidden": 16, "activation": "silu"}, image(1, 8, 8)),
    ("cnn", {"channels": 4, "blocks": 3, "batch_norm": True, "activation": "leaky_relu"},
     image(3, 16, 16)),
    ("resnet", {"depth": 8, "width": 4, "activation": "gelu"}, image(3, 16, 16)),
    ("resnet", {"depth": 18, "width": 4, "activation": "leaky_relu"}, image(3, 16, 16)),
    ("resnet", {"depth": 14, "width": 8, "activation": "tanh"}, image(1, 15, 15, 0)),
    ("lstm", {"hidden": 48, "layers": 2, "bidirectional": True, "activation": "tanh"},
     tokens(16, 100)),
    ("gru", {"layers": 2, "activation": "relu", "dropout": 0.2}, tokens(20, 64)),
    ("transformer", {"d_model": 32, "heads": 4, "layers": 2, "ff_dim": 64, "activation": "gelu"},
     tokens(20, 50)),
    ("transformer", {"d_model": 16, "heads": 2, "layers": 1, "ff_dim": 32, "activation": "sigmoid"},
     tokens(12, 40)),
]  # fmt: skip
FAMILIES = {"mlp", "cnn", "resnet", "lstm", "gru", "transformer"}
OPTIMIZERS: list[dict[str, Any]] = [
    {"name": "adam"},
    {"name": "adamw"},
    {"name": "sgd"},
    {"name": "sgd", "momentum": 0.9, "nesterov": True},
    {"name": "adagrad"},
    {"name": "rmsprop"},
    {"name": "rmsprop", "momentum": 0.5},
]
BATCH = 8


def case_id(case: tuple[str, dict[str, Any], DatasetInfo]) -> str:
    model, params, info = case
    knobs = ",".join(f"{k}={v}" for k, v in params.items()) or "defaults"
    return f"{model}[{knobs}]-{'x'.join(map(str, info.input_shape))}"


def spec_for(
    model: str, params: dict[str, Any], optimizer: dict[str, Any] | None = None
) -> TrainSpec:
    spec = parse_spec(
        {
            "kind": "train",
            "dataset": {"name": "digits"},  # only the info passed in matters
            "model": {"name": model, "params": params},
            "optimizer": optimizer or {"name": "adam"},
            "batch_size": BATCH,
        }
    )
    assert isinstance(spec, TrainSpec)
    return spec


def batch_for(info: DatasetInfo, n: int = BATCH) -> Any:
    if info.kind == "sequence":
        assert info.vocab_size
        return torch.randint(0, info.vocab_size, (n, *info.input_shape))
    return torch.randn(n, *info.input_shape)


def saved_activation_bytes(model: Any, x: Any) -> int:
    """Bytes of the tensors autograd keeps for backward during one forward pass, counted
    once per storage, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: Any) -> Any:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())


def test_every_family_is_covered() -> None:
    assert set(MODELS) == FAMILIES
    assert {model for model, _, _ in CASES} == FAMILIES
    for model in FAMILIES:  # the defaults of each are among the cases
        assert any(m == model and not p for m, p, _ in CASES), model


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_parameter_count_is_exact(case: tuple[str, dict[str, Any], DatasetInfo]) -> None:
    model, params, info = case
    spec = spec_for(model, params)
    estimate = estimate_train(spec, info)
    built = build_model(spec.model, info)
    assert estimate.params == count_parameters(built)
    assert estimate.weights == sum(p.numel() * p.element_size() for p in built.parameters())
    # The field a refusal names is one of this model's own params.
    assert estimate.size_field.removeprefix("model.params.") in MODELS[model].params.model_fields


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_activations_are_close_to_what_autograd_saves(
    case: tuple[str, dict[str, Any], DatasetInfo],
) -> None:
    """Every layer's output counted once (shared/model_catalog.py) against the storages
    autograd actually keeps: the estimate may be up to about twice that (an output no
    backward needs still counts), and is never far below it (a small LSTM with dropout
    between layers, at 0.8, is the lowest)."""
    model, params, info = case
    torch.manual_seed(0)
    spec = spec_for(model, params)
    estimate = estimate_train(spec, info)
    saved = saved_activation_bytes(build_model(spec.model, info), batch_for(info))
    assert estimate.batch == BATCH
    ratio = estimate.activations / saved
    assert 0.75 <= ratio <= 2.5, f"estimate {estimate.activations:,} B, autograd kept {saved:,} B"


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: "-".join(map(str, o.values())))
@pytest.mark.parametrize("case", [CASES[2], CASES[7], CASES[11], CASES[16], CASES[22]], ids=case_id)
def test_gradients_and_optimizer_state_match_torchs(
    case: tuple[str, dict[str, Any], DatasetInfo], optimizer: dict[str, Any]
) -> None:
    model, params, info = case
    torch.manual_seed(0)
    spec = spec_for(model, params, optimizer)
    estimate = estimate_train(spec, info)
    built = build_model(spec.model, info)
    opt = build_optimizer(spec.optimizer, built.parameters())
    logits = built(batch_for(info))
    logits.float().pow(2).mean().backward()
    opt.step()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in built.parameters())
    assert estimate.gradients == grads
    # Per-parameter state (the scalar step counters, 4-8 bytes a tensor, are left out).
    state = sum(
        t.numel() * t.element_size()
        for p in built.parameters()
        for t in opt.state[p].values()
        if isinstance(t, torch.Tensor) and t.shape == p.shape
    )
    assert estimate.optimizer_state == state
    assert optimizer_state_values(spec.optimizer) * estimate.weights == state


def test_data_is_the_dataset_on_the_device() -> None:
    # float32 pixels, int64 labels; int64 tokens; float32 regression targets.
    assert data_bytes(image(1, 8, 8)) == 250 * (64 * FLOAT_BYTES + 8)
    assert data_bytes(tokens(32, 64)) == 250 * (32 * 8 + 8)
    assert data_bytes(table(16, classes=0)) == 250 * (16 * FLOAT_BYTES + FLOAT_BYTES)
    unknown = DatasetInfo("cifar10", "image", "classification", (3, 32, 32), 10, None, None)
    assert data_bytes(unknown) == 0


# ---------------------------------------------------------------- monotonic


def bigger(model: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(params, the same with one knob turned up) for each size knob of a family."""
    return {
        "mlp": [({}, {"hidden": 256}), ({}, {"layers": 3}), ({}, {"dropout": 0.5})],
        "cnn": [({}, {"channels": 64}), ({}, {"hidden": 256}), ({}, {"kernel_size": 5}),
                ({}, {"batch_norm": True})],
        "resnet": [({}, {"width": 32}), ({}, {"depth": 32}), ({"depth": 18}, {"depth": 34})],
        "lstm": [({}, {"hidden": 256}), ({}, {"layers": 2}), ({}, {"bidirectional": True}),
                 ({}, {"embedding_dim": 128})],
        "gru": [({}, {"hidden": 256}), ({}, {"layers": 2}), ({}, {"bidirectional": True})],
        "transformer": [({}, {"d_model": 128}), ({}, {"layers": 3}), ({}, {"ff_dim": 256}),
                        ({}, {"heads": 8})],
    }[model]  # fmt: skip


DEFAULT_DATA = {"mlp": image(3, 32, 32), "cnn": image(3, 32, 32), "resnet": image(3, 32, 32),
                "lstm": tokens(32, 64), "gru": tokens(32, 64), "transformer": tokens(32, 64)}  # fmt: skip


@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_the_estimate_grows_with_every_size_knob(model: str) -> None:
    info = DEFAULT_DATA[model]
    for small, large in bigger(model):
        a = estimate_train(spec_for(model, small), info)
        b = estimate_train(spec_for(model, {**small, **large}), info)
        assert b.total_bytes > a.total_bytes, (model, large)
        assert b.params >= a.params and b.activations >= a.activations, (model, large)
    # The batch scales activations alone, linearly.
    spec = spec_for(model, {})
    one = estimate_train(spec.model_copy(update={"batch_size": 1}), info)
    many = estimate_train(spec.model_copy(update={"batch_size": 100}), info)
    assert many.activations == 100 * one.activations
    assert (many.weights, many.gradients, many.optimizer_state) == (
        one.weights, one.gradients, one.optimizer_state,
    )  # fmt: skip
    # ...up to the data's size: a batch never holds more than the training pool.
    huge = estimate_train(spec.model_copy(update={"batch_size": 65536}), info)
    assert huge.batch == info.train_size


def test_optimizers_order_by_the_state_they_keep() -> None:
    info = image(1, 8, 8)
    totals = [
        estimate_train(spec_for("mlp", {}, opt), info).optimizer_state
        for opt in ({"name": "sgd"}, {"name": "sgd", "momentum": 0.9}, {"name": "adam"})
    ]
    assert totals[0] == 0 < totals[1] < totals[2] == 2 * totals[1]
