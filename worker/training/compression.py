"""Pruning and int8 dynamic quantization of a zoo model.

Pruning uses torch.nn.utils.prune: a pruned weight becomes `weight_orig * weight_mask`,
recomputed before each forward, so fine-tuning after `prune_model` keeps the zeros;
`make_permanent` folds the masks in, leaving plain weights (zeros and all) that load
into a freshly built model.

Quantization is eager-mode dynamic int8 (torch.ao.quantization.quantize_dynamic):
int8 weights, activations quantized per batch on the fly, fbgemm kernels on x86 CPUs.
Why not torchao: /work/notes/issue16_quantize_findings.md (its int8 path runs slower
than float on CPU in eager mode, and it has no LSTM/GRU).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as qdynamic
from torch.nn.utils import prune

PRUNE_SCOPES = ("global", "layer")
# Layers whose weights are pruned, and those dynamic quantization turns into int8.
PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LSTM, nn.GRU)
QUANTIZABLE_TYPES = (nn.Linear, nn.LSTM, nn.GRU)
# Layers with weight matrices that stay float after quantize_model (said in its result).
FLOAT_WEIGHT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Embedding, nn.MultiheadAttention)
_CONV = (nn.Conv1d, nn.Conv2d)
_RNN = (nn.LSTM, nn.GRU)
QUANTIZED_METHOD = "dynamic_int8"


# ---------------------------------------------------------------- pruning


def prunable_weights(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(module name, module, parameter name) of every weight `prune_model` prunes.

    Linear layers inside nn.MultiheadAttention are left out: attention reads
    `out_proj.weight` directly instead of calling out_proj, so the pruning hook (which
    runs on a module's own forward) would never refresh it during fine-tuning.
    """
    attention = {
        id(m)
        for mha in model.modules()
        if isinstance(mha, nn.MultiheadAttention)
        for m in mha.modules()
    }
    out: list[tuple[str, nn.Module, str]] = []
    for name, module in model.named_modules():
        if id(module) in attention or not isinstance(module, PRUNABLE_TYPES):
            continue
        if isinstance(module, _RNN):
            out += [
                (name, module, pname)
                for pname in _rnn_weight_names(module)
                if pname.startswith("weight_")
            ]
        else:
            out.append((name, module, "weight"))
    return out


def _rnn_weight_names(module: nn.Module) -> list[str]:
    # weight_ih_l0 (or, once pruned, weight_ih_l0_orig): the names torch keeps in order.
    return list(module._flat_weights_names)  # type: ignore[arg-type]


def sparsity(model: nn.Module) -> float:
    """The fraction of zeros over the prunable weights (masked or permanent)."""
    zeros = total = 0
    for _, module, pname in prunable_weights(model):
        weight = getattr(module, pname)
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros / total if total else 0.0


def prune_model(
    model: nn.Module, sparsity_target: float, scope: str = "global", structured: bool = False
) -> dict[str, float | int]:
    """Zero `sparsity_target` of the prunable weights by L1 magnitude, in place.

    scope "global": the smallest weights of the whole model (one threshold for all);
    "layer": that fraction of each weight tensor. `structured` (layer scope only):
    conv layers lose whole output channels (smallest L2 norm, rounded to whole
    channels), the other layers are pruned unstructured per layer.

    The masks stay on (fine-tuning keeps the zeros); call `make_permanent` after.
    Returns what was done: achieved sparsity, tensors pruned, weights counted.
    """
    if not 0 < sparsity_target < 1:
        raise ValueError(f"sparsity must be between 0 and 1, got {sparsity_target}")
    if scope not in PRUNE_SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose one of: {', '.join(PRUNE_SCOPES)}")
    if structured and scope == "global":
        raise ValueError("structured pruning ranks channels within a layer; use scope 'layer'")
    targets = prunable_weights(model)
    if not targets:
        raise ValueError("the model has no prunable layers (Linear, Conv, LSTM, GRU)")
    channels = 0
    if scope == "global":
        prune.global_unstructured(
            [(module, pname) for _, module, pname in targets],
            pruning_method=prune.L1Unstructured,
            amount=sparsity_target,
        )
    else:
        for _, module, pname in targets:
            if structured and isinstance(module, _CONV):
                prune.ln_structured(module, pname, amount=sparsity_target, n=2, dim=0)
                mask = getattr(module, f"{pname}_mask")
                channels += int((mask.flatten(1).sum(dim=1) == 0).sum())
            else:
                prune.l1_unstructured(module, pname, amount=sparsity_target)
    return {
        "sparsity_achieved": sparsity(model),
        "pruned_tensors": len(targets),
        "prunable_weights": sum(getattr(m, p).numel() for _, m, p in targets),
        "pruned_channels": channels,
    }


def _pruning_hooks(model: nn.Module) -> Iterator[tuple[nn.Module, prune.BasePruningMethod]]:
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                yield module, hook


def make_permanent(model: nn.Module) -> None:
    """Fold every pruning mask into its weight: no `*_orig`/`*_mask` left, in place."""
    for module, hook in list(_pruning_hooks(model)):
        prune.remove(module, hook._tensor_name)


# ---------------------------------------------------------------- quantization


@contextlib.contextmanager
def quiet_quantization() -> Iterator[None]:
    """Silence the deprecation notices of torch.ao.quantization (and of creating and
    loading quantized tensors): it is still the one CPU int8 path with LSTM/GRU and
    fast kernels on this torch (see the module docstring); every job would log them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao\.")
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions")
        warnings.filterwarnings("ignore", message=r".*TypedStorage is deprecated")
        yield


def quantize_model(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """An int8 dynamic-quantized copy of `model` (CPU, eval mode) and the names of the
    layers that became int8: Linear, LSTM and GRU. Conv, Embedding and attention
    projections stay float (`float_layer_names`). `model` itself is not changed.

    Only layers of exactly those types are swapped: nn.MultiheadAttention's out_proj is
    a Linear subclass that attention calls through its weight, and torch keeps it float.
    """
    float_model = copy.deepcopy(model).cpu().eval()
    with quiet_quantization():
        qmodel = torch.ao.quantization.quantize_dynamic(
            float_model, set(QUANTIZABLE_TYPES), dtype=torch.qint8
        )
    for module in qmodel.modules():
        if isinstance(module, nn.TransformerEncoderLayer) and any(
            _is_quantized_layer(m) for m in module.modules()
        ):
            module.register_forward_pre_hook(_off_the_fused_path)
    return qmodel, quantized_layer_names(qmodel)


def _off_the_fused_path(_module: nn.Module, _args: Any) -> None:
    """A no-op hook that keeps a Transformer encoder layer with int8 Linear layers off
    torch's fused inference path: that path reads `linear1.weight` as a tensor (an int8
    Linear's is a method: it fails) and has no int8 kernel. A layer with hooks takes
    the regular path, which calls linear1 and linear2 as modules. The loader rebuilds a
    quantized model through quantize_model, so the hook is there whenever it runs."""
    return None


def quantized_layer_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if _is_quantized_layer(m)]


def float_layer_names(model: nn.Module) -> list[str]:
    """Layers whose weight matrices are float in `model` (after quantize_model: the
    ones int8 dynamic quantization does not cover)."""
    inside_attention = {
        id(m)
        for mha in model.modules()
        if isinstance(mha, nn.MultiheadAttention)
        for m in mha.modules()
        if m is not mha
    }
    return [
        name
        for name, m in model.named_modules()
        if id(m) not in inside_attention
        and (
            isinstance(m, FLOAT_WEIGHT_TYPES)
            or (type(m) in QUANTIZABLE_TYPES and not _is_quantized_layer(m))
        )
    ]


def _is_quantized_layer(module: nn.Module) -> bool:
    return isinstance(module, qdynamic.Linear | qdynamic.LSTM | qdynamic.GRU)


def quantized_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The int8 layers' weights and biases, unpacked as (name, tensor): quantized
    tensors for weights (`.dequantize()` for their values), float biases."""
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, qdynamic.Linear):
            weight, bias = module._weight_bias()
            yield prefix + "weight", weight
            if bias is not None:
                yield prefix + "bias", bias
        elif isinstance(module, qdynamic.LSTM | qdynamic.GRU):
            parts = module._weight_bias()
            for key, tensor in {**parts["weight"], **parts["bias"]}.items():
                if tensor is not None:
                    yield prefix + key, tensor
