"""Data sets for the training CLI: scikit-learn digits, Fashion-MNIST / MNIST (IDX), CIFAR-10.

Every loader returns a :class:`Dataset` of float32 image tensors shaped ``(N, C, H, W)`` and int64
labels, already normalized (per-set constants, so train and test share one transform) and split
deterministically. Nothing is downloaded: missing files raise ``FileNotFoundError`` with a line
that says how to get them.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "DEFAULT_DATA_DIRS",
    "Dataset",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_idx_dataset",
    "read_idx",
    "subset",
]

# Where Debian's packages put the files (`apt-get install dataset-fashion-mnist`).
DEFAULT_DATA_DIRS: dict[str, str] = {
    "fashion-mnist": "/usr/share/datasets/fashion-mnist",
    "mnist": "/usr/share/datasets/mnist",
    "cifar10": "/usr/share/datasets/cifar-10-batches-py",
}

_HOW_TO_GET: dict[str, str] = {
    "fashion-mnist": "install it with 'apt-get install dataset-fashion-mnist' or pass --data-dir "
    "DIR holding train-images-idx3-ubyte[.gz] etc.",
    "mnist": "pass --data-dir DIR holding the MNIST IDX files (train-images-idx3-ubyte[.gz], "
    "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz])",
    "cifar10": "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, "
    "unpack it and pass --data-dir DIR/cifar-10-batches-py",
}


@dataclass
class Dataset:
    """A train/test pair of normalized image tensors."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    classes: tuple[str, ...]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, ``(C, H, W)``."""
        return tuple(self.x_train.shape[1:])


def _finish(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    mean: float | np.ndarray,
    std: float | np.ndarray,
    classes: tuple[str, ...],
) -> Dataset:
    def norm(x: np.ndarray) -> Tensor:
        return torch.from_numpy(((x.astype(np.float32) - mean) / std).astype(np.float32))

    return Dataset(
        name=name,
        x_train=norm(x_train),
        y_train=torch.from_numpy(y_train.astype(np.int64)),
        x_test=norm(x_test),
        y_test=torch.from_numpy(y_test.astype(np.int64)),
        num_classes=len(classes),
        classes=classes,
    )


def _digits_csv() -> Path:
    # Read scikit-learn's bundled file directly: importing sklearn itself costs seconds.
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("digits: scikit-learn is not installed (pip install scikit-learn)")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"digits: {path} not found in this scikit-learn install")
    return path


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8×8 digits (1797 images, values 0..16): a fixed stratified split.

    The split takes ``round(test_fraction * n_k)`` images of every class ``k`` for the test set,
    chosen by a numpy generator seeded with ``seed``, so it is the same on every machine.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    table = np.loadtxt(_digits_csv(), delimiter=",", dtype=np.float32)
    images = table[:, :64].reshape(-1, 1, 8, 8)
    labels = table[:, 64].astype(np.int64)
    rng = np.random.default_rng(seed)
    test_mask = np.zeros(len(labels), dtype=bool)
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        test_mask[rng.choice(idx, round(test_fraction * len(idx)), replace=False)] = True
    # Pixel range is 0..16; mean and std of the whole set, rounded and fixed so the transform does
    # not depend on the split.
    return _finish(
        "digits",
        images[~test_mask],
        labels[~test_mask],
        images[test_mask],
        labels[test_mask],
        4.88,
        6.02,
        tuple(str(i) for i in range(10)),
    )


_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (the MNIST format), gzipped (``.gz``) or raw."""
    path = Path(path)
    opener: Callable[..., object] = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:  # type: ignore[operator]
            data = f.read()  # type: ignore[attr-defined]
    except (gzip.BadGzipFile, EOFError) as e:
        raise ValueError(f"{path}: not a valid gzip file ({e})") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(shape)) if shape else 1
    if len(data) - header != count * dtype.itemsize:
        raise ValueError(
            f"{path}: IDX payload has {len(data) - header} bytes, header says "
            f"{count * dtype.itemsize} for shape {shape}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _find_idx(directory: Path, stem: str, dataset: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    # Some mirrors use a dot before the idx suffix (train-images.idx3-ubyte).
    dotted = stem.replace("-idx", ".idx")
    for name in (dotted, dotted + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"{dataset}: {stem}[.gz] not found in {directory}; {_HOW_TO_GET[dataset]}"
    )


_FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def load_idx_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Fashion-MNIST or MNIST from IDX files; pixels scaled to [0, 1] then standardized."""
    if name not in ("fashion-mnist", "mnist"):
        raise ValueError(f"dataset must be 'fashion-mnist' or 'mnist', got {name!r}")
    directory = Path(data_dir if data_dir is not None else DEFAULT_DATA_DIRS[name])
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{name}: data directory {directory} does not exist; {_HOW_TO_GET[name]}"
        )
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find_idx(directory, f"{prefix}-images-idx3-ubyte", name))
        labels = read_idx(_find_idx(directory, f"{prefix}-labels-idx1-ubyte", name))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{name}: {split} images {images.shape} and labels {labels.shape} do not match "
                "(expected (N, H, W) and (N,))"
            )
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise ValueError(f"{name}: {split} labels outside 0..9")
        parts[split] = (images[:, None].astype(np.float32) / 255.0, labels)
    # The usual per-set constants (train-set mean and std of pixels in [0, 1]).
    mean, std = (0.2860, 0.3530) if name == "fashion-mnist" else (0.1307, 0.3081)
    classes = _FASHION_CLASSES if name == "fashion-mnist" else tuple(str(i) for i in range(10))
    return _finish(name, *parts["train"], *parts["test"], mean, std, classes)


_CIFAR_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(
            f"cifar10: {path.name} not found in {path.parent}; {_HOW_TO_GET['cifar10']}"
        )
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError) as e:
        raise ValueError(f"cifar10: {path} is not a CIFAR-10 python batch ({e})") from e
    if not isinstance(batch, dict):
        raise ValueError(f"cifar10: {path} is not a CIFAR-10 python batch (not a dict)")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"cifar10: {path} lacks 'data' or 'labels'")
    data = np.asarray(data, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise ValueError(f"cifar10: {path} data {data.shape} / labels {labels.shape} malformed")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(data_dir: str | Path | None = None) -> Dataset:
    """CIFAR-10 from its python-pickle batches; per-channel standardization."""
    directory = Path(data_dir if data_dir is not None else DEFAULT_DATA_DIRS["cifar10"])
    if not directory.is_dir():
        raise FileNotFoundError(
            f"cifar10: data directory {directory} does not exist; {_HOW_TO_GET['cifar10']}"
        )
    train = [_read_cifar_batch(directory / f"data_batch_{i}") for i in range(1, 6)]
    x_tr = np.concatenate([b[0] for b in train]).astype(np.float32) / 255.0
    y_tr = np.concatenate([b[1] for b in train])
    x_te, y_te = _read_cifar_batch(directory / "test_batch")
    mean = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32).reshape(1, 3, 1, 1)
    return _finish(
        "cifar10", x_tr, y_tr, x_te.astype(np.float32) / 255.0, y_te, mean, std, _CIFAR_CLASSES
    )


DATASETS: tuple[str, ...] = ("digits", "fashion-mnist", "mnist", "cifar10")


def subset(ds: Dataset, limit: int | None, seed: int = 0, test_limit: int | None = None) -> Dataset:
    """A deterministic random subset: at most ``limit`` train and ``test_limit`` test samples."""

    def take(x: Tensor, y: Tensor, n: int | None, salt: int) -> tuple[Tensor, Tensor]:
        if n is None or n >= len(y):
            return x, y
        if n < 1:
            raise ValueError(f"limit must be a positive int, got {n}")
        g = torch.Generator().manual_seed(seed * 1000 + salt)
        idx = torch.randperm(len(y), generator=g)[:n].sort().values
        return x[idx], y[idx]

    x_tr, y_tr = take(ds.x_train, ds.y_train, limit, 1)
    x_te, y_te = take(ds.x_test, ds.y_test, test_limit, 2)
    return Dataset(ds.name, x_tr, y_tr, x_te, y_te, ds.num_classes, ds.classes)


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Load a data set by name (one of :data:`DATASETS`)."""
    if name == "digits":
        return load_digits()
    if name in ("fashion-mnist", "mnist"):
        return load_idx_dataset(name, data_dir)
    if name == "cifar10":
        return load_cifar10(data_dir)
    raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
