"""Export a float model as a state_dict, a torch.export program (.pt2) and ONNX, each
loaded back and checked against the original on real inputs.

Every format takes a batch of any size (a dynamic first dimension): the program is
traced on two samples and checked on all of `example_inputs`, so a batch size baked
in by tracing shows up as a failed check, not in production. onnx, onnxscript and
onnxruntime are imported only here, when an export runs.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.dataset_catalog import DatasetInfo
from shared.spec import EXPORT_FORMATS
from worker.training.errors import UserError

log = logging.getLogger(__name__)

CARD_FILE = "model_card.json"
FILES = {"state_dict": "state_dict.pt", "torch_export": "model.pt2", "onnx": "model.onnx"}
# ONNX keeps weights inside its protobuf up to 2 GiB; past this they go to model.onnx.data.
ONNX_INLINE_MAX_BYTES = 1 << 30
TRACE_BATCH = 2  # 1 would let torch.export specialize the batch dimension to 1


def model_card(
    spec_json: dict[str, Any],
    info: DatasetInfo,
    stats: dict[str, torch.Tensor],
    metrics: dict[str, Any],
) -> dict[str, Any]:
    """What a user of the exported files needs besides the weights: the training spec
    (how to build the module), the data it expects and how to prepare it, its scores.
    export_model adds the input's shape and dtype, the tolerance and the files."""
    normalization = None
    if stats:
        normalization = {
            "formula": "(x - shift) / scale",
            **{k: v.detach().cpu().tolist() for k, v in sorted(stats.items())},
        }
    return {
        "spec": spec_json,
        "dataset": info.name,
        "task": info.task,
        "num_classes": info.num_classes,
        # DatasetInfo has no class names yet: classes are the indices 0..num_classes-1.
        "class_names": getattr(info, "class_names", None),
        "vocab_size": info.vocab_size,
        "output": (
            "logits (N, num_classes); argmax is the class"
            if info.task == "classification"
            else "predictions (N, 1)"
        ),
        "normalization": normalization,
        "metrics": metrics,
        "torch_version": str(torch.__version__),
    }


def export_model(
    model: nn.Module,
    example_inputs: torch.Tensor,
    out_dir: Path,
    card: dict[str, Any],
    formats: Sequence[str],
    tolerance: float,
    *,
    rebuild: Callable[[], nn.Module] | None = None,
) -> dict[str, dict[str, Any]]:
    """Write `formats` of `model` into `out_dir`, plus model_card.json (`card` with the
    input, the tolerance and the files added), and check each.

    Each file is loaded back (the state_dict into `rebuild()`, a fresh module; by
    default a copy of `model`) and run on `example_inputs` (real, prepared validation
    samples); an output further than `tolerance` from the original model's raises
    UserError naming the format and the difference. Returns, per format: file, files
    (all it wrote), size_bytes and max_abs_diff.
    """
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; choose from {EXPORT_FORMATS}")
    if example_inputs.shape[0] == 0:
        raise UserError("no validation samples to check the export against")
    model = model.cpu().eval()
    x = example_inputs.cpu()
    if x.shape[0] < TRACE_BATCH:
        x = x.repeat(TRACE_BATCH, *([1] * (x.dim() - 1)))
    with torch.inference_mode():
        expected = model(x).float()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    results: dict[str, dict[str, Any]] = {}
    for fmt in formats:
        path = out_dir / FILES[fmt]
        if fmt == "state_dict":
            outputs, files = _state_dict(model, x, path, rebuild)
        elif fmt == "torch_export":
            outputs, files = _torch_export(model, x, path)
        else:
            outputs, files = _onnx(model, x, path)
        diff = _max_abs_diff(expected, outputs)
        results[fmt] = {
            "file": path.name,
            "files": [f.name for f in files],
            "size_bytes": sum(f.stat().st_size for f in files),
            "max_abs_diff": diff,
        }
        if not diff <= tolerance:  # also catches NaN
            raise UserError(
                f"{fmt} export differs from the model by up to {diff:.3g} on the validation "
                f"samples, more than the tolerance {tolerance:g}"
            )
        log.info("exported %s: %s", fmt, results[fmt])

    full_card = {
        **card,
        "input": {
            "shape": ["batch", *x.shape[1:]],
            "dtype": str(x.dtype).removeprefix("torch."),
        },
        "tolerance": tolerance,
        "formats": results,
    }
    (out_dir / CARD_FILE).write_text(json.dumps(full_card, indent=2, allow_nan=False) + "\n")
    return results


def _max_abs_diff(expected: torch.Tensor, got: torch.Tensor) -> float:
    if got.shape != expected.shape:
        return math.inf
    return float((got.float() - expected).abs().max()) if expected.numel() else 0.0


def _state_dict(
    model: nn.Module, x: torch.Tensor, path: Path, rebuild: Callable[[], nn.Module] | None
) -> tuple[torch.Tensor, list[Path]]:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, path)
    fresh = rebuild() if rebuild is not None else copy.deepcopy(model)
    fresh.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    fresh.eval()
    with torch.inference_mode():
        return fresh(x), [path]


def _batch_dim() -> Any:
    return torch.export.Dim("batch", min=1, max=1 << 30)


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Exporting an LSTM/GRU warns that its flat weight list was re-assigned while
    tracing (torch's own module, nothing to fix here), and the ONNX exporter logs one
    warning per torchvision operator it skips when torchvision is not installed."""
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*were assigned during export")
            # torch.export.save pickles tree specs through an API torch itself deprecates.
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
            yield
    finally:
        onnx_log.setLevel(level)


def _torch_export(model: nn.Module, x: torch.Tensor, path: Path) -> tuple[torch.Tensor, list[Path]]:
    try:
        with _quiet_export():
            program = torch.export.export(
                model, (x[:TRACE_BATCH],), dynamic_shapes=({0: _batch_dim()},)
            )
    except Exception as exc:  # an unsupported operation or a data-dependent branch
        raise UserError(f"torch.export cannot export this model: {exc}") from exc
    with _quiet_export():
        torch.export.save(program, path)
        loaded = torch.export.load(path)
    with torch.inference_mode():
        return loaded.module()(x), [path]


def _onnx(model: nn.Module, x: torch.Tensor, path: Path) -> tuple[torch.Tensor, list[Path]]:
    import onnxruntime  # worker-only dependency, loaded when an ONNX export runs

    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    external = weight_bytes > ONNX_INLINE_MAX_BYTES
    data_file = path.with_name(path.name + ".data")
    data_file.unlink(missing_ok=True)
    try:
        with _quiet_export():
            torch.onnx.export(
                model,
                (x[:TRACE_BATCH],),
                str(path),
                dynamo=True,
                dynamic_shapes=({0: _batch_dim()},),
                external_data=external,
                verbose=False,
            )
    except Exception as exc:
        raise UserError(f"ONNX export failed for this model: {exc}") from exc
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    (out,) = session.run(None, {name: x.numpy()})
    files = [path] + ([data_file] if data_file.exists() else [])
    return torch.from_numpy(out), files
