"""The file of a derived model (pruned, quantized) and the one loader of any model file.

A model file is a checkpoint-shaped dict of plain data, read with weights_only=True:

    format        CHECKPOINT_FORMAT, as a train checkpoint (evaluation.py reads it)
    model_file    MODEL_FILE_VERSION (absent in a train job's own checkpoints)
    model         the state_dict; for a quantized model see below
    spec          the TrainSpec (JSON) of the training the model comes from: it says how
                  to build the module and how its data was prepared
    dataset_info  the DatasetInfo it was trained on, as a dict
    stats         the normalization statistics (CPU tensors; empty: none)
    epoch         the source checkpoint's epoch
    quantized     None, or "dynamic_int8"
    extra         what the job that wrote it records (pruning, quantized layers, ...)

A quantized model is rebuilt as build_model -> quantize_model -> load weights. Its
int8 Linear layers' state_dict entries are plain (int8 tensors, scales); an int8
LSTM/GRU keeps its weights in TorchScript objects that weights_only loading refuses,
so the file holds them unpacked (`<rnn>.weight_ih_l0` as an int8 tensor, the biases as
float) and the loader packs them again with the same quantization settings.
"""

from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as qdynamic

from shared.dataset_catalog import DatasetInfo
from shared.spec import SpecError, TrainSpec, load_stored_spec
from worker.training.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
from worker.training.compression import QUANTIZED_METHOD, quantize_model, quiet_quantization
from worker.training.errors import UserError
from worker.training.models import build_model
from worker.training.train import info_from_checkpoint, read_checkpoint

MODEL_FILE_VERSION = 1
QUANTIZED_METHODS = (QUANTIZED_METHOD,)
# The keys of an int8 LSTM/GRU's unpacked weights, relative to the module.
_RNN_KEY = re.compile(r"(weight|bias)_(ih|hh)_l\d+(_reverse)?")


@dataclass
class LoadedModel:
    model: nn.Module  # CPU, eval mode
    train_spec: TrainSpec
    info: DatasetInfo
    stats: dict[str, torch.Tensor]
    quantized: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    derived: bool = False  # a model file (pruned, quantized), not a train checkpoint


def info_to_dict(info: DatasetInfo) -> dict[str, Any]:
    out = dataclasses.asdict(info)
    out["input_shape"] = list(info.input_shape)
    return out


def plain_state_dict(model: nn.Module) -> dict[str, Any]:
    """model.state_dict() with every int8 LSTM/GRU's packed weights unpacked into
    tensors, so that the dict loads with weights_only=True."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if not isinstance(module, qdynamic.LSTM | qdynamic.GRU):
            continue
        prefix = f"{name}." if name else ""
        for key in [k for k in state if k.startswith(prefix + "_all_weight_values.")]:
            del state[key]
        parts = module._weight_bias()
        for key, tensor in {**parts["weight"], **parts["bias"]}.items():
            state[prefix + key] = tensor
    return state


def _with_metadata(state: dict[str, Any], like: dict[str, Any]) -> OrderedDict[str, Any]:
    """`state` as a state_dict carrying `like`'s `_metadata`: the per-module versions
    load_state_dict passes on. The int8 Linear reads its version from it (without one
    it expects the keys of an older layout), and weights_only loading keeps it."""
    out: OrderedDict[str, Any] = OrderedDict(state)
    metadata = getattr(like, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]
    return out


def save_model_file(
    path: Path,
    model: nn.Module,
    *,
    spec_json: dict[str, Any],
    dataset_info: DatasetInfo,
    stats: dict[str, torch.Tensor],
    quantized: str | None,
    extra: dict[str, Any],
    epoch: int = 0,
    also: Sequence[Path] = (),
) -> None:
    """Write `model` as a model file at `path` (and at each of `also`), atomically.

    `model` must be free of pruning masks (compression.make_permanent) and on the CPU
    for a quantized one. `extra` must be plain data (str, numbers, lists, dicts).
    """
    if quantized is not None and quantized not in QUANTIZED_METHODS:
        raise ValueError(f"unknown quantization {quantized!r}")
    state = plain_state_dict(model)
    if any(k.endswith(("_orig", "_mask")) for k in state):
        raise ValueError("the model still carries pruning masks: call make_permanent first")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_file": MODEL_FILE_VERSION,
        "model": _with_metadata(
            {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()},
            state,
        ),
        "spec": spec_json,
        "dataset_info": info_to_dict(dataset_info),
        "stats": {k: v.detach().cpu() for k, v in stats.items()},
        "epoch": int(epoch),
        "quantized": quantized,
        "extra": extra,
        "torch_version": str(torch.__version__),
    }
    save_checkpoint(Path(path), payload, also=also)


def load_model_file(path: Path, purpose: str = "model") -> LoadedModel:
    """The model in a model file or in a train job's checkpoint (best.pt, last.pt),
    built, loaded, on the CPU and in eval mode. Raises UserError when the file is
    missing, unreadable or does not fit the model its spec describes."""
    path = Path(path)
    with quiet_quantization():
        ckpt = read_checkpoint(path, purpose)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(
            f"{path} has format {ckpt.get('format')}, this worker reads {CHECKPOINT_FORMAT}"
        )
    try:
        spec = load_stored_spec(ckpt["spec"])
    except (KeyError, TypeError, ValueError, SpecError) as exc:
        raise UserError(f"{path} does not record a valid training spec: {exc}") from None
    if not isinstance(spec, TrainSpec):
        raise UserError(f"{path} records a {spec.kind} spec, not the training of a model")
    info = info_from_checkpoint(ckpt)
    if info is None:
        raise UserError(f"{path} does not record the dataset its model was trained on")
    quantized = ckpt.get("quantized")
    if quantized is not None and quantized not in QUANTIZED_METHODS:
        raise UserError(f"{path} holds a model quantized as {quantized!r}, unknown to this worker")
    try:
        model = build_model(spec.model, info)
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from None
    state = ckpt.get("model")
    if not isinstance(state, dict):
        raise UserError(f"{path} holds no model weights")
    try:
        if quantized:
            model = _load_quantized(model, state)
        else:
            model.load_state_dict(state)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise UserError(f"{path} does not fit the model its spec describes: {exc}") from exc
    model.eval()
    return LoadedModel(
        model=model,
        train_spec=spec,
        info=info,
        stats=dict(ckpt.get("stats") or {}),
        quantized=quantized,
        extra=dict(ckpt.get("extra") or {}),
        epoch=int(ckpt.get("epoch", 0)),
        derived="model_file" in ckpt,
    )


def _load_quantized(float_model: nn.Module, state: dict[str, Any]) -> nn.Module:
    qmodel, _ = quantize_model(float_model)
    state = _with_metadata(state, state)
    for name, module in qmodel.named_modules():
        if not isinstance(module, qdynamic.LSTM | qdynamic.GRU):
            continue
        prefix = f"{name}." if name else ""
        mine = {
            k[len(prefix) :]: state.pop(k)
            for k in list(state)
            if k.startswith(prefix) and _RNN_KEY.fullmatch(k[len(prefix) :])
        }
        weights = {k: v for k, v in mine.items() if k.startswith("weight_")}
        if any(w.dtype != torch.qint8 for w in weights.values()):
            raise ValueError(f"{name}: int8 weights expected")
        # Packs them as quantize_dynamic did (the module was just built by it, so its
        # version, and with it reduce_range, is the same).
        with quiet_quantization():
            module.set_weight_bias(mine)
        # The packed objects go back in under their own keys: load_state_dict below
        # then re-assigns them to themselves and checks every other key strictly.
        state.update(module.state_dict(prefix=prefix))
    with quiet_quantization():
        qmodel.load_state_dict(state)
    return qmodel
