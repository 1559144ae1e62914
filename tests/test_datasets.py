"""worker/training/datasets.py: every dataset, its fixed splits, normalization, files
in the official formats (written by tests/data_files.py), and augmentation."""

from __future__ import annotations

import gzip
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from shared.dataset_catalog import (  # noqa: E402
    DATASETS,
    IDX_FILES,
    CatalogContext,
    CsvParams,
    SyntheticImagesParams,
    SyntheticRegressionParams,
    SyntheticSequencesParams,
    resolve_dataset,
)
from shared.spec import AugmentSpec  # noqa: E402
from tests.data_files import idx_bytes, py2_pickle, write_cifar10, write_csv, write_mnist  # noqa: E402
from worker.training.data import csv_table, readers  # noqa: E402
from worker.training.data.synthetic import sequence_code, synthetic_sequences  # noqa: E402
from worker.training.datasets import (  # noqa: E402
    DataPaths,
    Splits,
    augment_batch,
    clear_cache,
    load_dataset,
)
from worker.training.errors import UserError  # noqa: E402

CPU = torch.device("cpu")
SMALL = {
    "synthetic_images": SyntheticImagesParams(
        channels=3, height=12, width=16, num_classes=5, num_samples=300
    ),
    "synthetic_regression": SyntheticRegressionParams(num_features=6, num_samples=400, noise=0.1),
    "synthetic_sequences": SyntheticSequencesParams(
        seq_len=24, vocab_size=32, num_classes=4, num_samples=400
    ),
}


@pytest.fixture
def paths(tmp_path: Path) -> DataPaths:
    return DataPaths(data_dir=tmp_path / "data", uploads_dir=tmp_path / "uploads")


def load(
    name: str, params=None, normalize: str = "auto", val_fraction: float = 0.2, **kw
) -> Splits:
    return load_dataset(name, params, val_fraction, normalize, CPU, **kw)


def ctx_for(paths: DataPaths) -> CatalogContext:
    return CatalogContext(data_dir=paths.data_dir)


def check_shapes(splits: Splits) -> None:
    info = splits.info
    assert len(splits.train) + len(splits.val) == info.train_size
    assert len(splits.test) == info.test_size
    for name in ("train", "val", "test"):
        split = splits.get(name)
        assert tuple(split.x.shape[1:]) == info.input_shape
        assert split.x.dtype == (torch.int64 if info.kind == "sequence" else torch.float32)
        assert split.y.dtype == (torch.int64 if info.task == "classification" else torch.float32)
        assert split.x.shape[0] == split.y.shape[0] and split.y.ndim == 1
        if info.task == "classification":
            assert int(split.y.min()) >= 0 and int(split.y.max()) < info.num_classes


# ---------------------------------------------------------------- every dataset


@pytest.mark.parametrize(
    "name", ["digits", "iris", "wine", "breast_cancer", "synthetic_images", "synthetic_regression",
             "synthetic_sequences"],
)  # fmt: skip
def test_builtin_datasets_match_the_catalog(name: str) -> None:
    params = SMALL.get(name, DATASETS[name].params())
    splits = load(name, params)
    assert splits.info == resolve_dataset(name, params, CatalogContext(data_dir=Path(".")))
    check_shapes(splits)
    if splits.info.kind == "sequence":
        assert splits.stats == {}
        assert int(splits.train.x.max()) < splits.info.vocab_size


def test_digits_keeps_its_old_splits() -> None:
    splits = load("digits")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1149, 288, 360)
    assert float(splits.train.x.min()) >= 0.0 and float(splits.train.x.max()) <= 1.0
    other = load("digits", val_fraction=0.5)
    assert torch.equal(other.test.x, splits.test.x)  # the test split ignores val_fraction
    assert len(other.val) == 719
    assert torch.bincount(splits.test.y).min() >= 35  # stratified


def test_splits_do_not_depend_on_the_job_seed_or_the_cache() -> None:
    first = load("wine", normalize="none")
    clear_cache()
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    second = load("wine", normalize="none")
    for name in ("train", "val", "test"):
        assert torch.equal(first.get(name).x, second.get(name).x)
        assert torch.equal(first.get(name).y, second.get(name).y)
    # A cached dataset hands out copies: a job writing into its tensors harms no other.
    second.train.x.zero_()
    assert torch.equal(load("wine", normalize="none").train.x, first.train.x)


def test_a_second_job_skips_loading(paths: DataPaths) -> None:
    from worker.training.datasets import _numpy_splits

    clear_cache()
    load("iris", normalize="scale")
    load("iris", normalize="standardize")  # normalization runs per job, on the cached split
    assert (_numpy_splits.cache_info().hits, _numpy_splits.cache_info().misses) == (1, 1)
    load("iris", val_fraction=0.3)  # another validation split: another entry
    assert _numpy_splits.cache_info().misses == 2
    # Files that change on disk are read again.
    write_mnist(paths.data_dir / "mnist", 30, 10)
    assert load("mnist", paths=paths).info.train_size == 30
    write_mnist(paths.data_dir / "mnist", 40, 10)
    assert load("mnist", paths=paths).info.train_size == 40


def test_bad_names_and_missing_paths_are_clear() -> None:
    with pytest.raises(ValueError, match="digits"):
        load("imagenet")
    with pytest.raises(ValueError, match="train, val, test"):
        load("iris").get("holdout")
    with pytest.raises(UserError, match="data paths"):
        load("mnist")


# ---------------------------------------------------------------- normalization


def test_standardize_uses_the_training_split_only() -> None:
    splits = load("breast_cancer", normalize="standardize")
    train_mean, train_std = splits.train.x.mean(0), splits.train.x.std(0, unbiased=False)
    assert train_mean.abs().max() < 1e-4 and (train_std - 1).abs().max() < 1e-3
    # The validation split is transformed with the training statistics, so its own
    # mean is near 0 but not 0.
    val_mean = splits.val.x.mean(0).abs()
    assert val_mean.max() > 1e-2 and val_mean.mean() < 0.5
    assert torch.allclose(
        splits.stats["shift"], load("breast_cancer", normalize="none").train.x.mean(0)
    )


def test_images_standardize_per_channel_and_scale_by_pixel_range() -> None:
    params = SMALL["synthetic_images"]
    std = load("synthetic_images", params, normalize="standardize")
    assert std.stats["shift"].shape == (3, 1, 1)
    channel_mean = std.train.x.mean(dim=(0, 2, 3))
    assert channel_mean.abs().max() < 1e-4
    assert (std.train.x.std(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-3
    raw = load("synthetic_images", params, normalize="none")
    scaled = load("synthetic_images", params, normalize="scale")
    assert raw.stats == {} and float(raw.train.x.max()) > 1.0
    assert torch.allclose(scaled.train.x, raw.train.x / 255)
    digits = load("digits", normalize="none")
    assert float(digits.train.x.max()) == 16.0


def test_tables_scale_to_the_training_range() -> None:
    splits = load("wine", normalize="scale")
    assert torch.allclose(splits.train.x.amin(0), torch.zeros(13), atol=1e-6)
    assert torch.allclose(splits.train.x.amax(0), torch.ones(13), atol=1e-6)


def test_constant_features_are_not_divided_by_zero(paths: DataPaths) -> None:
    rows = [["a", "const", "label"]] + [[i, 5, "x" if i % 2 else "y"] for i in range(20)]
    write_csv(paths.uploads_dir / "3.csv", rows)
    splits = load(
        "csv", CsvParams(upload_id=3, target="label"), normalize="standardize", paths=paths
    )
    assert torch.isfinite(splits.train.x).all()
    assert torch.equal(splits.train.x[:, 1], torch.zeros(len(splits.train)))


def test_stats_round_trip_through_a_checkpoint(tmp_path: Path, paths: DataPaths) -> None:
    trained = load("iris", normalize="standardize")
    torch.save({"stats": trained.stats}, tmp_path / "ckpt.pt")
    stats = torch.load(tmp_path / "ckpt.pt", weights_only=True)["stats"]
    # Given stats win over `normalize`: evaluation applies the training job's transform.
    again = load("iris", normalize="none", stats=stats)
    assert torch.equal(again.test.x, trained.test.x)
    assert set(again.stats) == {"method", "shift", "scale"}
    # Stats of one image dataset applied to another of the same shape.
    write_mnist(paths.data_dir / "mnist", 30, 10)
    write_mnist(paths.data_dir / "fashion_mnist", 30, 10, seed=1)
    mnist = load("mnist", normalize="standardize", paths=paths)
    fashion = load("fashion_mnist", stats=mnist.stats, paths=paths)
    raw = load("fashion_mnist", normalize="none", paths=paths)
    expected = (raw.test.x - mnist.stats["shift"]) / mnist.stats["scale"]
    assert torch.allclose(fashion.test.x, expected)
    with pytest.raises(UserError, match="shape"):
        load("wine", stats=stats)
    with pytest.raises(UserError, match="sequences"):
        load("synthetic_sequences", SMALL["synthetic_sequences"], stats=stats)


# ---------------------------------------------------------------- IDX files


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_from_idx_files(paths: DataPaths, gz: bool) -> None:
    written = write_mnist(paths.data_dir / "mnist", 50, 20, gz=gz)
    assert all(p.name.endswith(".gz") == gz for p in written.values())
    splits = load("mnist", paths=paths)
    assert splits.info == resolve_dataset("mnist", DATASETS["mnist"].params(), ctx_for(paths))
    assert (splits.info.train_size, splits.info.test_size, splits.info.input_shape) == (
        50,
        20,
        (1, 28, 28),
    )
    check_shapes(splits)
    # The official test file is the test split, in file order.
    raw = (
        gzip.decompress(written["test_images"].read_bytes())
        if gz
        else written["test_images"].read_bytes()
    )
    first = np.frombuffer(raw[16 : 16 + 784], dtype=np.uint8).reshape(1, 28, 28)
    assert torch.equal(splits.test.x[0], torch.tensor(first, dtype=torch.float32) / 255)


def test_fashion_mnist_reads_its_own_directory(paths: DataPaths) -> None:
    write_mnist(paths.data_dir / "fashion_mnist", 40, 10, gz=True)
    splits = load("fashion_mnist", paths=paths)
    assert (len(splits.train) + len(splits.val), len(splits.test)) == (40, 10)
    with pytest.raises(UserError, match="missing"):
        load("mnist", paths=paths)


def test_broken_idx_files_are_clear_errors(paths: DataPaths) -> None:
    directory = paths.data_dir / "mnist"
    files = write_mnist(directory, 30, 10)
    images = files["train_images"]
    good = images.read_bytes()
    images.write_bytes(good[:-100])  # truncated data: the header still reads fine
    with pytest.raises(UserError, match="truncated or corrupt"):
        load("mnist", paths=paths)
    images.write_bytes(b"\x00\x00\x08\x03\x00\x00")  # truncated header
    with pytest.raises(UserError, match=IDX_FILES["train_images"]):
        load("mnist", paths=paths)
    images.write_bytes(b"PK\x03\x04" + good[4:])  # not IDX at all
    with pytest.raises(UserError, match=IDX_FILES["train_images"]):
        load("mnist", paths=paths)
    images.unlink()
    gz = directory / (IDX_FILES["train_images"] + ".gz")
    gz.write_bytes(gzip.compress(good)[:-40])  # cut-off gzip stream
    with pytest.raises(UserError, match="corrupt"):  # its trailer no longer matches
        load("mnist", paths=paths)
    with pytest.raises(UserError, match="cannot read mnist/train-images-idx3-ubyte.gz"):
        readers.read_idx(gz)
    gz.write_bytes(gzip.compress(good))
    files["train_labels"].write_bytes(idx_bytes(np.full(29, 3, dtype=np.uint8)))
    with pytest.raises(UserError, match="do not match"):
        load("mnist", paths=paths)
    files["train_labels"].write_bytes(idx_bytes(np.full(30, 12, dtype=np.uint8)))
    with pytest.raises(UserError, match="0..9"):
        load("mnist", paths=paths)


# ---------------------------------------------------------------- CIFAR-10


def test_cifar10_from_official_pickles(paths: DataPaths) -> None:
    directory = write_cifar10(paths.data_dir, n_per_batch=10)
    splits = load("cifar10", normalize="none", paths=paths)
    resolved = resolve_dataset("cifar10", DATASETS["cifar10"].params(), ctx_for(paths))
    assert resolved.train_size is None  # the server does not unpickle
    assert splits.info.train_size == 50 and splits.info.test_size == 10
    assert splits.info.input_shape == resolved.input_shape == (3, 32, 32)
    check_shapes(splits)
    with (directory / "test_batch").open("rb") as f:
        batch = pickle.load(f, encoding="bytes")  # our own file: safe to unpickle plainly
    assert torch.equal(splits.test.y, torch.tensor(batch[b"labels"]))
    assert torch.equal(
        splits.test.x.reshape(10, -1), torch.tensor(batch[b"data"], dtype=torch.float32)
    )


class _Exploit:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_cifar10_refuses_pickles_that_call_anything_else(paths: DataPaths, tmp_path: Path) -> None:
    directory = write_cifar10(paths.data_dir, n_per_batch=10)
    marker = tmp_path / "pwned"
    evil = {b"data": _Exploit(f"touch {marker}"), b"labels": [0]}
    (directory / "data_batch_3").write_bytes(pickle.dumps(evil, protocol=4))
    with pytest.raises(
        UserError, match=r"data_batch_3.*refusing to load global (os|posix)\.system"
    ):
        load("cifar10", paths=paths)
    assert not marker.exists()
    (directory / "data_batch_3").write_bytes(py2_pickle({b"data": [1, 2], b"labels": [0]}))
    with pytest.raises(UserError, match="N x 3072 uint8"):
        load("cifar10", paths=paths)
    (directory / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="not a CIFAR-10 batch"):
        load("cifar10", paths=paths)
    (directory / "data_batch_3").unlink()
    with pytest.raises(UserError, match="data_batch_3"):
        load("cifar10", paths=paths)


# ---------------------------------------------------------------- CSV uploads


def _csv_rows(n: int = 40) -> list[list[object]]:
    rng = np.random.default_rng(0)
    rows: list[list[object]] = [["height", " width", "name", "species", "price"]]
    for i in range(n):
        species = ["setosa", "versicolor", "virginica"][i % 3]
        height = round(float(rng.normal(3 * (i % 3), 0.3)), 3)
        width = "" if i == 5 else round(float(rng.normal()), 3)  # one missing value
        rows.append([height, width, f"plant {i}", species, round(10 + 2 * height, 3)])
    return rows


def test_csv_classification(paths: DataPaths) -> None:
    write_csv(paths.uploads_dir / "7.csv", _csv_rows())
    params = CsvParams(upload_id=7, target="species")
    splits = load("csv", params, paths=paths)
    # Features: every numeric column but the target ("name" is text, so not one).
    assert splits.info.input_shape == (3,) and splits.info.num_classes == 3
    assert (splits.info.train_size, splits.info.test_size) == (32, 8)
    check_shapes(splits)
    assert torch.isfinite(splits.train.x).all() and torch.isfinite(splits.test.x).all()
    # Labels are the sorted class names: setosa 0, versicolor 1, virginica 2 — and
    # "height" was drawn around 3 * label.
    raw = load("csv", params, normalize="none", paths=paths)
    assert torch.equal(raw.train.y, (raw.train.x[:, 0] / 3).round().long())
    # The server computes the same info from its upload scan.
    with csv_table.open_upload(paths.uploads_dir, 7) as table:
        upload = csv_table.upload_info(7, table)
    ctx = CatalogContext(data_dir=paths.data_dir, find_upload=lambda _id: upload)
    assert resolve_dataset("csv", params, ctx) == splits.info
    only = load("csv", CsvParams(upload_id=7, target="species", features=["width"]), paths=paths)
    assert only.info.input_shape == (1,)


def test_csv_regression_and_column_rules(paths: DataPaths) -> None:
    write_csv(paths.uploads_dir / "8.csv", _csv_rows())
    splits = load("csv", CsvParams(upload_id=8, target="price", task="regression"), paths=paths)
    assert splits.info.task == "regression" and splits.info.num_classes == 0
    assert splits.info.input_shape == (2,)  # height, width
    check_shapes(splits)
    with csv_table.open_upload(paths.uploads_dir, 8) as table:
        info = {c.name: c for c in csv_table.upload_info(8, table).columns}
    assert info["width"].numeric  # names and values are stripped; empty values do not count
    assert not info["name"].numeric and not info["species"].numeric
    assert info["species"].distinct == 3 and table.rows == 40
    with pytest.raises(UserError, match="not numeric"):
        load(
            "csv",
            CsvParams(upload_id=8, target="price", task="regression", features=["name"]),
            paths=paths,
        )
    with pytest.raises(UserError, match="not numeric"):
        load("csv", CsvParams(upload_id=8, target="species", task="regression"), paths=paths)
    with pytest.raises(UserError, match="missing"):
        load("csv", CsvParams(upload_id=9, target="price"), paths=paths)


def test_csv_bad_targets_are_clear_errors(paths: DataPaths) -> None:
    rows = _csv_rows()
    rows[3][3] = ""
    write_csv(paths.uploads_dir / "10.csv", rows)
    with pytest.raises(UserError, match="1 empty cells"):
        load("csv", CsvParams(upload_id=10, target="species"), paths=paths)
    rows = _csv_rows()
    rows[4][4] = "inf"
    write_csv(paths.uploads_dir / "11.csv", rows)
    with pytest.raises(UserError, match="not a finite number in data row 4"):
        load("csv", CsvParams(upload_id=11, target="price", task="regression"), paths=paths)
    write_csv(paths.uploads_dir / "12.csv", [["a", "b"], [1, 2, 3]] + [[1, "x"]] * 12)
    with pytest.raises(UserError, match="line 2 has 3 values"):
        load("csv", CsvParams(upload_id=12, target="b"), paths=paths)


# ---------------------------------------------------------------- synthetic data


def _nearest_mean_accuracy(train_x, train_y, test_x, test_y, k: int) -> float:
    means = torch.stack([train_x[train_y == c].mean(0) for c in range(k)])
    predicted = torch.cdist(test_x, means).argmin(1)
    return float((predicted == test_y).float().mean())


def test_synthetic_images_and_sequences_carry_learnable_signal() -> None:
    images = load("synthetic_images", SMALL["synthetic_images"], normalize="standardize")
    flat = [s.x.flatten(1) for s in (images.train, images.test)]
    assert (
        _nearest_mean_accuracy(flat[0], images.train.y, flat[1], images.test.y, 5) > 0.6
    )  # chance 0.2

    seqs = load("synthetic_sequences", SMALL["synthetic_sequences"])
    bags = [torch.nn.functional.one_hot(s.x, 32).float().sum(1) for s in (seqs.train, seqs.test)]
    assert (
        _nearest_mean_accuracy(bags[0], seqs.train.y, bags[1], seqs.test.y, 4) > 0.6
    )  # chance 0.25


def test_synthetic_regression_is_mostly_but_not_only_linear() -> None:
    splits = load("synthetic_regression", SMALL["synthetic_regression"], normalize="none")

    def design(x):
        return torch.cat([x, torch.ones(len(x), 1)], 1).double()

    coef = torch.linalg.lstsq(design(splits.train.x), splits.train.y.double()[:, None]).solution
    pred = (design(splits.test.x) @ coef).squeeze(1)
    y = splits.test.y.double()
    r2 = 1 - float(((pred - y) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    assert 0.3 < r2 < 0.95  # a linear fit explains a good part: the rest needs a model


def test_synthetic_data_is_fixed_by_data_seed() -> None:
    params = SMALL["synthetic_images"]
    a = load("synthetic_images", params, normalize="none")
    b = load("synthetic_images", params.model_copy(update={"data_seed": 1}), normalize="none")
    clear_cache()
    again = load("synthetic_images", params, normalize="none")
    assert torch.equal(a.train.x, again.train.x)
    assert not torch.equal(a.train.x, b.train.x)


def test_many_classes_on_a_small_vocabulary_get_multi_token_codes() -> None:
    params = SyntheticSequencesParams(seq_len=16, vocab_size=8, num_classes=50, num_samples=200)
    base, digits = sequence_code(50, 8, 16)
    assert (base, digits) == (4, 3)
    x, y = synthetic_sequences(params)
    assert int(x.max()) < 8
    # Reading the marker tokens (those < base) in order gives back the class.
    decoded = [int("".join(str(t) for t in row if t < base), base) for row in x.astype(np.int64)]
    assert decoded == y.tolist()


# ---------------------------------------------------------------- augmentation


def _batch() -> torch.Tensor:
    return torch.rand(16, 3, 10, 12, generator=torch.Generator().manual_seed(0))


def test_augmentation_changes_images_reproducibly() -> None:
    x = _batch()
    before = x.clone()
    spec = AugmentSpec(hflip=True, crop_padding=2, rotation_degrees=15)
    out = augment_batch(x, spec, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert torch.equal(x, before)  # the input is left alone
    assert not torch.allclose(out, x)
    assert torch.equal(out, augment_batch(x, spec, torch.Generator().manual_seed(1)))
    assert not torch.equal(out, augment_batch(x, spec, torch.Generator().manual_seed(2)))
    assert torch.equal(augment_batch(x, AugmentSpec(), torch.Generator()), x)


def test_hflip_and_crop_move_pixels_without_changing_them() -> None:
    x = _batch()
    flipped = augment_batch(x, AugmentSpec(hflip=True), torch.Generator().manual_seed(0))
    same = (flipped == x).flatten(1).all(1)
    mirrored = (flipped == x.flip(3)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()

    cropped = augment_batch(x, AugmentSpec(crop_padding=3), torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (3, 3, 3, 3))
    for i in range(len(x)):
        windows = padded[i].unfold(1, 10, 1).unfold(2, 12, 1)  # (C, 7, 7, 10, 12)
        assert (windows == cropped[i][:, None, None]).flatten(3).all(3).all(0).any()


def _moments(images: torch.Tensor, yy: torch.Tensor, xx: torch.Tensor) -> tuple[torch.Tensor, ...]:
    mass = images.sum((1, 2, 3))
    var_x, var_y, cov = ((images * v).sum((1, 2, 3)) / mass for v in (xx * xx, yy * yy, xx * yy))
    return var_x, var_y, cov


def test_rotation_is_a_rotation_on_non_square_images() -> None:
    h, w = 21, 41
    yy, xx = torch.meshgrid(torch.arange(h) - h // 2, torch.arange(w) - w // 2, indexing="ij")
    gen = torch.Generator().manual_seed(0)
    # A centered disc stays round under a rotation; a shear would make it an ellipse.
    disc = ((yy**2 + xx**2) <= 64).float()[None, None].repeat(8, 1, 1, 1)
    var_x, var_y, cov = _moments(augment_batch(disc, AugmentSpec(rotation_degrees=45), gen), yy, xx)
    assert ((var_x / var_y) - 1).abs().max() < 0.05 and (cov / var_y).abs().max() < 0.05
    # A horizontal bar turns by a different angle in +-45 degrees per image.
    bar = ((yy.abs() <= 1) & (xx.abs() <= 9)).float()[None, None].repeat(64, 1, 1, 1)
    var_x, var_y, cov = _moments(augment_batch(bar, AugmentSpec(rotation_degrees=45), gen), yy, xx)
    angle = torch.rad2deg(0.5 * torch.atan2(2 * cov, var_x - var_y))
    assert angle.abs().max() <= 46 and angle.max() > 25 and angle.min() < -25


def _store_columns(paths: DataPaths, upload_id: int, rows: list[list[object]]) -> None:
    """Store an upload as the server does now: the compact form, no CSV kept."""
    from shared.csv_profile import profile_lines
    from shared.job_files import store_upload_columns

    source = write_csv(paths.uploads_dir / f"source-{upload_id}.txt", rows)
    with source.open(newline="", encoding="utf-8") as f:
        profile = profile_lines(f)
    store_upload_columns(paths.uploads_dir, upload_id, source, profile)
    source.unlink()


@pytest.mark.parametrize(
    ("target", "task"), [("species", "classification"), ("price", "regression")]
)
def test_stored_columns_train_exactly_like_the_old_csv_form(
    paths: DataPaths, target: str, task: str
) -> None:
    rows = _csv_rows(60)
    rows = [rows[0], *rows[:0:-1]]  # labels first seen out of their sorted order
    rows[7][0] = "1e39"  # beyond float32: infinity, then filled like any non-finite feature
    write_csv(paths.uploads_dir / "20.csv", rows)  # an upload stored before revision 0008
    _store_columns(paths, 21, rows)
    assert not (paths.uploads_dir / "21.csv").exists()
    old = load("csv", CsvParams(upload_id=20, target=target, task=task), paths=paths)
    new = load("csv", CsvParams(upload_id=21, target=target, task=task), paths=paths)
    assert old.info == new.info
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(old, name).x, getattr(new, name).x)
        assert torch.equal(getattr(old, name).y, getattr(new, name).y)


def test_stored_columns_keep_the_csv_rules(paths: DataPaths) -> None:
    rows = _csv_rows()
    rows[3][3] = ""  # an empty target cell: reported by data row, as from the CSV
    _store_columns(paths, 30, rows)
    with pytest.raises(UserError, match="1 empty cells"):
        load("csv", CsvParams(upload_id=30, target="species"), paths=paths)
    rows = _csv_rows()
    rows[4][4] = "inf"
    _store_columns(paths, 31, rows)
    with pytest.raises(UserError, match="not a finite number in data row 4"):
        load("csv", CsvParams(upload_id=31, target="price", task="regression"), paths=paths)
    with csv_table.open_upload(paths.uploads_dir, 31) as table:
        by_name = {c.name: c for c in table.columns}
        # Text with few values keeps its labels (a possible target); numbers keep float32.
        species = table.labels("species")
    assert sorted(species) == ["setosa", "versicolor", "virginica"]
    assert by_name["species"].values_offset is None and by_name["price"].values_offset
    assert by_name["name"].codes_offset is not None and by_name["width"].missing == 1
    (paths.uploads_dir / "32.cols").write_bytes(b"TYCOLS01" + b"\xff" * 8)
    with pytest.raises(UserError, match="cannot read upload 32"):
        load("csv", CsvParams(upload_id=32, target="price"), paths=paths)
