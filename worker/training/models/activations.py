"""The one mapping from an activation's name (shared/model_catalog.py) to its torch module,
which every model family builds its nonlinearities from."""

from __future__ import annotations

from torch import nn

from shared.model_catalog import IN_PLACE_ACTIVATIONS

# nn.GELU is the exact erf form (approximate="none"), the same function as the "gelu"
# string nn.TransformerEncoderLayer takes; nn.LeakyReLU's slope is torch's 0.01.
MODULES: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
}


def make_activation(name: str, *, inplace: bool = False) -> nn.Module:
    """A fresh module for `name`. `inplace` is honoured only where autograd allows it
    (shared/model_catalog.IN_PLACE_ACTIVATIONS); the others always return a new tensor."""
    module = MODULES[name]
    if inplace and name in IN_PLACE_ACTIVATIONS:
        return module(inplace=True)
    return module()
