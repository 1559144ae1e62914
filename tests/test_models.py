"""The model zoo: shapes, seeding, learning, torch.compile, and the submission checks.

Everything runs on CPU with tiny widths; the whole file takes a few seconds.
"""

from __future__ import annotations

import os
import shutil
import warnings
from types import SimpleNamespace
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from shared.dataset_catalog import DatasetInfo  # noqa: E402
from shared.model_catalog import (  # noqa: E402
    ACTIVATIONS,
    MODELS,
    CNNParams,
    MLPParams,
    ResNetParams,
    RNNParams,
    TransformerParams,
)
from shared.spec import SpecError, parse_spec  # noqa: E402
from worker.training.models import BUILDERS, build_model, count_parameters  # noqa: E402
from worker.training.models.activations import MODULES  # noqa: E402
from worker.training.models.resnet import BasicBlock  # noqa: E402

VOCAB = 20
CLASSES = 4


def image(c: int, h: int, w: int, task: str = "classification") -> DatasetInfo:
    classes = CLASSES if task == "classification" else 0
    return DatasetInfo(f"img{c}x{h}x{w}", "image", task, (c, h, w), classes, 64, 16)


def table(features: int, task: str = "classification") -> DatasetInfo:
    classes = CLASSES if task == "classification" else 0
    return DatasetInfo("table", "tabular", task, (features,), classes, 64, 16)


def tokens(seq_len: int, vocab: int = VOCAB) -> DatasetInfo:
    return DatasetInfo("tokens", "sequence", "classification", (seq_len,), CLASSES, 64, 16, vocab)


def spec(name: str, **params: Any) -> SimpleNamespace:
    """What build_model reads from shared.spec's model specs: a name and its params."""
    return SimpleNamespace(name=name, params=MODELS[name].params(**params))


def inputs(info: DatasetInfo, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if info.kind == "sequence":
        return torch.randint(0, info.vocab_size or 1, (n, *info.input_shape), generator=g)
    return torch.randn((n, *info.input_shape), generator=g)


def accepted(name: str, params: Any, info: DatasetInfo) -> bool:
    return MODELS[name].problems(params, info) == {}


# Tiny versions of each model family, so every test stays fast.
TINY: dict[str, dict[str, Any]] = {
    "mlp": {"hidden": 16, "layers": 2},
    "cnn": {"channels": 4, "hidden": 16, "dropout": 0.0},
    "resnet": {"depth": 8, "width": 4},
    "lstm": {"embedding_dim": 8, "hidden": 16},
    "gru": {"embedding_dim": 8, "hidden": 16},
    "transformer": {"d_model": 16, "heads": 2, "layers": 1, "ff_dim": 32, "dropout": 0.0},
}
DATA: dict[str, DatasetInfo] = {
    "mlp": table(6),
    "cnn": image(1, 8, 8),
    "resnet": image(3, 8, 8),
    "lstm": tokens(8),
    "gru": tokens(8),
    "transformer": tokens(8),
}


def test_every_catalog_model_has_a_builder() -> None:
    assert set(BUILDERS) == set(MODELS)


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown model 'vgg'.*mlp.*transformer"):
        build_model(SimpleNamespace(name="vgg", params=None), image(1, 8, 8))


def test_wrong_input_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="cnn takes image data"):
        build_model(spec("cnn"), table(4))


@pytest.mark.parametrize(
    ("name", "info"),
    [
        ("mlp", image(1, 8, 8)),
        ("mlp", image(3, 32, 32)),
        ("mlp", table(13)),
        ("cnn", image(1, 8, 8)),
        ("cnn", image(3, 32, 32)),
        ("resnet", image(1, 8, 8)),
        ("resnet", image(3, 32, 32)),
        ("lstm", tokens(10)),
        ("gru", tokens(10)),
        ("transformer", tokens(10)),
    ],
)
def test_output_shape(name: str, info: DatasetInfo) -> None:
    model = build_model(spec(name, **TINY[name]), info)
    assert model(inputs(info, 5)).shape == (5, CLASSES)


@pytest.mark.parametrize(
    ("name", "info"),
    [("mlp", table(7, "regression")), ("mlp", image(1, 8, 8, "regression")),
     ("cnn", image(1, 8, 8, "regression")), ("resnet", image(3, 8, 8, "regression"))],
)  # fmt: skip
def test_regression_head_has_one_output(name: str, info: DatasetInfo) -> None:
    model = build_model(spec(name, **TINY[name]), info)
    assert model(inputs(info, 3)).shape == (3, 1)


def test_mlp_regression_fits_a_batch() -> None:
    info = table(5, "regression")
    torch.manual_seed(0)
    model = build_model(spec("mlp", hidden=32, activation="tanh"), info)
    x = inputs(info, 32)
    y = x[:, 0] - 2 * x[:, 1] ** 2
    losses = _fit(model, x, lambda out: F.mse_loss(out.squeeze(1), y), steps=50)
    assert losses[-1] < 0.2 * losses[0]


@pytest.mark.parametrize("name", list(TINY))
def test_same_seed_same_initial_weights(name: str) -> None:
    def weights(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return build_model(spec(name, **TINY[name]), DATA[name]).state_dict()

    a, b, c = weights(0), weights(0), weights(1)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def _fit(
    model: nn.Module, x: torch.Tensor, loss_of: Any, steps: int, lr: float = 1e-2
) -> list[float]:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = loss_of(model(x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", list(TINY))
def test_loss_drops_on_a_batch_it_can_memorize(name: str) -> None:
    torch.manual_seed(0)
    info = DATA[name]
    model = build_model(spec(name, **TINY[name]), info)
    x = inputs(info, 16)
    y = torch.arange(16) % CLASSES
    losses = _fit(model, x, lambda out: F.cross_entropy(out, y), steps=40)
    assert losses[-1] < 0.25 * losses[0], losses[::10]


@pytest.mark.parametrize(
    ("depth", "blocks"), [(8, 3), (14, 6), (20, 9), (32, 15), (44, 21), (56, 27), (18, 8), (34, 16)]
)
def test_resnet_depth(depth: int, blocks: int) -> None:
    model = build_model(spec("resnet", depth=depth, width=4), image(3, 8, 8))
    residual = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(residual) == blocks
    # Depth counts the weighted layers on the main path: stem, two convs a block, the classifier.
    shortcut_convs = sum(
        len([c for c in b.shortcut.modules() if isinstance(c, nn.Conv2d)]) for b in residual
    )
    weighted = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weighted) - shortcut_convs == depth
    # Each residual branch starts at zero, so the block starts as (ReLU of) its shortcut.
    assert all(torch.count_nonzero(b.bn2.weight) == 0 for b in residual)


@pytest.mark.parametrize(("depth", "width", "expected"), [(20, 16, 272_474), (18, 64, 11_173_962)])
def test_resnet_parameter_counts(depth: int, width: int, expected: int) -> None:
    # ResNet-20 is ~0.27M in He et al. (their option A shortcuts have no weights; these
    # are 1x1 projections); ResNet-18 with a 3x3 stem on CIFAR is the usual 11.17M.
    cifar10 = DatasetInfo("cifar10", "image", "classification", (3, 32, 32), 10, None, None)
    model = build_model(spec("resnet", depth=depth, width=width), cifar10)
    assert count_parameters(model) == expected


def test_cnn_defaults_keep_the_digits_layout() -> None:
    model = build_model(
        spec("cnn"), DatasetInfo("digits", "image", "classification", (1, 8, 8), 10, 1, 1)
    )
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d",
                     "Flatten", "Linear", "ReLU", "Dropout", "Linear"]  # fmt: skip
    assert count_parameters(model) == 320 + 18_496 + 64 * 2 * 2 * 128 + 128 + 1290


def test_bidirectional_rnn_reads_both_directions_final_states() -> None:
    torch.manual_seed(0)
    model = build_model(
        spec("gru", embedding_dim=4, hidden=5, bidirectional=True, layers=2), tokens(6)
    )
    x = inputs(tokens(6), 3)
    out, _ = model.rnn(model.embedding(x))
    features: list[torch.Tensor] = []
    model.classifier.register_forward_hook(lambda _m, args, _out: features.append(args[0]))
    model.eval()
    model(x)
    # forward half: after the last token; backward half: after the first token.
    assert torch.allclose(features[0], torch.cat([out[:, -1, :5], out[:, 0, 5:]], dim=1))


# ---------------------------------------------------------------- activations

# What each TINY model computed before `activation` was a param (commit 52fb85e): its
# parameter count and the first logits of one training-mode forward pass on
# inputs(DATA[name], 3) after torch.manual_seed(0). The default must still build this
# model, so that earlier jobs rerun and earlier checkpoints load and score the same.
BEFORE_ACTIVATIONS: dict[str, tuple[int, list[float]]] = {
    "mlp": (452, [0.073593, -0.229898, 0.154499, 0.045061]),
    "cnn": (932, [0.261615, 0.048229, 0.174807, -0.282765]),
    "resnet": (5112, [-0.436739, -0.439849, -0.18938, 0.186198]),
    "lstm": (1892, [-0.125817, -0.180189, -0.06551, 0.174376]),
    "gru": (1476, [0.305381, 0.392111, -0.113055, -0.263733]),
    "transformer": (2772, [0.854905, 0.504556, -1.512298, 0.499299]),
}
# The RNNs' head had no activation, so their default is None; the others used ReLU.
DEFAULT_ACTIVATION = {"mlp": "relu", "cnn": "relu", "resnet": "relu",
                      "lstm": None, "gru": None, "transformer": "relu"}  # fmt: skip


def test_every_activation_has_a_module() -> None:
    assert set(MODULES) == set(ACTIVATIONS)


@pytest.mark.parametrize("name", list(TINY))
def test_default_activation_builds_the_model_as_before(name: str) -> None:
    assert MODELS[name].params().activation == DEFAULT_ACTIVATION[name]  # type: ignore[attr-defined]
    params, first_logits = BEFORE_ACTIVATIONS[name]
    torch.manual_seed(0)
    model = build_model(spec(name, **TINY[name]), DATA[name])
    assert count_parameters(model) == params
    out = model(inputs(DATA[name], 3))
    torch.testing.assert_close(out.flatten()[:4], torch.tensor(first_logits), atol=1e-5, rtol=0)


def _activation_modules(model: nn.Module) -> set[type[nn.Module]]:
    kinds = set(MODULES.values())
    found = {type(m) for m in model.modules() if type(m) in kinds}
    # nn.TransformerEncoderLayer keeps its activation as a plain attribute too.
    found |= {
        type(m.activation) for m in model.modules() if isinstance(m, nn.TransformerEncoderLayer)
    }
    return found


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("name", list(TINY))
def test_each_family_trains_a_step_with_each_activation(name: str, activation: str) -> None:
    info = DATA[name]
    torch.manual_seed(0)
    model = build_model(spec(name, **TINY[name], activation=activation), info)
    assert _activation_modules(model) == {MODULES[activation]}
    # No activation has weights: the same parameters, under the same state-dict keys.
    torch.manual_seed(0)
    default = build_model(spec(name, **TINY[name]), info)
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in default.state_dict().items()
    }
    x, y = inputs(info, 4), torch.arange(4) % CLASSES
    out = model(x)
    assert out.shape == (4, CLASSES) and torch.isfinite(out).all()
    # The activation is wired in: the same weights compute something else.
    if activation != DEFAULT_ACTIVATION[name]:
        assert not torch.allclose(out, default(x))
    before = [p.detach().clone() for p in model.parameters()]
    losses = _fit(model, x, lambda logits: F.cross_entropy(logits, y), steps=1)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(map(torch.isfinite, map(torch.tensor, losses)))


@pytest.mark.parametrize("name", list(TINY))
def test_an_unknown_activation_names_the_field(name: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(
            {"kind": "train", "dataset": {"name": "digits"},
             "model": {"name": name, "params": {"activation": "swish"}}}
        )  # fmt: skip
    assert "model.params.activation" in info.value.fields
    assert "relu" in info.value.fields["model.params.activation"]


# ---------------------------------------------------------------- the submission checks


def _cnn_cases() -> list[tuple[CNNParams, DatasetInfo]]:
    cases = []
    for blocks in range(1, 6):
        side = 2**blocks  # the smallest image _check_cnn accepts
        for k in (1, 3, 5, 7):
            for h, w in ((side, side), (side + 1, side + 3)):
                if k <= min(h, w):
                    params = CNNParams(
                        channels=2, hidden=4, blocks=blocks, kernel_size=k, batch_norm=k == 3
                    )
                    cases.append((params, image(2, h, w)))
    return cases


def _resnet_cases() -> list[tuple[ResNetParams, DatasetInfo]]:
    cases = []
    for depth in (8, 56, 18, 34):
        side = 8 if depth in (18, 34) else 4  # the smallest image _check_resnet accepts
        for h, w in ((side, side), (side + 1, side + 2)):
            cases.append((ResNetParams(depth=depth, width=4, dropout=0.1), image(1, h, w)))
    return cases


def _sequence_cases() -> list[tuple[str, Any, DatasetInfo]]:
    cases: list[tuple[str, Any, DatasetInfo]] = []
    for name in ("lstm", "gru"):
        for layers in (1, 3):
            for bidirectional in (False, True):
                params = RNNParams(
                    embedding_dim=2,
                    hidden=2,
                    layers=layers,
                    bidirectional=bidirectional,
                    dropout=0.2,
                )
                cases.append((name, params, tokens(2, vocab=4)))
    for d_model, heads in ((8, 1), (8, 8), (12, 3), (12, 6)):
        for pooling in ("mean", "cls"):
            params = TransformerParams(
                d_model=d_model, heads=heads, ff_dim=8, layers=2, pooling=pooling
            )
            cases.append(("transformer", params, tokens(2, vocab=4)))
    return cases


EDGE_CASES: list[tuple[str, Any, DatasetInfo]] = [
    ("mlp", MLPParams(hidden=1, layers=1), table(1)),
    ("mlp", MLPParams(hidden=3, layers=3, dropout=0.5, activation="gelu"), image(1, 1, 1)),
    ("mlp", MLPParams(hidden=3, activation="tanh"), table(2, "regression")),
    *(("cnn", p, i) for p, i in _cnn_cases()),
    ("cnn", CNNParams(channels=2, hidden=2, blocks=2), image(1, 4, 4, "regression")),
    *(("resnet", p, i) for p, i in _resnet_cases()),
    ("resnet", ResNetParams(depth=20, width=4), image(3, 5, 4, "regression")),
    *_sequence_cases(),
]


@pytest.mark.parametrize(
    ("name", "params", "info"), EDGE_CASES, ids=[f"{n}-{i.input_shape}" for n, _, i in EDGE_CASES]
)
def test_every_accepted_edge_spec_trains(name: str, params: Any, info: DatasetInfo) -> None:
    """Whatever passes the submission checks builds and runs forward and backward."""
    assert accepted(name, params, info)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. nn.LSTM's "dropout with one layer" warning
        model = build_model(SimpleNamespace(name=name, params=params), info)
        # Batches of 2: BatchNorm in training mode cannot normalize one value per channel.
        out = model(inputs(info, 2))
        assert out.shape == (2, info.output_dim)
        out.sum().backward()
        assert all(p.grad is not None for p in model.parameters())
        model.eval()
        with torch.no_grad():
            assert model(inputs(info, 1)).shape == (1, info.output_dim)


@pytest.mark.parametrize(
    ("name", "params", "info", "would_fail"),
    [
        # Pools a 7-pixel side below one pixel.
        ("cnn", CNNParams(blocks=3), image(1, 7, 8), True),
        # An even kernel with k//2 padding grows the image by one: the dense layer mismatches.
        ("cnn", CNNParams(kernel_size=4), image(1, 6, 6), True),
        # Attention splits d_model into equal heads.
        ("transformer", TransformerParams(d_model=10, heads=4), tokens(4), True),
        ("mlp", MLPParams(), tokens(4), True),
        ("lstm", RNNParams(), image(1, 8, 8), True),
        # Policy rather than necessity: these would run, on images too small to mean much.
        ("cnn", CNNParams(kernel_size=5, blocks=1), image(1, 4, 4), False),
        ("resnet", ResNetParams(depth=20), image(1, 3, 8), False),
        ("resnet", ResNetParams(depth=18), image(1, 8, 7), False),
    ],
)
def test_checks_refuse(name: str, params: Any, info: DatasetInfo, would_fail: bool) -> None:
    assert not accepted(name, params, info)
    if would_fail:
        with warnings.catch_warnings(), pytest.raises((ValueError, RuntimeError, AssertionError)):
            warnings.simplefilter("ignore")  # e.g. "zero-element tensors" on the way to the error
            build_model(SimpleNamespace(name=name, params=params), info)(inputs(info, 2))


# ---------------------------------------------------------------- torch.compile

COMPILE_CASES = ["mlp", "cnn", "resnet", "transformer"]


@pytest.mark.parametrize("name", COMPILE_CASES)
def test_traces_as_one_graph(name: str) -> None:
    """No data-dependent Python control flow: Dynamo captures forward and backward whole.

    aot_eager runs Dynamo and AOTAutograd without generating C++, so this stays fast.
    """
    info = DATA[name]
    params = {**TINY[name], **({"batch_norm": True} if name == "cnn" else {})}
    torch.manual_seed(0)
    model = build_model(spec(name, **params), info)
    x = inputs(info, 4)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(x).sum().backward()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_recurrent_models_run_under_compile(name: str) -> None:
    # Dynamo leaves nn.LSTM/GRU to eager mode (torch._dynamo.config.allow_rnn is off).
    model = build_model(spec(name, **TINY[name], layers=2, bidirectional=True), DATA[name])
    x = inputs(DATA[name], 4)
    torch.compile(model, backend="aot_eager")(x).sum().backward()


# Inductor generates and compiles C++: ~15 s with a cold cache on 2 cores, too slow for
# every run. The aot_eager tests above cover tracing; this covers code generation.
@pytest.mark.skipif(
    os.environ.get("TRAINYARD_TEST_INDUCTOR") != "1", reason="set TRAINYARD_TEST_INDUCTOR=1 (slow)"
)
@pytest.mark.skipif(
    not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")),
    reason="inductor needs a C++ compiler",
)
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_inductor_compiles_a_small_model() -> None:
    torch.manual_seed(0)
    model = build_model(spec("mlp", hidden=8, layers=1), table(4))
    x = inputs(table(4), 8)
    expected = model(x)
    compiled = torch.compile(model, mode=None)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, expected)
