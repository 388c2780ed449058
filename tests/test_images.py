"""IDX reading and image prediction tasks (REFERENCE §2); data from ../shared/data."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from implreg.problems.images import (
    DataError,
    discretize,
    image_task,
    load_dataset,
    one_vs_all,
    rand_image,
    rand_label,
    read_idx,
    resolve_data_dir,
)

DATA = Path(
    os.environ.get("IMPLREG_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
needs_data = pytest.mark.skipif(
    not (DATA / "mnist").is_dir(),
    reason="no MNIST: ../shared/data and $IMPLREG_DATA_DIR are absent",
)


def _idx(array: np.ndarray, code: int = 0x08) -> bytes:
    head = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return head + array.astype(np.uint8).tobytes()


def test_read_idx_raw_and_gzip(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(_idx(arr))
    (tmp_path / "a.gz").write_bytes(gzip.compress(_idx(arr)))
    assert np.array_equal(read_idx(tmp_path / "a"), arr)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x05", "magic number"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "unknown IDX data type"),
        (b"\x00\x00\x08\x03\x00\x00", "truncated IDX header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02", "(truncated)"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x01\x01\x02", "(trailing bytes)"),
        (b"\x1f\x8bnot really gzip", "not a valid gzip"),
    ],
)
def test_read_idx_refuses_corrupt_files(tmp_path, content, message):
    (tmp_path / "bad").write_bytes(content)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_idx(tmp_path / "bad")


def test_missing_and_mismatched(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no IDX file"):
        read_idx(tmp_path / "nothing")
    monkeypatch.delenv("IMPLREG_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="no data directory given"):
        resolve_data_dir(None)
    with pytest.raises(DataError, match="does not exist"):
        resolve_data_dir(tmp_path / "missing")
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(DataError, match="no mnist/ folder"):
        load_dataset("mnist", tmp_path)
    folder = tmp_path / "mnist"
    folder.mkdir()
    imgs = np.zeros((3, 2, 2), dtype=np.uint8)
    for split in ("train", "t10k"):
        (folder / f"{split}-images-idx3-ubyte").write_bytes(_idx(imgs))
        (folder / f"{split}-labels-idx1-ubyte").write_bytes(_idx(np.array([1, 2], dtype=np.uint8)))
    with pytest.raises(DataError, match="3 images but"):
        load_dataset("mnist", tmp_path)
    for split in ("train", "t10k"):
        (folder / f"{split}-labels-idx1-ubyte").write_bytes(_idx(np.array([1, 2, 11], np.uint8)))
    with pytest.raises(DataError, match="outside 0-9"):
        load_dataset("mnist", tmp_path)
    monkeypatch.setenv("IMPLREG_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path


@needs_data
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_real_datasets(name):
    data = load_dataset(name, DATA)
    assert data["train"].images.shape == (60000, 28, 28)
    assert data["test"].images.shape == (10000, 28, 28)
    counts = np.bincount(data["train"].labels, minlength=10)
    if name == "mnist":
        assert counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    else:
        assert counts.tolist() == [6000] * 10


def test_discretize_and_labels():
    imgs = np.array([[[0, 127], [128, 255]]], dtype=np.uint8)
    assert discretize(imgs).tolist() == [[0, 0, 1, 1]]
    assert discretize(imgs, 4).tolist() == [[0, 1, 2, 3]]
    with pytest.raises(ValueError):
        discretize(imgs, 1)
    assert one_vs_all(np.array([3, 1, 3]), 3).tolist() == [1.0, 0.0, 1.0]
    for bad in (-1, 10):
        with pytest.raises(ValueError, match="0-9"):
            one_vs_all(np.array([1]), bad)


def test_random_variants_are_seeded():
    a = rand_image((500, 784), levels=2, rng=np.random.default_rng(1))
    b = rand_image((500, 784), levels=2, rng=np.random.default_rng(1))
    assert np.array_equal(a, b) and abs(a.mean() - 0.5) < 0.01
    labels = np.arange(100) % 10
    p = rand_label(labels, rng=np.random.default_rng(2))
    assert sorted(p.tolist()) == sorted(labels.tolist()) and not np.array_equal(p, labels)


@needs_data
def test_image_task_variants():
    data = load_dataset("mnist", DATA)
    small = {k: type(v)(v.images[:2000], v.labels[:2000]) for k, v in data.items()}
    orig = image_task(small, 6)
    assert orig.order == 784 and orig.levels == 2
    assert set(np.unique(orig.x_train)) <= {0, 1}
    assert orig.y_train.mean() == pytest.approx((small["train"].labels == 6).mean())
    ri = image_task(small, 6, variant="rand_image", seed=1)
    assert np.array_equal(ri.y_train, orig.y_train) and not np.array_equal(ri.x_train, orig.x_train)
    rl = image_task(small, 6, variant="rand_label", seed=1)
    assert np.array_equal(rl.x_train, orig.x_train) and rl.y_train.sum() == orig.y_train.sum()
    with pytest.raises(ValueError, match="unknown variant"):
        image_task(small, 6, variant="shuffled")
