"""Is-Same-Class (Razin, Maman & Cohen, ICML 2022; REFERENCE §4); data from ../shared/data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA_DIR

from implreg.config import ConfigError
from implreg.problems.images import DataError
from implreg.problems.is_same_class import (
    CPU,
    PAPER,
    IsSameClassData,
    IsSameGeometry,
    LabelledImages,
    geometries,
    is_same_class_splits,
    load_labelled_images,
    make_is_same_class,
    resize_images,
)

DATA = DATA_DIR


def _data(counts=(30, 30, 30, 30), side=8, channels=1, seed=0) -> LabelledImages:
    """Random distinct byte images, class ``c`` repeated ``counts[c]`` times, shuffled."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(counts)), counts)).astype(np.int64)
    images = rng.integers(0, 256, (labels.size, channels, side, side), dtype=np.uint8)
    return LabelledImages(images, labels)


def _unit(images: np.ndarray) -> np.ndarray:
    """Bytes as the float32 output encodes them."""
    return images.astype(np.float32) / np.float32(255)


def _one_sentence(message: str) -> None:
    assert "\n" not in message
    assert ". " not in message.rstrip(".")


# ------------------------------------------------------------------------- sampling


def test_labels_balanced_and_pairs_follow_the_rules():
    data = _data(counts=(40, 2, 7, 25, 60))
    n = 2000
    x, y, idx = make_is_same_class(data, n, IsSameGeometry(20, 8, 2), seed=3, return_indices=True)
    assert x.shape == (n, 1, 20, 20) and x.dtype == np.float32
    assert y.shape == (n,) and y.dtype == np.float32 and set(np.unique(y)) <= {0.0, 1.0}
    assert abs(y.sum() - n / 2) <= 4 * math.sqrt(n / 4)  # 4 binomial standard deviations
    assert idx.shape == (n, 2) and idx.dtype == np.int64
    c1, c2 = data.labels[idx[:, 0]], data.labels[idx[:, 1]]
    pos = y == 1
    assert np.all(c1[pos] == c2[pos]) and np.all(idx[pos, 0] != idx[pos, 1])
    assert np.all(c1[~pos] != c2[~pos])
    # classes are uniform over the classes, not proportional to their sizes
    k, npos = data.num_classes, int(pos.sum())
    freq = np.bincount(c1[pos], minlength=k)
    assert np.all(np.abs(freq - npos / k) <= 4 * math.sqrt(npos / k))
    # the two-image class always gives both of its images
    two = np.flatnonzero(data.labels == 1)
    pairs = idx[pos & (c1 == 1)]
    assert len(pairs) > 0 and all(sorted(p) == sorted(two) for p in pairs)
    # negatives: first class uniform, second uniform over the other classes
    nneg = n - npos
    f1 = np.bincount(c1[~pos], minlength=k)
    assert np.all(np.abs(f1 - nneg / k) <= 4 * math.sqrt(nneg / k))
    f2 = np.bincount(c2[~pos], minlength=k)
    assert np.all(np.abs(f2 - nneg / k) <= 4 * math.sqrt(nneg / k))


def test_canvas_holds_the_two_source_images_and_zeros_elsewhere():
    data = _data(channels=3)
    geo = IsSameGeometry(24, 8, 5)
    x, y, idx = make_is_same_class(data, 200, geo, seed=1, return_indices=True)
    left, right = geo.locations()
    assert x.shape == (200, 3, 24, 24)
    np.testing.assert_array_equal(x[:, :, left.rows, left.cols], _unit(data.images[idx[:, 0]]))
    np.testing.assert_array_equal(x[:, :, right.rows, right.cols], _unit(data.images[idx[:, 1]]))
    mask = np.ones((24, 24), dtype=bool)
    mask[left.rows, left.cols] = mask[right.rows, right.cols] = False
    assert not x[:, :, mask].any()
    xb = make_is_same_class(data, 200, geo, seed=1, dtype="uint8")[0]
    assert xb.dtype == np.uint8
    np.testing.assert_array_equal(xb[:, :, left.rows, left.cols], data.images[idx[:, 0]])


def test_resized_images_are_placed():
    data = _data(side=8)
    geo = IsSameGeometry(16, 4, 3)
    x, _, idx = make_is_same_class(data, 50, geo, seed=0, return_indices=True)
    left, right = geo.locations()
    want = resize_images(data.images[idx[:, 1]], 4) / 255
    np.testing.assert_allclose(x[:, :, right.rows, right.cols], want, rtol=0, atol=1e-7)
    xb = make_is_same_class(data, 50, geo, seed=0, dtype="uint8")[0]
    want_b = np.rint(resize_images(data.images[idx[:, 0]], 4)).astype(np.uint8)
    np.testing.assert_array_equal(xb[:, :, left.rows, left.cols], want_b)


def test_float_source_images():
    rng = np.random.default_rng(0)
    images = rng.random((40, 1, 6, 6), dtype=np.float32)
    data = LabelledImages(images, np.arange(40, dtype=np.int64) % 4)
    geo = IsSameGeometry(12, 6, 0)
    x, _, idx = make_is_same_class(data, 30, geo, seed=2, return_indices=True)
    left, _ = geo.locations()
    np.testing.assert_array_equal(x[:, :, left.rows, left.cols], images[idx[:, 0]])
    xb = make_is_same_class(data, 30, geo, seed=2, dtype="uint8")[0]
    want = np.rint(images[idx[:, 0]] * 255).astype(np.uint8)
    np.testing.assert_array_equal(xb[:, :, left.rows, left.cols], want)


def test_determinism_prefixes_and_streams():
    data = _data()
    geo = IsSameGeometry(20, 8, 4)
    a = make_is_same_class(data, 300, geo, seed=7)
    b = make_is_same_class(data, 300, geo, seed=7)
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    c = make_is_same_class(data, 300, geo, seed=8)
    assert a[0].tobytes() != c[0].tobytes() and a[1].tobytes() != c[1].tobytes()
    d = make_is_same_class(data, 300, geo, seed=7, stream=1)
    assert a[1].tobytes() != d[1].tobytes()
    short = make_is_same_class(data, 40, geo, seed=7)  # sample k depends on (seed, k) only
    assert short[0].tobytes() == a[0][:40].tobytes() and np.array_equal(short[1], a[1][:40])
    empty = make_is_same_class(data, 0, geo, seed=7)
    assert empty[0].shape == (0, 1, 20, 20) and empty[1].shape == (0,)


def test_sampling_arguments_are_checked():
    data = _data()
    geo = IsSameGeometry(20, 8, 4)
    with pytest.raises(ValueError, match="dtype"):
        make_is_same_class(data, 4, geo, 0, dtype="float64")
    with pytest.raises(ValueError, match="n must be"):
        make_is_same_class(data, -1, geo, 0)
    with pytest.raises(TypeError, match="geometry"):
        make_is_same_class(data, 4, (20, 8, 4), 0)
    with pytest.raises(TypeError, match="data"):
        make_is_same_class(data.images, 4, geo, 0)


# ------------------------------------------------------------------------- geometry


def test_geometry_centring_and_gap():
    for canvas, size, gap in [(224, 32, 80), (64, 14, 9), (25, 6, 3), (20, 7, 5)]:
        left, right = IsSameGeometry(canvas, size, gap).locations()
        assert left.height == left.width == right.height == right.width == size
        assert right.left - (left.left + size) == gap
        assert left.top == right.top
        below = canvas - left.top - size
        assert below - left.top in (0, 1)  # vertically centred, extra row below
        after = canvas - (right.left + size)
        assert after - left.left in (0, 1)  # the pair horizontally centred, extra column right


def test_paper_and_cpu_geometries():
    paper = geometries(PAPER)
    assert [g.gap for g in paper] == [0, 40, 80, 120, 160]
    assert paper[0].locations() == ((96, 80, 32, 32), (96, 112, 32, 32))
    assert paper[-1].locations() == ((96, 0, 32, 32), (96, 192, 32, 32))  # against the borders
    cpu = geometries(CPU)
    assert all(g.canvas == 64 and g.image_size == 14 for g in cpu)
    assert cpu[-1].gap == cpu[-1].max_gap  # the long-range case fills the width
    assert cpu[-1].locations()[0].left == 0 and cpu[-1].locations()[1].cols.stop == 64


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((64, 14, 37), "gap 37"),
        ((224, 32, 161), "gap 161"),
        ((64, 33, 0), "image_size 33"),
        ((64, 14, -1), "gap must be non-negative"),
        ((0, 14, 0), "canvas must be positive"),
        ((64, 0, 0), "image_size must be positive"),
        ((64, 14.0, 0), "image_size must be an integer"),
        ((64, 14, True), "gap must be an integer"),
    ],
)
def test_bad_geometry_raises(args, name):
    with pytest.raises(ConfigError, match=name) as info:
        IsSameGeometry(*args)
    _one_sentence(str(info.value))


# ------------------------------------------------------------------------- resizing


def test_resize_area_average_and_bilinear():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (5, 2, 28, 28), dtype=np.uint8)
    half = resize_images(a, 14)
    assert half.dtype == np.float32
    want = a.astype(np.float64).reshape(5, 2, 14, 2, 14, 2).mean(axis=(3, 5))
    np.testing.assert_allclose(half, want, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(resize_images(a, 28), a)
    up = resize_images(a, 32)  # 28 does not divide by 32: bilinear
    assert up.shape == (5, 2, 32, 32) and up.min() >= 0 and up.max() <= 255
    flat = np.full((2, 1, 28, 28), 0.25, dtype=np.float32)
    np.testing.assert_allclose(resize_images(flat, 8), 0.25, atol=1e-6)  # antialiased shrink


# ------------------------------------------------------------------------- npz input


def _save(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_npz_layouts(tmp_path):
    rng = np.random.default_rng(0)
    first = rng.integers(0, 256, (20, 3, 6, 5), dtype=np.uint8)
    labels = np.arange(20) % 2
    keys = {"train_labels": labels, "test_labels": labels}
    cf = _save(tmp_path / "cf.npz", train_images=first, test_images=first, **keys)
    last = first.transpose(0, 2, 3, 1)
    cl = _save(tmp_path / "cl.npz", train_images=last, test_images=last, **keys)
    for path in (cf, cl):
        got = load_labelled_images(path)
        assert got.images.shape == (20, 3, 6, 5) and got.images.dtype == np.uint8
        np.testing.assert_array_equal(got.images, first)
        assert got.labels.dtype == np.int64 and got.num_classes == 2
    gray = _save(tmp_path / "g.npz", train_images=first[:, 0], test_images=first[:, 0], **keys)
    assert load_labelled_images(str(gray), split="test").images.shape == (20, 1, 6, 5)
    floats = _save(
        tmp_path / "f.npz", train_images=first / 255.0, test_images=first / 255.0, **keys
    )
    assert load_labelled_images(floats).images.dtype == np.float32


def test_npz_train_and_test_keys(tmp_path):
    rng = np.random.default_rng(1)
    train = rng.integers(0, 128, (30, 1, 4, 4), dtype=np.uint8)
    test = rng.integers(128, 256, (12, 1, 4, 4), dtype=np.uint8)
    path = _save(
        tmp_path / "s.npz",
        train_images=train,
        train_labels=np.arange(30) % 3,
        test_images=test,
        test_labels=np.arange(12) % 3,
        images=train[:4],  # per-split keys win
        labels=np.zeros(4, dtype=np.int64),
    )
    np.testing.assert_array_equal(load_labelled_images(path, split="train").images, train)
    np.testing.assert_array_equal(load_labelled_images(path, split="test").images, test)
    geo = IsSameGeometry(12, 4, 2)
    sets = is_same_class_splits(path, None, 40, 30, geo, seed=0)
    assert isinstance(sets, IsSameClassData) and sets.num_classes == 3
    assert sets.x_train.shape == (40, 1, 12, 12) and sets.x_test.shape == (30, 1, 12, 12)
    left, _ = geo.locations()
    np.testing.assert_array_equal(
        sets.x_train[:, :, left.rows, left.cols], _unit(train[sets.train_indices[:, 0]])
    )
    np.testing.assert_array_equal(
        sets.x_test[:, :, left.rows, left.cols], _unit(test[sets.test_indices[:, 0]])
    )
    assert sets.x_train.max() < 128 / 255 and sets.x_test.max() >= 128 / 255
    with pytest.raises(ValueError, match="split"):
        load_labelled_images(path, split="valid")


def test_npz_single_set_is_split_deterministically(tmp_path):
    rng = np.random.default_rng(2)
    labels = rng.permutation(np.repeat([3, 5, 9], [10, 12, 23]))
    images = np.arange(labels.size, dtype=np.uint8)[:, None, None].repeat(2, 1).repeat(2, 2)
    path = _save(tmp_path / "one.npz", images=images, labels=labels)
    train, test = (load_labelled_images(path, split=s) for s in ("train", "test"))
    tr, te = train.images[:, 0, 0, 0].astype(int), test.images[:, 0, 0, 0].astype(int)
    assert sorted(np.concatenate([tr, te])) == list(range(labels.size))
    assert list(tr) == sorted(tr) and list(te) == sorted(te)  # file order kept
    for cls in (3, 5, 9):
        members = np.flatnonzero(labels == cls)
        assert list(members[4::5]) == [i for i in te if labels[i] == cls]
    assert train.num_classes == test.num_classes == 3
    again = load_labelled_images(path, split="test")
    np.testing.assert_array_equal(again.images, test.images)


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({"images": np.zeros((6, 4, 4)), "labels": np.zeros(6, dtype=int)}, "a single class"),
        (
            {
                "train_images": np.zeros((5, 4, 4)),
                "train_labels": np.array([0, 0, 0, 1, 1]),
                "test_images": np.zeros((5, 4, 4)),
                "test_labels": np.array([0, 0, 0, 1, 2]),
            },
            "has a single image",
        ),
        ({"images": np.zeros((6, 4, 4))}, "'labels'"),
        ({"labels": np.arange(6) % 2}, "'images'"),
        ({"train_images": np.zeros((6, 4, 4)), "train_labels": np.arange(6) % 2}, "'test_images'"),
        ({"images": np.zeros((6, 4, 4)), "labels": np.arange(6) % 2 * 1.0}, "not integers"),
        ({"images": np.zeros((6, 4, 4)), "labels": np.arange(7) % 2}, "6 images"),
        ({"images": np.zeros((6, 16)), "labels": np.arange(6) % 2}, "2 dimensions"),
        ({"images": np.full((6, 4, 4), 300), "labels": np.arange(6) % 2}, "bytes 0..255"),
        ({"images": np.full((6, 4, 4), 1.5), "labels": np.arange(6) % 2}, "[0, 1]"),
    ],
)
def test_npz_errors_name_file_or_key(tmp_path, arrays, needle):
    path = _save(tmp_path / "bad.npz", **arrays)
    split = "test" if "train_images" in arrays else "train"
    with pytest.raises(DataError) as info:
        load_labelled_images(path, split=split)
    message = str(info.value)
    assert needle in message and str(path) in message
    _one_sentence(message)


def test_files_that_are_not_npz(tmp_path):
    cases = {
        tmp_path / "missing.npz": "no file at",
        tmp_path / "junk.npz": "not a readable .npz",
        tmp_path / "arr.npy": "single array",
    }
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip archive")
    np.save(tmp_path / "arr.npy", np.zeros(3))
    for path, needle in cases.items():
        with pytest.raises(DataError, match=needle) as info:
            load_labelled_images(path)
        assert str(path) in str(info.value)
        _one_sentence(str(info.value))


def test_labelled_images_checks():
    images = np.zeros((4, 1, 3, 3), dtype=np.uint8)
    with pytest.raises(DataError, match="int64"):
        LabelledImages(images, np.array([0, 0, 1, 1], dtype=np.int32))
    with pytest.raises(DataError, match="no images"):
        LabelledImages(images[:0], np.zeros(0, dtype=np.int64))
    got = LabelledImages.from_arrays(images[:, 0] > 0, [0, 0, 1, 1])
    assert got.images.dtype == np.float32 and list(got.counts) == [2, 2]


# ------------------------------------------------------------------------- real data


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_real_datasets(name):
    if not (DATA / name).is_dir():
        pytest.skip(f"no {name}: ../shared/data and $IMPLREG_DATA_DIR are absent")
    test = load_labelled_images(name, DATA, split="test")
    assert test.images.shape == (10000, 1, 28, 28) and test.images.dtype == np.uint8
    assert test.num_classes == 10 and test.labels.dtype == np.int64
    geo = geometries(CPU)[-1]
    sets = is_same_class_splits(name, DATA, 300, 200, geo, seed=0)
    assert sets.x_train.shape == (300, 1, 64, 64) and sets.x_test.shape == (200, 1, 64, 64)
    assert 0.0 <= sets.x_train.min() and sets.x_train.max() <= 1.0
    assert sets.train_indices.max() < 60000 and sets.test_indices.max() < 10000
    _, right = geo.locations()
    want = resize_images(test.images[sets.test_indices[:, 1]], 14) / 255
    np.testing.assert_allclose(sets.x_test[:, :, right.rows, right.cols], want, atol=1e-7)
    train_labels = load_labelled_images(name, DATA).labels
    same = train_labels[sets.train_indices[:, 0]] == train_labels[sets.train_indices[:, 1]]
    np.testing.assert_array_equal(same, sets.y_train == 1)
