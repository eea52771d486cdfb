"""Datasets for the seed paper's trainer.

Every loader returns a :class:`Dataset` of CPU tensors: float32 images of shape ``[N, 1, 28, 28]``
and int64 labels of shape ``[N]``. Images are scaled to ``[0, 1]`` and then normalised with the
scalar mean and standard deviation of the *train* split (the same affine map is applied to the
test split), so the train images have mean ~0 and std ~1.

Guarantees:

* Loading is deterministic: the same ``spec`` and ``seed`` (and the same files, for ``idx:``)
  give bit-identical tensors, hence the same :meth:`Dataset.content_hash`, on a given platform.
  Statistics are computed in float64 with numpy so they do not depend on the torch thread count.
* Nothing is downloaded; ``digits`` uses the copy bundled with scikit-learn.
* Bad input raises :class:`ValueError` whose message names the offending value and how to fix it.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_SPEC",
    "IDX_FILES",
    "Dataset",
    "load_dataset",
    "parse_idx",
    "read_idx",
]

DEFAULT_SPEC = "digits"
"""The spec used when none is given."""

IMAGE_SIZE = 28
"""Height and width of every image a :class:`Dataset` holds."""

IDX_IMAGES_MAGIC = 0x00000803
"""IDX magic number of an unsigned-byte 3-D array (images)."""

IDX_LABELS_MAGIC = 0x00000801
"""IDX magic number of an unsigned-byte 1-D array (labels)."""

IDX_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
"""Base names of the four IDX files an ``idx:DIR`` spec expects (each raw or with ``.gz``)."""

DIGITS_TEST_FRACTION = 0.2
"""Fraction of each class of scikit-learn's digits held out as the test split."""

SYNTHETIC_DEFAULT_TRAIN = 2048
"""Default number of train samples for the ``synthetic`` spec."""

SYNTHETIC_NUM_CLASSES = 10
SYNTHETIC_NOISE_STD = 0.6

_ACCEPTED_SPECS = (
    "'digits' (scikit-learn's bundled 8x8 digits, upsampled to 28x28), "
    "'idx:DIR' (a directory with MNIST/Fashion-MNIST IDX files), "
    "'synthetic' or 'synthetic:N' (N generated train samples, N >= 1)"
)


@dataclass(frozen=True, eq=False)
class Dataset:
    """An image-classification dataset held as CPU tensors.

    Attributes:
        name: Human-readable name (usually the spec it was loaded from).
        train_x: float32 tensor ``[N, 1, 28, 28]``.
        train_y: int64 tensor ``[N]`` with values in ``[0, num_classes)``.
        test_x: float32 tensor ``[M, 1, 28, 28]``.
        test_y: int64 tensor ``[M]`` with values in ``[0, num_classes)``.
        num_classes: Number of classes (>= 1).

    The instance is frozen (fields cannot be rebound) but the tensors themselves are ordinary
    mutable tensors; callers must not modify them in place if they rely on :meth:`content_hash`.
    Equality is identity (``eq=False``) because element-wise tensor comparison has no single
    truth value; compare :meth:`content_hash` values instead.

    Raises:
        ValueError: On construction, if a dtype, shape, sample count or label range is wrong.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(
                f"Dataset {self.name!r}: num_classes must be >= 1, got {self.num_classes}"
            )
        for split in ("train", "test"):
            x: torch.Tensor = getattr(self, f"{split}_x")
            y: torch.Tensor = getattr(self, f"{split}_y")
            if x.dtype != torch.float32:
                raise ValueError(f"Dataset {self.name!r}: {split}_x must be float32, got {x.dtype}")
            if x.dim() != 4 or tuple(x.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
                raise ValueError(
                    f"Dataset {self.name!r}: {split}_x must have shape [N, 1, {IMAGE_SIZE}, "
                    f"{IMAGE_SIZE}], got {list(x.shape)}"
                )
            if y.dtype != torch.int64 or y.dim() != 1:
                raise ValueError(
                    f"Dataset {self.name!r}: {split}_y must be a 1-D int64 tensor, "
                    f"got dtype {y.dtype} and shape {list(y.shape)}"
                )
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"Dataset {self.name!r}: {split}_x has {x.shape[0]} samples but {split}_y has "
                    f"{y.shape[0]} labels"
                )
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(
                    f"Dataset {self.name!r}: {split}_y values must lie in [0, {self.num_classes}), "
                    f"got range [{int(y.min())}, {int(y.max())}]"
                )

    def content_hash(self) -> str:
        """Return the sha256 hex digest of the four tensors' dtypes, shapes and raw bytes.

        The digest covers ``train_x, train_y, test_x, test_y`` in that order; ``name`` and
        ``num_classes`` are not included. It is deterministic for identical tensor contents on
        platforms of the same byte order (all supported platforms are little-endian).
        """
        digest = hashlib.sha256()
        for label, tensor in (
            ("train_x", self.train_x),
            ("train_y", self.train_y),
            ("test_x", self.test_x),
            ("test_y", self.test_y),
        ):
            array = np.ascontiguousarray(tensor.detach().cpu().numpy())
            digest.update(f"{label}:{array.dtype.str}:{list(array.shape)};".encode())
            digest.update(array.data.cast("B"))
        return digest.hexdigest()


def load_dataset(spec: str = DEFAULT_SPEC, *, seed: int = 0) -> Dataset:
    """Load the dataset described by ``spec``.

    Args:
        spec: One of ``"digits"``, ``"idx:DIR"``, ``"synthetic"`` or ``"synthetic:N"``.
        seed: Non-negative seed. For ``digits`` it selects the train/test split; for
            ``synthetic`` it selects the class templates and the noise; ``idx:`` ignores it.

    Returns:
        A validated :class:`Dataset`; identical arguments give identical tensors.

    Raises:
        ValueError: Unknown spec (the message lists the accepted forms), negative seed, missing
            directory or files (the message names the expected files), a bad IDX magic number,
            image/label count mismatch, wrong image size, or a truncated/corrupt file.
    """
    if not isinstance(spec, str):
        raise ValueError(
            f"dataset spec must be a string, got {spec!r}; accepted: {_ACCEPTED_SPECS}"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    if spec == "digits":
        return _load_digits(seed)
    if spec.startswith("idx:"):
        directory = spec[len("idx:") :]
        if not directory:
            raise ValueError(
                f"dataset spec {spec!r} has an empty directory; use 'idx:/path/to/mnist'"
            )
        return _load_idx_dir(Path(directory), name=spec)
    if spec == "synthetic" or spec.startswith("synthetic:"):
        num_train = SYNTHETIC_DEFAULT_TRAIN
        if spec != "synthetic":
            text = spec[len("synthetic:") :]
            try:
                num_train = int(text)
            except ValueError:
                raise ValueError(
                    f"dataset spec {spec!r}: {text!r} is not an integer; use e.g. 'synthetic:2048'"
                ) from None
            if num_train < 1:
                raise ValueError(
                    f"dataset spec {spec!r}: the sample count must be >= 1, got {num_train}; "
                    "use e.g. 'synthetic:2048'"
                )
        return _make_synthetic(num_train, seed, name=spec)
    raise ValueError(f"unknown dataset spec {spec!r}; accepted forms: {_ACCEPTED_SPECS}")


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _normalise(train: np.ndarray, test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise ``[0, 1]`` float images with the train split's scalar mean and std.

    Statistics are computed in float64; a zero std (constant images) is replaced by 1 so the
    result is finite. Returns float32 tensors of shape ``[N, 1, 28, 28]``.
    """
    train64 = train.astype(np.float64, copy=False)
    mean = float(train64.mean()) if train64.size else 0.0
    std = float(train64.std()) if train64.size else 1.0
    if not np.isfinite(std) or std <= 0.0:
        std = 1.0
    out = []
    for images in (train, test):
        normalised = ((images.astype(np.float64, copy=False) - mean) / std).astype(np.float32)
        out.append(torch.from_numpy(normalised.reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)))
    return out[0], out[1]


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


def _load_digits(seed: int) -> Dataset:
    """scikit-learn's 1,797 digits, upsampled to 28x28, stratified 80/20 split from ``seed``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0  # [N, 8, 8] in [0, 1]
    labels = np.asarray(bunch.target, dtype=np.int64)
    resized = F.interpolate(
        torch.from_numpy(images).unsqueeze(1),
        size=(IMAGE_SIZE, IMAGE_SIZE),
        mode="bilinear",
        align_corners=False,
    )
    upsampled = resized.clamp_(0.0, 1.0).numpy()

    rng = np.random.Generator(np.random.PCG64([seed, 0x0D161]))
    train_parts: list[np.ndarray] = []
    test_parts: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        members = members[rng.permutation(members.size)]
        n_test = round(members.size * DIGITS_TEST_FRACTION)
        test_parts.append(members[:n_test])
        train_parts.append(members[n_test:])
    train_idx = np.concatenate(train_parts)
    test_idx = np.concatenate(test_parts)
    train_idx = train_idx[rng.permutation(train_idx.size)]
    test_idx = test_idx[rng.permutation(test_idx.size)]

    train_x, test_x = _normalise(upsampled[train_idx], upsampled[test_idx])
    return Dataset(
        name="digits",
        train_x=train_x,
        train_y=torch.from_numpy(labels[train_idx].copy()),
        test_x=test_x,
        test_y=torch.from_numpy(labels[test_idx].copy()),
        num_classes=int(labels.max()) + 1,
    )


# --------------------------------------------------------------------------------------------
# IDX (MNIST / Fashion-MNIST)
# --------------------------------------------------------------------------------------------


def parse_idx(data: bytes, *, expected_magic: int, source: str = "<bytes>") -> np.ndarray:
    """Parse an unsigned-byte IDX blob into a uint8 array of the dimensions in its header.

    Format: a 4-byte big-endian magic number ``0x000008NN`` (``NN`` = number of dimensions),
    then ``NN`` big-endian uint32 sizes, then exactly ``prod(sizes)`` data bytes.

    Args:
        data: The whole (decompressed) file content.
        expected_magic: ``IDX_IMAGES_MAGIC`` or ``IDX_LABELS_MAGIC``.
        source: Name used in error messages (usually the file path).

    Returns:
        A new, writable uint8 array.

    Raises:
        ValueError: If the magic number differs from ``expected_magic``, or the blob is shorter
            (truncated) or longer (trailing bytes) than its header says.
    """
    if len(data) < 4:
        raise ValueError(f"{source}: truncated IDX file: {len(data)} bytes, no 4-byte magic number")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise ValueError(
            f"{source}: bad IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x}; "
            "is this the right (decompressed or .gz) MNIST-format file?"
        )
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(
            f"{source}: truncated IDX file: header needs {header_len} bytes, file has {len(data)}"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims, dtype=np.int64)) if dims else 1
    actual = len(data) - header_len
    if actual < expected:
        raise ValueError(
            f"{source}: truncated IDX file: dimensions {list(dims)} need {expected} data bytes, "
            f"found {actual}; re-download or re-extract the file"
        )
    if actual > expected:
        raise ValueError(
            f"{source}: IDX file has {actual - expected} unexpected trailing bytes after "
            f"{expected} data bytes for dimensions {list(dims)}; the file is corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims).copy()


def read_idx(path: Path | str, *, expected_magic: int) -> np.ndarray:
    """Read and parse an IDX file; a ``.gz`` suffix means gzip-compressed.

    Raises:
        ValueError: If the file cannot be read, the gzip stream is corrupt or truncated, or
            :func:`parse_idx` rejects the content.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                data = handle.read()
        else:
            data = path.read_bytes()
    except (EOFError, gzip.BadGzipFile) as exc:
        raise ValueError(f"{path}: corrupt or truncated gzip file ({exc}); re-download it") from exc
    except OSError as exc:
        raise ValueError(f"{path}: cannot read IDX file ({exc})") from exc
    return parse_idx(data, expected_magic=expected_magic, source=str(path))


def _find_idx_file(directory: Path, base: str) -> Path | None:
    """Return ``directory/base`` if it exists, else ``directory/base.gz``, else None."""
    for candidate in (directory / base, directory / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_idx_dir(directory: Path, *, name: str) -> Dataset:
    """Load the four MNIST-format IDX files from ``directory`` (raw preferred over ``.gz``)."""
    expected_list = ", ".join(f"{base}[.gz]" for base in IDX_FILES.values())
    if not directory.is_dir():
        raise ValueError(
            f"dataset spec {name!r}: directory {str(directory)!r} does not exist; it must contain "
            f"{expected_list}"
        )
    paths: dict[str, Path] = {}
    missing: list[str] = []
    for key, base in IDX_FILES.items():
        found = _find_idx_file(directory, base)
        if found is None:
            missing.append(f"{base}[.gz]")
        else:
            paths[key] = found
    if missing:
        raise ValueError(
            f"dataset spec {name!r}: missing IDX file(s) in {str(directory)!r}: "
            f"{', '.join(missing)}; expected {expected_list}"
        )

    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in ("train", "test"):
        images = read_idx(paths[f"{split}_images"], expected_magic=IDX_IMAGES_MAGIC)
        labels = read_idx(paths[f"{split}_labels"], expected_magic=IDX_LABELS_MAGIC)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{split} split count mismatch: {paths[f'{split}_images']} has {images.shape[0]} "
                f"images but {paths[f'{split}_labels']} has {labels.shape[0]} labels; the files "
                "must come from the same release"
            )
        if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(
                f"{paths[f'{split}_images']}: images are {images.shape[1]}x{images.shape[2]}, "
                f"expected {IMAGE_SIZE}x{IMAGE_SIZE} (MNIST/Fashion-MNIST format)"
            )
        splits[split] = (images, labels)

    train_images, train_labels = splits["train"]
    test_images, test_labels = splits["test"]
    if train_images.shape[0] == 0:
        raise ValueError(f"{paths['train_images']}: the train split has no images")
    train_x, test_x = _normalise(
        train_images.astype(np.float32) / 255.0, test_images.astype(np.float32) / 255.0
    )
    max_label = max(int(train_labels.max()), int(test_labels.max()) if test_labels.size else 0)
    return Dataset(
        name=name,
        train_x=train_x,
        train_y=torch.from_numpy(train_labels.astype(np.int64)),
        test_x=test_x,
        test_y=torch.from_numpy(test_labels.astype(np.int64)),
        num_classes=max_label + 1,
    )


# --------------------------------------------------------------------------------------------
# synthetic
# --------------------------------------------------------------------------------------------


def _make_synthetic(num_train: int, seed: int, *, name: str) -> Dataset:
    """``num_train`` train and ``num_train // 4`` test images: class template + gaussian noise.

    The 10 templates are smooth random patterns (7x7 gaussian fields upsampled to 28x28) drawn
    from ``seed``; labels are balanced (round robin, then shuffled). The noise is small relative
    to the distance between templates, so a small CNN separates the classes within a few steps.
    """
    num_test = num_train // 4
    template_rng = np.random.Generator(np.random.PCG64([seed, 1]))
    coarse = template_rng.standard_normal((SYNTHETIC_NUM_CLASSES, 1, 7, 7)).astype(np.float32)
    templates = F.interpolate(
        torch.from_numpy(coarse),
        size=(IMAGE_SIZE, IMAGE_SIZE),
        mode="bilinear",
        align_corners=False,
    ).numpy()[:, 0]

    def draw(count: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.Generator(np.random.PCG64([seed, stream]))
        labels = (np.arange(count, dtype=np.int64) % SYNTHETIC_NUM_CLASSES)[rng.permutation(count)]
        noise = rng.standard_normal((count, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
        images = templates[labels] + SYNTHETIC_NOISE_STD * noise
        # Squash into [0, 1] like real image data before the common normalisation.
        images = 1.0 / (1.0 + np.exp(-images, dtype=np.float32))
        return images.astype(np.float32), labels

    train_images, train_labels = draw(num_train, 2)
    test_images, test_labels = draw(num_test, 3)
    train_x, test_x = _normalise(train_images, test_images)
    return Dataset(
        name=name,
        train_x=train_x,
        train_y=torch.from_numpy(train_labels),
        test_x=test_x,
        test_y=torch.from_numpy(test_labels),
        num_classes=SYNTHETIC_NUM_CLASSES,
    )
