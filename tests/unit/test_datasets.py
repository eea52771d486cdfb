"""Unit tests for ftmpi.datasets (no MPI, no network)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ftmpi.datasets import (
    IDX_FILES,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    Dataset,
    load_dataset,
    parse_idx,
)

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """Encode a uint8 array as an IDX blob (optionally with a forced magic number)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x00000800 | array.ndim
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.tobytes()


def write_idx(path: Path, blob: bytes, *, compress: bool) -> None:
    if compress:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as handle:
            handle.write(blob)
    else:
        path.write_bytes(blob)


def make_idx_dir(
    directory: Path,
    *,
    n_train: int = 12,
    n_test: int = 5,
    compress: bool = False,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    arrays["train_labels"][0] = 9  # make num_classes deterministic (10)
    directory.mkdir(parents=True, exist_ok=True)
    for key, base in IDX_FILES.items():
        write_idx(directory / base, idx_bytes(arrays[key]), compress=compress)
    return arrays


def expected_normalised(train: np.ndarray, other: np.ndarray) -> np.ndarray:
    scaled_train = train.astype(np.float64) / 255.0
    scaled = other.astype(np.float64) / 255.0
    return (scaled - scaled_train.mean()) / scaled_train.std()


# ---------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits", seed=0)


def test_digits_shapes_dtypes_and_classes(digits: Dataset) -> None:
    assert digits.name == "digits"
    assert digits.num_classes == 10
    n_train, n_test = digits.train_x.shape[0], digits.test_x.shape[0]
    assert n_train + n_test == 1797
    assert 0.15 < n_test / 1797 < 0.25
    assert digits.train_x.shape == (n_train, 1, 28, 28)
    assert digits.test_x.shape == (n_test, 1, 28, 28)
    assert digits.train_x.dtype == torch.float32 and digits.test_x.dtype == torch.float32
    assert digits.train_y.dtype == torch.int64 and digits.test_y.dtype == torch.int64
    assert digits.train_y.shape == (n_train,) and digits.test_y.shape == (n_test,)
    assert set(digits.train_y.tolist()) == set(range(10))
    assert set(digits.test_y.tolist()) == set(range(10))


def test_digits_train_split_is_normalised(digits: Dataset) -> None:
    assert abs(float(digits.train_x.double().mean())) < 1e-4
    assert abs(float(digits.train_x.double().std()) - 1.0) < 1e-3
    # The test split uses the train statistics, so it is close to, but not exactly, standard.
    assert abs(float(digits.test_x.double().mean())) < 0.1
    assert torch.isfinite(digits.train_x).all() and torch.isfinite(digits.test_x).all()


def test_digits_split_is_disjoint_and_deterministic(digits: Dataset) -> None:
    again = load_dataset("digits", seed=0)
    assert torch.equal(again.train_x, digits.train_x)
    assert torch.equal(again.test_y, digits.test_y)
    assert again.content_hash() == digits.content_hash()

    other = load_dataset("digits", seed=1)
    assert other.content_hash() != digits.content_hash()
    assert not torch.equal(other.train_y, digits.train_y)

    # The split is a stratified partition of the 1,797 samples.
    from sklearn.datasets import load_digits

    full = np.bincount(load_digits().target, minlength=10)
    train_counts = torch.bincount(digits.train_y, minlength=10).numpy()
    test_counts = torch.bincount(digits.test_y, minlength=10).numpy()
    np.testing.assert_array_equal(train_counts + test_counts, full)
    assert np.all(np.abs(test_counts - 0.2 * full) <= 1)


def test_content_hash_is_sha256_and_sensitive_to_content(digits: Dataset) -> None:
    digest = digits.content_hash()
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert digits.content_hash() == digest
    modified = Dataset(
        name=digits.name,
        train_x=digits.train_x.clone(),
        train_y=digits.train_y,
        test_x=digits.test_x,
        test_y=digits.test_y,
        num_classes=digits.num_classes,
    )
    assert modified.content_hash() == digest
    modified.train_x[0, 0, 0, 0] += 1.0
    assert modified.content_hash() != digest


def test_default_spec_is_digits() -> None:
    assert load_dataset().content_hash() == load_dataset("digits", seed=0).content_hash()


# ---------------------------------------------------------------------------------------------
# IDX
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path: Path, compress: bool) -> None:
    arrays = make_idx_dir(tmp_path / "mnist", compress=compress)
    ds = load_dataset(f"idx:{tmp_path / 'mnist'}")
    assert ds.num_classes == 10
    assert ds.train_x.shape == (12, 1, 28, 28) and ds.test_x.shape == (5, 1, 28, 28)
    assert ds.train_y.dtype == torch.int64
    np.testing.assert_array_equal(ds.train_y.numpy(), arrays["train_labels"])
    np.testing.assert_array_equal(ds.test_y.numpy(), arrays["test_labels"])
    np.testing.assert_allclose(
        ds.train_x.numpy()[:, 0],
        expected_normalised(arrays["train_images"], arrays["train_images"]),
        rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        ds.test_x.numpy()[:, 0],
        expected_normalised(arrays["train_images"], arrays["test_images"]),
        rtol=1e-5,
        atol=1e-5,
    )


def test_idx_raw_and_gz_give_same_hash(tmp_path: Path) -> None:
    make_idx_dir(tmp_path / "raw", compress=False, seed=3)
    make_idx_dir(tmp_path / "gz", compress=True, seed=3)
    raw = load_dataset(f"idx:{tmp_path / 'raw'}")
    gz = load_dataset(f"idx:{tmp_path / 'gz'}")
    assert raw.content_hash() == gz.content_hash()


def test_parse_idx_round_trip_and_dims() -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    parsed = parse_idx(idx_bytes(array), expected_magic=IDX_IMAGES_MAGIC)
    np.testing.assert_array_equal(parsed, array)
    labels = np.array([1, 2, 3], dtype=np.uint8)
    np.testing.assert_array_equal(
        parse_idx(idx_bytes(labels), expected_magic=IDX_LABELS_MAGIC), labels
    )


def test_idx_bad_magic(tmp_path: Path) -> None:
    directory = tmp_path / "bad"
    arrays = make_idx_dir(directory)
    (directory / IDX_FILES["train_labels"]).write_bytes(
        idx_bytes(arrays["train_labels"], magic=0x00000802)
    )
    with pytest.raises(ValueError, match=r"bad IDX magic number 0x00000802, expected 0x00000801"):
        load_dataset(f"idx:{directory}")
    # Images file given where labels are expected.
    with pytest.raises(ValueError, match="magic"):
        parse_idx(idx_bytes(arrays["train_images"]), expected_magic=IDX_LABELS_MAGIC)


def test_idx_count_mismatch(tmp_path: Path) -> None:
    directory = tmp_path / "mismatch"
    make_idx_dir(directory)
    (directory / IDX_FILES["test_labels"]).write_bytes(idx_bytes(np.zeros(4, dtype=np.uint8)))
    with pytest.raises(ValueError, match=r"test split count mismatch.*5 images.*4 labels"):
        load_dataset(f"idx:{directory}")


@pytest.mark.parametrize("compress", [False, True])
def test_idx_truncated_file(tmp_path: Path, compress: bool) -> None:
    directory = tmp_path / "trunc"
    make_idx_dir(directory, compress=compress)
    name = IDX_FILES["train_images"] + (".gz" if compress else "")
    path = directory / name
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) - 100])
    with pytest.raises(ValueError, match="truncated") as info:
        load_dataset(f"idx:{directory}")
    assert name in str(info.value)


def test_idx_truncated_header() -> None:
    with pytest.raises(ValueError, match="truncated"):
        parse_idx(b"\x00\x00\x08\x03\x00\x00", expected_magic=IDX_IMAGES_MAGIC)
    with pytest.raises(ValueError, match="truncated"):
        parse_idx(b"\x00\x00", expected_magic=IDX_IMAGES_MAGIC)


def test_idx_trailing_bytes() -> None:
    blob = idx_bytes(np.zeros(3, dtype=np.uint8)) + b"\x00"
    with pytest.raises(ValueError, match="trailing"):
        parse_idx(blob, expected_magic=IDX_LABELS_MAGIC)


def test_idx_missing_files_names_expected_files(tmp_path: Path) -> None:
    directory = tmp_path / "partial"
    make_idx_dir(directory)
    (directory / IDX_FILES["test_images"]).unlink()
    with pytest.raises(ValueError) as info:
        load_dataset(f"idx:{directory}")
    message = str(info.value)
    assert "missing" in message
    assert "t10k-images-idx3-ubyte[.gz]" in message
    for base in IDX_FILES.values():
        assert base in message  # the full expected list is named


def test_idx_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"does not exist.*train-images-idx3-ubyte"):
        load_dataset(f"idx:{tmp_path / 'nope'}")


def test_idx_wrong_image_size(tmp_path: Path) -> None:
    directory = tmp_path / "small"
    make_idx_dir(directory)
    (directory / IDX_FILES["train_images"]).write_bytes(
        idx_bytes(np.zeros((12, 8, 8), dtype=np.uint8))
    )
    with pytest.raises(ValueError, match="8x8, expected 28x28"):
        load_dataset(f"idx:{directory}")


# ---------------------------------------------------------------------------------------------
# synthetic and spec parsing
# ---------------------------------------------------------------------------------------------


def test_synthetic_shapes_and_determinism() -> None:
    ds = load_dataset("synthetic:200", seed=5)
    assert ds.train_x.shape == (200, 1, 28, 28) and ds.test_x.shape == (50, 1, 28, 28)
    assert ds.train_y.shape == (200,) and ds.test_y.shape == (50,)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert ds.num_classes == 10
    assert torch.bincount(ds.train_y, minlength=10).tolist() == [20] * 10
    assert abs(float(ds.train_x.double().mean())) < 1e-4
    assert load_dataset("synthetic:200", seed=5).content_hash() == ds.content_hash()
    assert load_dataset("synthetic:200", seed=6).content_hash() != ds.content_hash()


def test_synthetic_default_size() -> None:
    ds = load_dataset("synthetic")
    assert ds.train_x.shape[0] == 2048 and ds.test_x.shape[0] == 512


def test_synthetic_classes_are_separable_by_nearest_mean() -> None:
    ds = load_dataset("synthetic:500", seed=0)
    means = torch.stack([ds.train_x[ds.train_y == c].mean(0) for c in range(10)]).flatten(1)
    pred = torch.cdist(ds.test_x.flatten(1), means).argmin(1)
    assert float((pred == ds.test_y).float().mean()) > 0.9


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("mnist", r"unknown dataset spec 'mnist'.*'digits'.*'idx:DIR'.*'synthetic:N'"),
        ("synthetic:abc", r"'abc' is not an integer"),
        ("synthetic:0", r"must be >= 1"),
        ("idx:", r"empty directory"),
    ],
)
def test_bad_specs(spec: str, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        load_dataset(spec)


def test_negative_seed_rejected() -> None:
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        load_dataset("synthetic:10", seed=-1)


def test_dataset_validation() -> None:
    x = torch.zeros(4, 1, 28, 28)
    y = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="float32"):
        Dataset("d", x.double(), y, x, y, 10)
    with pytest.raises(ValueError, match="shape"):
        Dataset("d", torch.zeros(4, 28, 28), y, x, y, 10)
    with pytest.raises(ValueError, match="4 samples but train_y has 3"):
        Dataset("d", x, y[:3], x, y, 10)
    with pytest.raises(ValueError, match=r"values must lie in \[0, 2\)"):
        Dataset("d", x, y + 5, x, y, 2)
