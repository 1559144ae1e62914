"""A prediction request's JSON, checked against the model and prepared exactly as the
training prepared its data (worker/training/data/preprocess.py `apply_stats` with the
statistics the model file carries).

Three ways to send rows, one per request:

    {"inputs": [[...], ...]}          every model: each row an array of the model's input
                                      shape, nested ([1][8][8]) or flat (64 numbers);
                                      token ids (integers) for sequence models
    {"images": ["<base64 PNG>", ...]} image models: one PNG per row, of the model's size
                                      and channels (grayscale "L" or "RGB"); pixel values
                                      0..255 map linearly onto the dataset's own pixel
                                      range (digits: 0..16), then the training transform
    {"rows": [{"feature": x, ...}]}   tabular models whose feature names are known (the
                                      bundled sklearn tables; a CSV job that listed its
                                      `features`): every feature, nothing else

Every problem is a ServeError (422, or 400 for a body that is not JSON) naming the
field: `inputs.3: expected 64 numbers, got 63`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from worker.serving.errors import ServeError, invalid
from worker.training.data.preprocess import apply_stats
from worker.training.datasets import PIXEL_MAX
from worker.training.model_file import LoadedModel

FIELDS = ("inputs", "images", "rows")
SKLEARN_TABLES = {"iris": "load_iris", "wine": "load_wine", "breast_cancer": "load_breast_cancer"}
_DATA_URL = "data:image/png;base64,"


@dataclass(frozen=True)
class InputSpec:
    """What a loaded model takes, as the request checks need it."""

    kind: str  # image | tabular | sequence
    shape: tuple[int, ...]  # one sample
    vocab_size: int | None
    pixel_max: float
    features: tuple[str, ...] | None
    stats: dict[str, torch.Tensor]

    @property
    def numbers(self) -> int:
        return math.prod(self.shape)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "shape": list(self.shape),
            "accepts": accepted(self),
        }
        if self.features:
            out["features"] = list(self.features)
        if self.vocab_size:
            out["vocab_size"] = self.vocab_size
        return out


def accepted(spec: InputSpec) -> list[str]:
    fields = ["inputs"]
    if spec.kind == "image" and spec.shape[0] in (1, 3):
        fields.append("images")
    if spec.kind == "tabular" and spec.features:
        fields.append("rows")
    return fields


@functools.lru_cache(maxsize=8)
def _sklearn_features(name: str) -> tuple[str, ...]:
    import sklearn.datasets

    return tuple(str(f) for f in getattr(sklearn.datasets, SKLEARN_TABLES[name])().feature_names)


def feature_names(loaded: LoadedModel) -> tuple[str, ...] | None:
    """The tabular model's feature names in input order, where they are known."""
    if loaded.info.kind != "tabular":
        return None
    name = loaded.train_spec.dataset.name
    names: tuple[str, ...] | None = None
    if name in SKLEARN_TABLES:
        names = _sklearn_features(name)
    elif name == "csv":
        listed = getattr(loaded.train_spec.dataset.params, "features", None)
        names = tuple(listed) if listed else None
    if names is None or len(names) != loaded.info.input_shape[0] or len(set(names)) != len(names):
        return None
    return names


def input_spec(loaded: LoadedModel) -> InputSpec:
    info = loaded.info
    return InputSpec(
        kind=info.kind,
        shape=tuple(info.input_shape),
        vocab_size=info.vocab_size,
        pixel_max=PIXEL_MAX.get(info.name, 255.0),
        features=feature_names(loaded),
        stats=dict(loaded.stats),
    )


# ---------------------------------------------------------------- checks


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", str: "a string", dict: "an object", list: "an array"}.get(
        type(value), type(value).__name__
    )


def _number(value: Any, path: str, spec: InputSpec) -> float | int:
    if spec.kind == "sequence":
        if type(value) is not int:
            raise invalid(path, f"expected a token id (an integer), got {_type_name(value)}")
        if not 0 <= value < (spec.vocab_size or 0):
            raise invalid(path, f"token id {value} is outside 0..{(spec.vocab_size or 1) - 1}")
        return value
    if type(value) not in (int, float):
        raise invalid(path, f"expected a number, got {_type_name(value)}")
    if not math.isfinite(value):
        raise invalid(path, "expected a finite number")
    return value


def _flat_row(row: list[Any], path: str, spec: InputSpec) -> list[float | int]:
    if len(row) != spec.numbers:
        what = "token ids" if spec.kind == "sequence" else "numbers"
        raise invalid(path, f"expected {spec.numbers} {what}, got {len(row)}")
    return [_number(v, f"{path}.{i}", spec) for i, v in enumerate(row)]


def _nested(value: Any, shape: tuple[int, ...], path: str, spec: InputSpec) -> list[Any]:
    if not isinstance(value, list):
        raise invalid(path, f"expected an array of {shape[0]}, got {_type_name(value)}")
    if len(value) != shape[0]:
        inner = "numbers" if len(shape) == 1 else "arrays"
        raise invalid(path, f"expected {shape[0]} {inner}, got {len(value)}")
    if len(shape) == 1:
        return [_number(v, f"{path}.{i}", spec) for i, v in enumerate(value)]
    return [_nested(v, shape[1:], f"{path}.{i}", spec) for i, v in enumerate(value)]


def _rows_list(body: dict[str, Any], field: str, max_rows: int) -> list[Any]:
    rows = body[field]
    if not isinstance(rows, list):
        raise invalid(field, f"expected an array of rows, got {_type_name(rows)}")
    if not rows:
        raise invalid(field, "expected at least one row")
    if len(rows) > max_rows:
        raise invalid(field, f"at most {max_rows} rows per request, got {len(rows)}")
    return rows


def _from_inputs(rows: list[Any], spec: InputSpec) -> np.ndarray:
    dtype = np.int64 if spec.kind == "sequence" else np.float32
    out = np.empty((len(rows), *spec.shape), dtype=dtype)
    for i, row in enumerate(rows):
        path = f"inputs.{i}"
        if not isinstance(row, list):
            raise invalid(path, f"expected an array of the input shape {list(spec.shape)}, "
                                f"got {_type_name(row)}")  # fmt: skip
        if len(spec.shape) > 1 and row and not isinstance(row[0], list):
            out[i] = np.asarray(_flat_row(row, path, spec), dtype=dtype).reshape(spec.shape)
        else:
            out[i] = np.asarray(_nested(row, spec.shape, path, spec), dtype=dtype)
    return out


def _from_rows(rows: list[Any], spec: InputSpec) -> np.ndarray:
    assert spec.features is not None
    wanted = set(spec.features)
    out = np.empty((len(rows), len(spec.features)), dtype=np.float32)
    for i, row in enumerate(rows):
        path = f"rows.{i}"
        if not isinstance(row, dict):
            raise invalid(path, f"expected an object of feature values, got {_type_name(row)}")
        for key in row:
            if key not in wanted:
                raise invalid(f"{path}.{key}", "unknown feature; the model's features are "
                                               + ", ".join(spec.features))  # fmt: skip
        for j, name in enumerate(spec.features):
            if name not in row:
                raise invalid(f"{path}.{name}", "missing")
            out[i, j] = _number(row[name], f"{path}.{name}", spec)
    return out


def _decode_png(text: Any, path: str, spec: InputSpec) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not isinstance(text, str):
        raise invalid(path, f"expected a base64 PNG string, got {_type_name(text)}")
    text = text.removeprefix(_DATA_URL)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(path, "not base64") from None
    channels, height, width = spec.shape
    try:
        image = Image.open(io.BytesIO(raw), formats=["PNG"])
        if image.size != (width, height):
            raise invalid(path, f"{image.size[0]}x{image.size[1]} pixels; the model takes "
                                f"{width}x{height}")  # fmt: skip
        want = "L" if channels == 1 else "RGB"
        if image.mode != want:
            kind = "grayscale (mode L)" if channels == 1 else "RGB"
            raise invalid(path, f"a PNG of mode {image.mode}; the model takes {kind} images")
        image.load()
        pixels = np.asarray(image, dtype=np.float32)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError,
            SyntaxError):  # fmt: skip
        raise invalid(path, "not a readable PNG image") from None
    pixels = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    # PNG's 0..255 onto the dataset's raw pixel range, which the training transform expects.
    return pixels * np.float32(spec.pixel_max / 255.0)


def _from_images(rows: list[Any], spec: InputSpec) -> np.ndarray:
    out = np.empty((len(rows), *spec.shape), dtype=np.float32)
    for i, text in enumerate(rows):
        out[i] = _decode_png(text, f"images.{i}", spec)
    return out


def parse_body(body: Any, spec: InputSpec, max_rows: int) -> torch.Tensor:
    """The request's rows as the model's prepared input batch (N, *shape)."""
    if not isinstance(body, dict):
        raise ServeError(400, "invalid_json", "the body must be a JSON object",
                         {"body": f"expected an object, got {_type_name(body)}"})  # fmt: skip
    given = [f for f in FIELDS if f in body]
    allowed = accepted(spec)
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise invalid(unknown[0], f"unknown field; send one of {', '.join(allowed)}")
    if not given:
        raise invalid("inputs", f"required: send one of {', '.join(allowed)} "
                                f"(input shape {list(spec.shape)})")  # fmt: skip
    if len(given) > 1:
        raise invalid(given[1], f"send only one of {', '.join(given)}")
    field = given[0]
    if field not in allowed:
        why = {
            "images": f"this model takes {spec.kind} inputs, not images",
            "rows": "this model's feature names are unknown; send inputs"
            if spec.kind == "tabular"
            else f"this model takes {spec.kind} inputs, not named features",
        }[field]
        raise invalid(field, why)
    rows = _rows_list(body, field, max_rows)
    if field == "inputs":
        array = _from_inputs(rows, spec)
    elif field == "images":
        array = _from_images(rows, spec)
    else:
        array = _from_rows(rows, spec)
    x = torch.from_numpy(array)
    if spec.kind == "sequence":
        return x
    return apply_stats(x, spec.stats)
