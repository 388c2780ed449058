"""Pathfinder generator (Linsley et al. 2018; LRA's Pathfinder32, Tay et al. 2021)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy import ndimage

from implreg.config import ConfigError
from implreg.problems import pathfinder as pf
from implreg.problems.pathfinder import (
    PARAMS,
    PathfinderParams,
    cache_name,
    distractor_length,
    generate,
    load_or_generate,
    save_examples_figure,
)

EIGHT = np.ones((3, 3), bool)


def _disc(shape, centre, radius):
    ii, jj = np.indices(shape)
    return (ii - centre[0]) ** 2 + (jj - centre[1]) ** 2 <= radius**2


def _check_image(image, label, info, length, p: PathfinderParams):
    """Every invariant of one image, from its info (label map before resizing, markers)."""
    lm = info["label_map"].astype(np.int64)
    s = p.antialias
    assert lm.shape == (p.raster, p.raster)
    # snakes never touch: no 8-neighbours with different non-zero ids
    for a, b in (
        (lm[:, :-1], lm[:, 1:]),
        (lm[:-1, :], lm[1:, :]),
        (lm[:-1, :-1], lm[1:, 1:]),
        (lm[:-1, 1:], lm[1:, :-1]),
    ):
        assert not ((a > 0) & (b > 0) & (a != b)).any()
    # A and B have `length` paddles (separate 8-connected dashes), distractors length // 3
    ids = np.unique(lm[lm > 0])
    assert ids.tolist() == list(range(1, 3 + info["distractors"]))
    assert info["distractors"] <= info["distractors_wanted"] == p.distractor_count(length)
    for sid in ids:
        want = length if sid <= 2 else distractor_length(length)
        assert info["paddles"][sid] == want
        assert ndimage.label(lm == sid, structure=EIGHT)[1] == want, f"snake {sid}"
    # no paddle pixel in the padding border
    pad = int(math.ceil(p.padding * s - 0.5))
    if pad > 0:
        border = np.ones_like(lm, bool)
        border[pad:-pad, pad:-pad] = False
        assert not (lm[border] > 0).any()
    # markers: first at A's start; second at A's end (label 1) or B's end (label 0)
    ends = info["ends"]
    np.testing.assert_allclose(info["markers"][0], ends[0, :2])
    np.testing.assert_allclose(info["markers"][1], ends[0, 2:] if label == 1 else ends[1, 2:])
    radius = p.marker_radius * s
    on = lm > 0
    for centre, sid in zip(info["markers"], (1, 1 if label == 1 else 2)):
        disc = _disc(lm.shape, centre, radius)
        assert set(np.unique(lm[disc]).tolist()) == {0, sid}  # lies on its snake, only on it
        near = ndimage.binary_dilation(disc, structure=EIGHT)
        assert not ((lm > 0) & (lm != sid) & near).any()  # touches no other snake
        on |= disc
    # B's start is seed_distance (or more) from A's start
    assert np.hypot(*(ends[0, :2] - ends[1, :2])) >= p.seed_distance * s - 1e-9
    # the image is the area average of paddles and markers
    b = info["raster_per_pixel"]
    mean = on.reshape(p.out_size, b, p.out_size, b).mean(axis=(1, 3))
    np.testing.assert_array_equal(image, np.floor(255 * mean + 0.5).astype(np.uint8))


@pytest.mark.parametrize(
    "name, lengths, n",
    [("lra32", (6, 9, 14), 60), ("paper", (3, 5, 7, 9), 12)],
)
def test_invariants(name, lengths, n):
    p = PARAMS[name]
    for length in lengths:
        images, labels, infos = generate(n, length, name, 11, return_info=True)
        assert len(infos) == n
        for k in range(n):
            _check_image(images[k], labels[k], infos[k], length, p)


def test_invariants_scaled_and_crowded():
    p = PathfinderParams.scaled(64)
    images, labels, infos = generate(20, 9, p, 2, return_info=True)
    assert images.shape == (20, 64, 64)
    for k in range(20):
        _check_image(images[k], labels[k], infos[k], 9, p)
    # LRA32 near the longest accepted length: restarts happen, invariants hold
    images, labels, infos = generate(10, 26, "lra32", 0, return_info=True)
    for k in range(10):
        _check_image(images[k], labels[k], infos[k], 26, PARAMS["lra32"])


def test_determinism_prefix_and_seeds():
    a, la = generate(30, 14, "lra32", 7)
    b, lb = generate(30, 14, "lra32", 7)
    assert a.tobytes() == b.tobytes() and la.tobytes() == lb.tobytes()
    c, lc = generate(10, 14, "lra32", 7)
    assert c.tobytes() == a[:10].tobytes() and lc.tobytes() == la[:10].tobytes()
    d, _ = generate(30, 14, "lra32", 8)
    assert all(not np.array_equal(a[k], d[k]) for k in range(30))
    e, _ = generate(30, 14, "lra32", 7, stream=1)
    assert all(not np.array_equal(a[k], e[k]) for k in range(30))
    f, _ = generate(30, 9, "lra32", 7)
    assert all(not np.array_equal(a[k], f[k]) for k in range(30))
    p1, l1 = generate(3, 5, "paper", 1)
    p2, l2 = generate(5, 5, PathfinderParams.paper(), 1)
    assert p1.tobytes() == p2[:3].tobytes() and l1.tobytes() == l2[:3].tobytes()


def test_random_buffer_growth_changes_nothing(monkeypatch):
    """Images do not depend on how many uniforms the compiled loop is first handed."""
    ref = generate(8, 14, "lra32", 3)
    monkeypatch.setattr(pf, "_FIRST_DRAWS", 5)
    small = generate(8, 14, "lra32", 3)
    assert ref[0].tobytes() == small[0].tobytes() and ref[1].tobytes() == small[1].tobytes()


def test_labels_balanced():
    _, labels = generate(200, 9, "lra32", 123)
    ones = int(labels.sum())
    assert set(np.unique(labels).tolist()) <= {0, 1}
    assert abs(ones - 100) <= 4 * math.sqrt(200 * 0.25)  # 4 standard deviations


@pytest.mark.parametrize("name, size", [("lra32", 32), ("paper", 150)])
def test_shape_dtype_range(name, size):
    images, labels = generate(6, 5, name, 0)
    assert images.shape == (6, size, size) and images.dtype == np.uint8
    assert labels.shape == (6,) and labels.dtype == np.uint8
    assert images.max() == 255  # marker centres are full intensity
    for im in images:
        assert im.min() == 0 and 0 < (im > 0).mean() < 0.5
    empty = generate(0, 5, name, 0)
    assert empty[0].shape == (0, size, size) and empty[1].shape == (0,)


def test_params():
    paper, lra = PathfinderParams.paper(), PathfinderParams.lra32()
    assert PARAMS == {"paper": paper, "lra32": lra}
    assert (paper.window, paper.out_size, paper.padding, paper.paddle_length) == (300, 150, 22, 5)
    assert (paper.paddle_thickness, paper.margin, paper.continuity) == (2, 3, 1.8)
    assert (paper.seed_distance, paper.marker_radius) == (27, 3)
    assert (lra.window, lra.out_size, lra.paddle_length, lra.paddle_thickness) == (32, 32, 2, 0.5)
    assert (lra.margin, lra.seed_distance, lra.marker_radius, lra.continuity) == (1, 7, 1.5, 1.0)
    assert [paper.distractor_count(n) for n in (3, 5, 7, 9)] == [30, 18, 13, 10]
    assert [lra.distractor_count(n) for n in (6, 9, 14)] == [10, 6, 5]  # 20 // (length // 3)
    assert [distractor_length(n) for n in (1, 2, 3, 9, 14)] == [1, 1, 1, 3, 4]
    assert PathfinderParams.scaled(150) == paper
    p64 = PathfinderParams.scaled(64)
    assert p64.out_size == 64 and p64.raster % 64 == 0
    assert p64.margin * p64.antialias >= 1.5 and p64.paddle_thickness * p64.antialias >= 1.7
    with pytest.raises(dataclasses.FrozenInstanceError):
        paper.window = 10  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"out_size": 7}, "out_size"),
        ({"window": 0}, "window"),
        ({"margin": 0.5}, "margin"),
        ({"paddle_thickness": -1.0}, "paddle_thickness"),
        ({"padding": 150.0}, "padding"),
        ({"distractor_rule": "other"}, "distractor_rule"),
        ({"continuity": float("nan")}, "continuity"),
    ],
)
def test_bad_params(kwargs, word):
    with pytest.raises(ConfigError, match=word):
        PathfinderParams(**kwargs)


def _one_sentence(exc: pytest.ExceptionInfo, word: str) -> None:
    msg = str(exc.value)
    assert word in msg and "\n" not in msg and ". " not in msg.rstrip(".")


@pytest.mark.parametrize(
    "args, word",
    [
        ((1, 0, "lra32", 0), "length"),
        ((1, 2.5, "lra32", 0), "length"),
        ((-1, 5, "lra32", 0), "n"),
        ((1, 5, "lra32", -3), "seed"),
        ((1, 5, "lra64", 0), "params"),
        ((1, 31, "lra32", 0), "length"),  # two snakes of 31 paddles do not fit 32 x 32
        ((1, 300, "paper", 0), "length"),
    ],
)
def test_generate_errors(args, word):
    with pytest.raises(ConfigError) as exc:
        generate(*args)
    _one_sentence(exc, word)


def test_placement_failure_raises():
    """Nearly straight snakes of 20 paddles (60 px) cannot fit a 30 px area: a clear error."""
    stiff = dataclasses.replace(PARAMS["lra32"], continuity=50.0)
    with pytest.raises(ConfigError) as exc:
        generate(1, 20, stiff, 0)
    _one_sentence(exc, "length")


def test_cache_roundtrip(tmp_path, monkeypatch):
    images, labels = load_or_generate(tmp_path, 12, 9, "lra32", 4, "train")
    path = tmp_path / cache_name(12, 9, "lra32", 4, "train")
    assert path.is_file() and [q.name for q in tmp_path.iterdir()] == [path.name]
    ref = generate(12, 9, "lra32", 4, stream=pf.split_stream("train"))
    assert images.tobytes() == ref[0].tobytes() and labels.tobytes() == ref[1].tobytes()

    def boom(*args, **kwargs):
        raise AssertionError("generate called although the cache is valid")

    monkeypatch.setattr(pf, "generate", boom)
    again = load_or_generate(tmp_path, 12, 9, "lra32", 4, "train")
    assert again[0].tobytes() == images.tobytes() and again[1].tobytes() == labels.tobytes()


def test_cache_corrupt_or_wrong_file_is_regenerated(tmp_path):
    images, labels = load_or_generate(tmp_path, 10, 6, "lra32", 0, "test")
    path = tmp_path / cache_name(10, 6, "lra32", 0, "test")
    raw = path.read_bytes()
    for damaged in (raw[: len(raw) // 2], b"", b"not a zip file"):
        path.write_bytes(damaged)
        out = load_or_generate(tmp_path, 10, 6, "lra32", 0, "test")
        assert out[0].tobytes() == images.tobytes() and out[1].tobytes() == labels.tobytes()
        assert path.read_bytes() != damaged  # replaced by a whole file
    # a readable file with other contents (another set renamed onto this name)
    np.savez(path, images=images[:5], labels=labels[:5], meta=np.array("{}"))
    out = load_or_generate(tmp_path, 10, 6, "lra32", 0, "test")
    assert out[0].shape == (10, 32, 32) and out[0].tobytes() == images.tobytes()
    assert sorted(q.name for q in tmp_path.iterdir()) == [path.name]  # no temp files left


def test_cache_names_and_splits(tmp_path):
    base = cache_name(100, 9, "lra32", 0, "train")
    others = [
        cache_name(100, 9, "paper", 0, "train"),
        cache_name(101, 9, "lra32", 0, "train"),
        cache_name(100, 6, "lra32", 0, "train"),
        cache_name(100, 9, "lra32", 1, "train"),
        cache_name(100, 9, "lra32", 0, "test"),
    ]
    assert len({base, *others}) == 6 and all(n.endswith(".npz") for n in others)
    train = load_or_generate(tmp_path, 8, 9, "lra32", 0, "train")
    test = load_or_generate(tmp_path, 8, 9, "lra32", 0, "test")
    assert all(not np.array_equal(a, b) for a, b in zip(train[0], test[0]))
    with pytest.raises(ConfigError) as exc:
        load_or_generate(tmp_path, 8, 9, "lra33", 0, "train")
    _one_sentence(exc, "params_name")
    with pytest.raises(ConfigError) as exc:
        load_or_generate(tmp_path, 8, 9, "lra32", 0, "")
    _one_sentence(exc, "split")


def test_save_examples_figure(tmp_path):
    images, labels = generate(6, 9, "lra32", 0)
    out = save_examples_figure(images, labels, tmp_path / "examples.png", ncols=3)
    assert out == tmp_path / "examples.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="labels"):
        save_examples_figure(images, labels[:2], tmp_path / "bad.png")
