"""Patch-centroid inputs (Razin et al. 2021 footnote 10); data from ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from implreg.problems.images import load_dataset
from implreg.problems.patches import PatchCentroids, extract_patches, patch_task_inputs

DATA = Path(
    os.environ.get("IMPLREG_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
needs_data = pytest.mark.skipif(
    not (DATA / "mnist").is_dir(),
    reason="no MNIST: ../shared/data and $IMPLREG_DATA_DIR are absent",
)


def _images(seed: int, n: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w), dtype=np.uint8)


def _naive_patches(images: np.ndarray, size: int, stride: int) -> np.ndarray:
    unit = images / 255.0 if images.dtype == np.uint8 else images
    n, h, w = images.shape
    out = []
    for img in unit:
        row = []
        for top in range(0, h - size + 1, stride):
            for left in range(0, w - size + 1, stride):
                row.append([img[top + i, left + j] for i in range(size) for j in range(size)])
        out.append(row)
    return np.asarray(out, dtype=np.float32).reshape(n, -1, size * size)


def _naive_codes(images: np.ndarray, centroids: np.ndarray, size: int, stride: int):
    patches = _naive_patches(images, size, stride).astype(np.float64)
    c = centroids.astype(np.float64)
    dist = ((patches[:, :, None, :] - c[None, None, :, :]) ** 2).sum(axis=-1)
    return dist.argmin(axis=-1)


@given(
    seed=st.integers(0, 2**31),
    n=st.integers(1, 3),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    size=st.integers(1, 9),
    stride=st.one_of(st.none(), st.integers(1, 4)),
    as_float=st.booleans(),
)
def test_extract_patches_equals_a_naive_loop(seed, n, h, w, size, stride, as_float):
    images = _images(seed, n, h, w)
    if as_float:
        images = images / 255.0
    if size > min(h, w):
        with pytest.raises(ValueError, match="does not fit"):
            extract_patches(images, size, stride)
        return
    got = extract_patches(images, size, stride)
    step = size if stride is None else stride
    assert got.dtype == np.float32
    assert got.shape == (n, ((h - size) // step + 1) * ((w - size) // step + 1), size * size)
    np.testing.assert_array_equal(got, _naive_patches(images, size, step))


def test_mnist_shaped_patches_tile_the_image():
    images = _images(0, 2, 28, 28)
    patches = extract_patches(images, 4)
    assert patches.shape == (2, 49, 16) and patches.min() >= 0 and patches.max() <= 1
    # Non-overlapping patches hold every pixel exactly once.
    assert np.isclose(patches.sum(axis=(1, 2)), images.sum(axis=(1, 2)) / 255.0).all()
    assert extract_patches(images, 5).shape == (2, 25, 25)  # the last 3 rows and columns drop


def test_extract_patches_refuses_bad_input():
    images = _images(0, 2, 6, 6)
    for size, stride in ((0, None), (7, None), (2, 0), (2.5, None)):
        with pytest.raises(ValueError):
            extract_patches(images, size, stride)
    with pytest.raises(ValueError, match="height, width"):
        extract_patches(images[0], 2)
    with pytest.raises(ValueError, match="scaled to"):
        extract_patches(images.astype(np.float32), 2)  # floats must already lie in [0, 1]
    with pytest.raises(ValueError, match="byte values"):
        extract_patches(images.astype(np.int64) + 256, 2)
    with pytest.raises(ValueError, match="dtype"):
        extract_patches(images.astype(np.complex64), 2)


@pytest.mark.parametrize(("size", "stride", "k"), [(2, None, 5), (3, 1, 7), (2, 3, 300)])
def test_encode_is_the_nearest_centroid_by_definition(size, stride, k):
    rng = np.random.default_rng(k)
    images = _images(k, 4, 8, 9)
    cents = PatchCentroids(rng.random((k, size * size), dtype=np.float32), size, stride or size)
    dtype = np.uint8 if k <= 256 else np.int64
    codes = cents.encode(images, dtype=dtype)
    assert codes.dtype == dtype and cents.k == k
    np.testing.assert_array_equal(codes, _naive_codes(images, cents.centroids, size, cents.stride))
    if k > 256:
        with pytest.raises(ValueError, match="do not fit dtype uint8"):
            cents.encode(images)
    with pytest.raises(ValueError, match="do not fit"):
        cents.encode(images, dtype=np.float32)


def test_patch_centroids_refuse_bad_shapes():
    with pytest.raises(ValueError, match="must be"):
        PatchCentroids(np.zeros((4, 5), np.float32), 2, 2)
    with pytest.raises(ValueError, match="at least 2"):
        PatchCentroids(np.zeros((1, 4), np.float32), 2, 2)
    with pytest.raises(ValueError, match="stride"):
        PatchCentroids(np.zeros((3, 4), np.float32), 2, 0)


def test_fit_is_sklearn_kmeans_and_encode_is_its_predict():
    from sklearn import cluster  # a core dependency: a missing install must fail, not skip
    from threadpoolctl import threadpool_limits

    images = _images(5, 40, 8, 8)
    cents = PatchCentroids.fit(images, 6, 2, seed=3)
    patches = extract_patches(images, 2).reshape(-1, 4)
    with threadpool_limits(limits=1, user_api="openmp"):  # as fit runs it
        km = cluster.KMeans(n_clusters=6, n_init=1, random_state=3).fit(patches)
    np.testing.assert_array_equal(cents.centroids, km.cluster_centers_)
    assert cents.centroids.dtype == np.float32 and cents.centroids.shape == (6, 4)
    np.testing.assert_array_equal(cents.encode(images).ravel(), km.predict(patches))
    # Unseen images, overlapping patches and a larger k: still sklearn's nearest centroid.
    other = _images(6, 10, 8, 8)
    km3 = cluster.KMeans(n_clusters=40, n_init=2, random_state=0)
    km3.fit(extract_patches(images, 3, 1).reshape(-1, 9))
    c3 = PatchCentroids(km3.cluster_centers_, 3, 1)
    got = c3.encode(other).ravel()
    np.testing.assert_array_equal(got, km3.predict(extract_patches(other, 3, 1).reshape(-1, 9)))


def test_fit_is_deterministic_given_the_seed():
    images = _images(1, 60, 8, 8)
    a = PatchCentroids.fit(images, 8, 2, seed=4, max_patches=300)
    b = PatchCentroids.fit(images, 8, 2, seed=4, max_patches=300)
    c = PatchCentroids.fit(images, 8, 2, seed=5, max_patches=300)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(a.encode(images), b.encode(images))
    assert not np.array_equal(a.centroids, c.centroids)
    x1 = patch_task_inputs(images[:40], images[40:], 2, 8, seed=4, max_patches=300)
    x2 = patch_task_inputs(images[:40], images[40:], 2, 8, seed=4, max_patches=300)
    assert x1[2] == 8 and x1[0].shape == (40, 16) and x1[1].shape == (20, 16)
    assert x1[0].dtype == np.uint8
    np.testing.assert_array_equal(x1[0], x2[0])
    np.testing.assert_array_equal(x1[1], x2[1])


def test_fit_refuses_bad_arguments():
    images = _images(2, 5, 6, 6)
    for k in (1, 0, 2.5):
        with pytest.raises(ValueError, match="k must be"):
            PatchCentroids.fit(images, k, 2)
    for k in (1, 257):
        with pytest.raises(ValueError, match=r"2\.\.256"):
            patch_task_inputs(images, images, 2, k)
    with pytest.raises(ValueError, match="does not fit"):
        PatchCentroids.fit(images, 4, 7)
    with pytest.raises(ValueError, match="max_patches"):
        PatchCentroids.fit(images, 4, 2, max_patches=0)
    with pytest.raises(ValueError, match="n_init"):
        PatchCentroids.fit(images, 4, 2, n_init=0)
    blank = np.zeros((5, 6, 6), dtype=np.uint8)
    blank[0, :2, :2] = 255
    with pytest.raises(ValueError, match="only 2 distinct patches"):
        PatchCentroids.fit(blank, 3, 2)


@needs_data
def test_mnist_patch_inputs_smoke():
    data = load_dataset("mnist", DATA)
    train, test = data["train"].images[:2000], data["test"].images[:500]
    x_train, x_test, levels = patch_task_inputs(train, test, 4, 16, seed=0, max_patches=20000)
    assert levels == 16
    assert x_train.shape == (2000, 49) and x_test.shape == (500, 49)
    assert x_train.dtype == np.uint8 and int(x_train.max()) <= 15 and int(x_test.max()) <= 15
    assert len(np.unique(x_train)) == 16  # every centroid is the nearest one for some patch
    # The blank patch (most of every digit's frame) has a single code that dominates.
    counts = np.bincount(x_train.ravel(), minlength=16)
    assert counts.max() > 0.3 * x_train.size
    assert x_train[:, 0].tolist() == [x_train[0, 0]] * 2000  # top-left corner is always blank
