"""The datasets a job can name, as metadata: shapes, classes, sizes, parameters, files.

No torch and no data loading here: the server resolves a spec's dataset to a
DatasetInfo to check it against the model and loss at submission, and reads at most
a file header to do so. The worker's loaders live in worker/training/datasets.py.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, ValidationError

from shared.schema_base import CatalogError, NoParams, StrictModel

# Held-out test share for datasets without an official test split.
TEST_FRACTION = 0.2
MAX_SYNTHETIC_VALUES = 200_000_000  # ~800 MB of float32 on the worker
MAX_CSV_CLASSES = 1000
# The most a dataset file may hold once decompressed, unless the settings say otherwise
# (TRAINYARD_MAX_DATASET_FILE_BYTES): the official MNIST training images are 47 MB.
DEFAULT_MAX_DATASET_FILE_BYTES = 1 << 30

if TYPE_CHECKING:
    from shared.orm import Upload


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a loss need to know about one resolved dataset spec."""

    name: str
    kind: str  # image | tabular | sequence
    task: str  # classification | regression
    input_shape: tuple[int, ...]  # per sample; channels first for images, (seq_len,) for tokens
    num_classes: int  # 0 for regression
    train_size: int | None  # train + val pool; None when only the worker can tell
    test_size: int | None
    vocab_size: int | None = None  # token datasets

    @property
    def output_dim(self) -> int:
        return self.num_classes if self.task == "classification" else 1

    def compatible_with(self, other: DatasetInfo) -> str | None:
        """Why a model trained on `other` cannot be scored on self (None if it can)."""
        if (self.kind, self.task) != (other.kind, other.task):
            return f"{self.name!r} is {self.kind} {self.task}, the model was trained on {other.kind} {other.task}"
        if self.input_shape != other.input_shape:
            return f"{self.name!r} has input shape {list(self.input_shape)}, the model expects {list(other.input_shape)}"
        if self.num_classes != other.num_classes:
            return f"{self.name!r} has {self.num_classes} classes, the model predicts {other.num_classes}"
        if (self.vocab_size or 0) > (other.vocab_size or 0):
            return f"{self.name!r} has a larger vocabulary than the model was trained on"
        return None


@dataclass(frozen=True)
class ColumnInfo:
    name: str
    numeric: bool
    distinct: int  # non-empty values, capped at MAX_CSV_CLASSES + 1
    missing: int = 0  # empty cells


@dataclass(frozen=True)
class UploadInfo:
    id: int
    filename: str
    rows: int
    columns: tuple[ColumnInfo, ...]

    def column(self, name: str) -> ColumnInfo | None:
        return next((c for c in self.columns if c.name == name), None)


def upload_info(upload: Upload) -> UploadInfo:
    """What resolution needs of an uploads row (the web's catalogue and the sweep
    controller's, each finding the rows its caller may see)."""
    return UploadInfo(
        id=upload.id,
        filename=upload.filename,
        rows=upload.rows,
        columns=tuple(
            ColumnInfo(c["name"], c["numeric"], c["distinct"], c.get("missing", 0))
            for c in upload.columns
        ),
    )


@dataclass(frozen=True)
class CatalogContext:
    """Where resolution looks for files and uploads (server and worker each build one)."""

    data_dir: Path
    find_upload: Callable[[int], UploadInfo | None] = lambda _id: None
    # TRAINYARD_MAX_DATASET_FILE_BYTES: the largest decompressed dataset file accepted.
    max_file_bytes: int = DEFAULT_MAX_DATASET_FILE_BYTES


# ---------------------------------------------------------------- parameters


class SyntheticImagesParams(StrictModel):
    channels: int = Field(3, ge=1, le=4)
    height: int = Field(32, ge=4, le=256)
    width: int = Field(32, ge=4, le=256)
    num_classes: int = Field(10, ge=2, le=1000)
    num_samples: int = Field(2048, ge=20, le=1_000_000)
    data_seed: int = Field(0, ge=0, le=2**31 - 1, description="the data, not the job: fixed splits")


class SyntheticRegressionParams(StrictModel):
    num_features: int = Field(16, ge=1, le=4096)
    num_samples: int = Field(2048, ge=20, le=5_000_000)
    noise: float = Field(
        0.1, ge=0.0, le=10.0, description="std of the Gaussian noise on the target"
    )
    data_seed: int = Field(0, ge=0, le=2**31 - 1)


class SyntheticSequencesParams(StrictModel):
    seq_len: int = Field(32, ge=2, le=2048)
    vocab_size: int = Field(64, ge=4, le=100_000)
    num_classes: int = Field(4, ge=2, le=1000)
    num_samples: int = Field(2048, ge=20, le=1_000_000)
    data_seed: int = Field(0, ge=0, le=2**31 - 1)


class CsvParams(StrictModel):
    upload_id: int = Field(ge=1, description="id from POST /api/v1/uploads")
    target: str = Field(min_length=1, description="the column to predict")
    task: Literal["classification", "regression"] = "classification"
    features: list[str] | None = Field(
        None, description="input columns; default: every numeric column but the target"
    )


# ---------------------------------------------------------------- resolvers


def _fixed(
    name: str, kind: str, shape: tuple[int, ...], classes: int, samples: int
) -> Callable[..., DatasetInfo]:
    test = math.ceil(samples * TEST_FRACTION)

    def resolve(_params: BaseModel, _ctx: CatalogContext) -> DatasetInfo:
        return DatasetInfo(name, kind, "classification", shape, classes, samples - test, test)

    return resolve


def _split_sizes(n: int) -> tuple[int, int]:
    test = math.ceil(n * TEST_FRACTION)
    return n - test, test


def _synthetic_images(p: SyntheticImagesParams, _ctx: CatalogContext) -> DatasetInfo:
    if p.channels * p.height * p.width * p.num_samples > MAX_SYNTHETIC_VALUES:
        raise CatalogError(
            "dataset.params.num_samples",
            f"too large: at most {MAX_SYNTHETIC_VALUES:,} values in all",
        )
    train, test = _split_sizes(p.num_samples)
    shape = (p.channels, p.height, p.width)
    return DatasetInfo(
        "synthetic_images", "image", "classification", shape, p.num_classes, train, test
    )


def _synthetic_regression(p: SyntheticRegressionParams, _ctx: CatalogContext) -> DatasetInfo:
    if p.num_features * p.num_samples > MAX_SYNTHETIC_VALUES:
        raise CatalogError(
            "dataset.params.num_samples",
            f"too large: at most {MAX_SYNTHETIC_VALUES:,} values in all",
        )
    train, test = _split_sizes(p.num_samples)
    return DatasetInfo(
        "synthetic_regression", "tabular", "regression", (p.num_features,), 0, train, test
    )


def _synthetic_sequences(p: SyntheticSequencesParams, _ctx: CatalogContext) -> DatasetInfo:
    if p.seq_len * p.num_samples > MAX_SYNTHETIC_VALUES:
        raise CatalogError(
            "dataset.params.num_samples",
            f"too large: at most {MAX_SYNTHETIC_VALUES:,} tokens in all",
        )
    train, test = _split_sizes(p.num_samples)
    return DatasetInfo(
        "synthetic_sequences",
        "sequence",
        "classification",
        (p.seq_len,),
        p.num_classes,
        train,
        test,
        p.vocab_size,
    )


IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def find_idx_file(directory: Path, stem: str) -> Path | None:
    """The official name, gzipped or not."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


_GZIP_MAGIC = b"\x1f\x8b"


def data_file_name(path: Path) -> str:
    """How a message names a dataset file: relative to the data directory
    (`mnist/train-images-idx3-ubyte.gz`), never the server's absolute path."""
    return f"{path.parent.name}/{path.name}"


@dataclass(frozen=True)
class IdxHeader:
    dims: tuple[int, ...]
    header_bytes: int  # magic + dimensions
    data_bytes: int  # the product of dims, a Python int: it cannot overflow

    @property
    def total_bytes(self) -> int:
        return self.header_bytes + self.data_bytes


def open_idx(path: Path) -> Any:
    """The file's decompressed byte stream (gzip when the name ends in .gz)."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115


def parse_idx_header(f: Any, path: Path, max_bytes: int) -> IdxHeader:
    """Read and check the header at the start of stream `f` (magic 0x0000_08_nd:
    unsigned bytes). ValueError says what is wrong: not IDX, truncated, or dimensions
    whose data would exceed `max_bytes`, checked before any data is read."""
    name = data_file_name(path)
    magic = f.read(4)
    if len(magic) != 4 or magic[:2] != b"\x00\x00":
        raise ValueError(f"{name} is not an IDX file (bad magic number)")
    if magic[2] != 0x08:
        raise ValueError(f"{name}: IDX data type 0x{magic[2]:02x} is not unsigned bytes (0x08)")
    ndim = magic[3]
    raw = f.read(4 * ndim)
    if ndim == 0 or len(raw) != 4 * ndim:
        raise ValueError(f"{name}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw)
    data_bytes = math.prod(dims)  # Python ints: 4 dims of 2**32-1 do not wrap around
    if data_bytes > max_bytes:
        shape = "x".join(map(str, dims))
        raise ValueError(
            f"{name}: header says {shape} = {data_bytes:,} bytes of data, more than the "
            f"limit of {max_bytes:,} (TRAINYARD_MAX_DATASET_FILE_BYTES)"
        )
    return IdxHeader(dims, 4 + 4 * ndim, data_bytes)


def _stored_size_matches(path: Path, header: IdxHeader) -> str | None:
    """Why the file on disk cannot hold what its header promises (None: it can).

    A plain file's size must be exact. A gzip file states its decompressed size modulo
    2**32 in its last four bytes: reading that costs nothing, and it catches a small file
    that would inflate far beyond its header (a gzip bomb) before anyone inflates it.
    """
    name = data_file_name(path)
    with open(path, "rb") as raw:
        size = os.fstat(raw.fileno()).st_size
        if path.suffix != ".gz":
            if size != header.total_bytes:
                return (
                    f"{name}: header says {'x'.join(map(str, header.dims))} = "
                    f"{header.data_bytes:,} bytes of data, the file holds "
                    f"{size - header.header_bytes:,} (truncated or corrupt)"
                )
            return None
        if size < 18 or raw.read(2) != _GZIP_MAGIC:
            return f"{name} is not a gzip file"
        raw.seek(size - 4)
        stated = int.from_bytes(raw.read(4), "little")
    if stated != header.total_bytes % (1 << 32):
        return (
            f"{name}: inflates to {stated:,} bytes (mod 2^32), the header says "
            f"{header.total_bytes:,} (corrupt, or not what its header claims)"
        )
    return None


def read_idx_header(path: Path, max_bytes: int = DEFAULT_MAX_DATASET_FILE_BYTES) -> tuple[int, ...]:
    """The dimensions in an IDX file's header, once the header is sane and the file's
    size agrees with it; ValueError otherwise. Reads the header and, for gzip, the
    four-byte trailer: never the data."""
    with open_idx(path) as f:
        header = parse_idx_header(f, path, max_bytes)
    problem = _stored_size_matches(path, header)
    if problem is not None:
        raise ValueError(problem)
    return header.dims


def _idx_dataset(name: str) -> Callable[[BaseModel, CatalogContext], DatasetInfo]:
    def resolve(_params: BaseModel, ctx: CatalogContext) -> DatasetInfo:
        directory = ctx.data_dir / name
        dims: dict[str, tuple[int, ...]] = {}
        for key, stem in IDX_FILES.items():
            path = find_idx_file(directory, stem)
            if path is None:
                raise CatalogError(
                    "dataset.name",
                    f"{name}: TRAINYARD_DATA_DIR/{name}/{stem}[.gz] is missing; see the README "
                    "for the files",
                )
            try:
                dims[key] = read_idx_header(path, ctx.max_file_bytes)
            except ValueError as exc:
                raise CatalogError("dataset.name", f"{name}: {exc}") from None
            except (OSError, EOFError, zlib.error) as exc:
                # An OSError's text carries the absolute path: name the file instead.
                reason = getattr(exc, "strerror", None) or type(exc).__name__
                raise CatalogError(
                    "dataset.name", f"{name}: cannot read {data_file_name(path)}: {reason}"
                ) from None
        for part in ("train", "test"):
            images, labels = dims[f"{part}_images"], dims[f"{part}_labels"]
            if len(images) != 3 or len(labels) != 1 or images[0] != labels[0] or 0 in images:
                raise CatalogError(
                    "dataset.name",
                    f"{name}: {part} images {images} and labels {labels} do not match",
                )
        if dims["train_images"][1:] != dims["test_images"][1:]:
            raise CatalogError("dataset.name", f"{name}: train and test images differ in size")
        _, h, w = dims["train_images"]
        return DatasetInfo(
            name,
            "image",
            "classification",
            (1, h, w),
            10,
            dims["train_images"][0],
            dims["test_images"][0],
        )

    return resolve


def _cifar10(_params: BaseModel, ctx: CatalogContext) -> DatasetInfo:
    directory = ctx.data_dir / CIFAR10_DIR
    missing = [f for f in CIFAR10_FILES if not (directory / f).is_file()]
    if missing:
        raise CatalogError(
            "dataset.name",
            f"cifar10: missing {', '.join(missing)} in TRAINYARD_DATA_DIR/{CIFAR10_DIR}",
        )
    too_big = [f for f in CIFAR10_FILES if (directory / f).stat().st_size > ctx.max_file_bytes]
    if too_big:
        raise CatalogError(
            "dataset.name",
            f"cifar10: {', '.join(too_big)} larger than {ctx.max_file_bytes:,} bytes "
            "(TRAINYARD_MAX_DATASET_FILE_BYTES)",
        )
    # Sizes would need unpickling; the web process does not unpickle files.
    return DatasetInfo("cifar10", "image", "classification", (3, 32, 32), 10, None, None)


def _csv(p: CsvParams, ctx: CatalogContext) -> DatasetInfo:
    upload = ctx.find_upload(p.upload_id)
    if upload is None:
        raise CatalogError("dataset.params.upload_id", f"upload {p.upload_id} does not exist")
    names = [c.name for c in upload.columns]
    target = upload.column(p.target)
    if target is None:
        raise CatalogError(
            "dataset.params.target", f"no column {p.target!r}; columns: {', '.join(names)}"
        )
    if target.missing:
        raise CatalogError(
            "dataset.params.target",
            f"column {p.target!r} has {target.missing} empty cells; the target needs a value in every row",
        )
    if p.task == "regression" and not target.numeric:
        raise CatalogError(
            "dataset.params.target", f"column {p.target!r} is not numeric; use task=classification"
        )
    if p.task == "classification" and not 2 <= target.distinct <= MAX_CSV_CLASSES:
        raise CatalogError(
            "dataset.params.target",
            f"column {p.target!r} has {target.distinct} distinct values; classification needs 2..{MAX_CSV_CLASSES}",
        )
    if p.features is None:
        features = [c.name for c in upload.columns if c.numeric and c.name != p.target]
    else:
        features = list(p.features)
        for name in features:
            col = upload.column(name)
            if col is None:
                raise CatalogError(
                    "dataset.params.features", f"no column {name!r}; columns: {', '.join(names)}"
                )
            if not col.numeric:
                raise CatalogError("dataset.params.features", f"column {name!r} is not numeric")
            if name == p.target:
                raise CatalogError("dataset.params.features", "the target cannot also be a feature")
    if not features:
        raise CatalogError(
            "dataset.params.features", "no numeric feature columns besides the target"
        )
    if upload.rows < 10:
        raise CatalogError(
            "dataset.params.upload_id",
            f"upload {p.upload_id} has {upload.rows} rows; at least 10 are needed",
        )
    train, test = _split_sizes(upload.rows)
    classes = target.distinct if p.task == "classification" else 0
    return DatasetInfo("csv", "tabular", p.task, (len(features),), classes, train, test)


# ---------------------------------------------------------------- the catalog


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    description: str
    kind: str
    tasks: tuple[str, ...]
    resolve: Callable[[Any, CatalogContext], DatasetInfo]
    params: type[StrictModel] = NoParams
    source: str = "bundled with scikit-learn"
    # Files under TRAINYARD_DATA_DIR, for the registry listing.
    files: tuple[str, ...] = field(default=())

    def to_json(self, ctx: CatalogContext) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "kind": self.kind,
            "tasks": list(self.tasks),
            "params_schema": self.params.model_json_schema(),
            "source": self.source,
            "files": list(self.files),
            "available": True,
            "unavailable_reason": None,
            # usable/problem: the same verdict under the names the README uses; a file
            # that is present but corrupt or oversized makes a dataset unusable too.
            "usable": True,
            "problem": None,
        }
        try:
            defaults = self.params()
        except ValidationError:
            return out  # required parameters (csv): nothing to describe without them
        try:
            info = self.resolve(defaults, ctx)
        except CatalogError as exc:
            out.update(
                available=False, unavailable_reason=exc.message, usable=False, problem=exc.message
            )
            return out
        out.update(
            input_shape=list(info.input_shape),
            num_classes=info.num_classes,
            splits={"train+val": info.train_size, "test": info.test_size},
        )
        return out


DATASETS: dict[str, DatasetEntry] = {
    e.name: e
    for e in (
        DatasetEntry("digits", "scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes)", "image",
                     ("classification",), _fixed("digits", "image", (1, 8, 8), 10, 1797)),
        DatasetEntry("iris", "Fisher's iris flowers (150 rows, 4 features, 3 classes)", "tabular",
                     ("classification",), _fixed("iris", "tabular", (4,), 3, 150)),
        DatasetEntry("wine", "Wine cultivars (178 rows, 13 features, 3 classes)", "tabular",
                     ("classification",), _fixed("wine", "tabular", (13,), 3, 178)),
        DatasetEntry("breast_cancer", "Wisconsin breast cancer (569 rows, 30 features, 2 classes)", "tabular",
                     ("classification",), _fixed("breast_cancer", "tabular", (30,), 2, 569)),
        DatasetEntry("synthetic_images", "Generated class-dependent image patterns with noise", "image",
                     ("classification",), _synthetic_images, SyntheticImagesParams, "generated"),
        DatasetEntry("synthetic_regression", "Generated linear-plus-nonlinear regression targets", "tabular",
                     ("regression",), _synthetic_regression, SyntheticRegressionParams, "generated"),
        DatasetEntry("synthetic_sequences", "Generated token sequences whose class depends on their tokens",
                     "sequence", ("classification",), _synthetic_sequences, SyntheticSequencesParams, "generated"),
        DatasetEntry("mnist", "MNIST handwritten digits (official IDX files)", "image", ("classification",),
                     _idx_dataset("mnist"), source="TRAINYARD_DATA_DIR/mnist/",
                     files=tuple(f"mnist/{f}[.gz]" for f in IDX_FILES.values())),
        DatasetEntry("fashion_mnist", "Fashion-MNIST clothing images (official IDX files)", "image",
                     ("classification",), _idx_dataset("fashion_mnist"), source="TRAINYARD_DATA_DIR/fashion_mnist/",
                     files=tuple(f"fashion_mnist/{f}[.gz]" for f in IDX_FILES.values())),
        DatasetEntry("cifar10", "CIFAR-10 (official python pickle batches)", "image", ("classification",), _cifar10,
                     source=f"TRAINYARD_DATA_DIR/{CIFAR10_DIR}/",
                     files=tuple(f"{CIFAR10_DIR}/{f}" for f in CIFAR10_FILES)),
        DatasetEntry("csv", "A CSV file uploaded with POST /api/v1/uploads", "tabular",
                     ("classification", "regression"), _csv, CsvParams, "upload"),
    )
}  # fmt: skip


def resolve_dataset(name: str, params: BaseModel, ctx: CatalogContext) -> DatasetInfo:
    """DatasetInfo for a validated dataset spec; CatalogError names the field to blame."""
    return DATASETS[name].resolve(params, ctx)
