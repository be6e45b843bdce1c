"""Data loaders: IDX (gzipped and raw), CIFAR-10 pickles, digits split, subsets, errors."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lsoftmax import data


def write_idx(path: Path, array: np.ndarray, *, gz: bool) -> None:
    """An IDX file written independently of the loader (unsigned bytes, big-endian dims)."""
    assert array.dtype == np.uint8
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def make_idx_dir(root: Path, n_train: int = 40, n_test: int = 20, *, gz: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, a in arrays.items():
        write_idx(root / name, a, gz=gz)
    return arrays


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_idx_roundtrip(tmp_path: Path, gz: bool, name: str) -> None:
    arrays = make_idx_dir(tmp_path, gz=gz)
    ds = data.load_idx_dataset(name, tmp_path)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.x_train.shape == (40, 1, 28, 28) and ds.x_test.shape == (20, 1, 28, 28)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    mean, std = (0.2860, 0.3530) if name == "fashion-mnist" else (0.1307, 0.3081)
    expected = (arrays["train-images-idx3-ubyte"].astype(np.float64) / 255.0 - mean) / std
    np.testing.assert_allclose(ds.x_train[:, 0].numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_read_idx_rejects_corrupt_files(tmp_path: Path) -> None:
    bad_magic = tmp_path / "bad-magic"
    bad_magic.write_bytes(b"\x01\x02\x03\x04" + b"\x00" * 16)
    with pytest.raises(ValueError, match="bad magic"):
        data.read_idx(bad_magic)
    truncated = tmp_path / "truncated"
    write_idx(truncated, np.zeros((3, 4, 4), np.uint8), gz=False)
    truncated.write_bytes(truncated.read_bytes()[:-5])
    with pytest.raises(ValueError, match="payload"):
        data.read_idx(truncated)
    not_gzip = tmp_path / "x.gz"
    not_gzip.write_bytes(b"plain text, not gzip")
    with pytest.raises(ValueError, match="gzip"):
        data.read_idx(not_gzip)


def test_missing_data_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_dataset("fashion-mnist", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        data.load_dataset("mnist", tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_dataset("imagenet")


def write_cifar_batch(path: Path, images: np.ndarray, labels: list[int]) -> None:
    batch = {b"data": images.reshape(len(images), -1), b"labels": labels, b"batch_label": b"x"}
    with open(path, "wb") as f:
        pickle.dump(batch, f)


def test_cifar10_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    train_images = []
    for i in range(1, 6):
        imgs = rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
        train_images.append(imgs)
        write_cifar_batch(tmp_path / f"data_batch_{i}", imgs, [i, i, i, i])
    test_imgs = rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    write_cifar_batch(tmp_path / "test_batch", test_imgs, [0, 1, 2, 3, 4, 9])
    ds = data.load_dataset("cifar10", tmp_path)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (6, 3, 32, 32)
    assert ds.y_train.tolist() == [i for i in range(1, 6) for _ in range(4)]
    assert ds.y_test.tolist() == [0, 1, 2, 3, 4, 9]
    mean = np.array([0.4914, 0.4822, 0.4465]).reshape(1, 3, 1, 1)
    std = np.array([0.2470, 0.2435, 0.2616]).reshape(1, 3, 1, 1)
    expected = (np.concatenate(train_images) / 255.0 - mean) / std
    np.testing.assert_allclose(ds.x_train.numpy(), expected, rtol=1e-5, atol=1e-5)

    (tmp_path / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="data_batch_3"):
        data.load_cifar10(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        data.load_cifar10(tmp_path)


def test_digits_split_is_fixed_stratified_and_disjoint() -> None:
    a, b = data.load_digits(), data.load_digits()
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert len(a.y_train) + len(a.y_test) == 1797
    assert a.x_train.shape[1:] == (1, 8, 8) and a.x_train.dtype == torch.float32
    counts = torch.bincount(a.y_test, minlength=10)
    assert counts.min() >= 40 and counts.max() <= 50
    assert abs(float(a.x_train.mean())) < 0.1 and abs(float(a.x_train.std()) - 1) < 0.1
    train_rows = {tuple(r) for r in a.x_train.flatten(1).tolist()}
    overlap = sum(tuple(r) in train_rows for r in a.x_test.flatten(1).tolist())
    assert overlap < 5  # a handful of digits are pixel-identical duplicates in the source set


def test_subset_is_deterministic_and_bounded() -> None:
    ds = data.load_digits()
    s1 = data.subset(ds, 100, seed=3, test_limit=50)
    s2 = data.subset(ds, 100, seed=3, test_limit=50)
    s3 = data.subset(ds, 100, seed=4)
    assert len(s1.y_train) == 100 and len(s1.y_test) == 50
    assert torch.equal(s1.x_train, s2.x_train) and torch.equal(s1.y_test, s2.y_test)
    assert not torch.equal(s1.y_train, s3.y_train)
    assert len(s3.y_test) == len(ds.y_test)
    assert data.subset(ds, None).x_train is ds.x_train
