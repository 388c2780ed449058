"""The Is-Same-Class benchmark of Razin, Maman & Cohen (ICML 2022).

"Implicit Regularization in Hierarchical Tensor Factorization and Deep
Convolutional Neural Networks" (Razin, Maman & Cohen, ICML 2022) argues that
convolutional networks are implicitly biased towards *locality* (low
separation rank of the function they realize across distant input regions) and
tests it with Is-Same-Class: two images are placed on an otherwise zero canvas
with a horizontal gap ``d`` between them, and the label says whether they show
the same class.  Solving it needs interactions between the two distant image
locations, so a plain CNN's test accuracy drops towards chance as ``d`` grows,
while the paper's locality-countering regularizer (a gradient-alignment penalty
between the two locations) restores it.

Paper setting (:data:`PAPER`): two 32 x 32 CIFAR-10 images on a 224 x 224 zero
canvas, vertically centred, gaps ``d`` in {0, 40, 80, 120, 160} (at 160 the two
images touch the left and right borders), 5000 train and 10000 test pairs.

CPU setting (:data:`CPU`): canvas 64 with 14 x 14 images (MNIST or
Fashion-MNIST downsampled 2x by exact 2 x 2 area averaging) and gaps
``(0, 9, 18, 27, 36)``.  The largest gap, 36 = 64 - 2 * 14, puts the images
against the borders as the paper's 160 does; the gaps are 0, 1/4, 1/2, 3/4 and
all of that largest gap, the paper's progression (0, 40, 80, 120, 160 of 160).
A 64 x 64 input is 12x cheaper per image than 224 x 224 and a power of two, so a
ResNet18's five stride-2 stages end in a 2 x 2 map.

The data source is any labelled image set: MNIST or Fashion-MNIST IDX files
(read with :func:`implreg.problems.images.load_dataset`), or an ``.npz`` file
(see :func:`load_labelled_images`).

Sampling (:func:`make_is_same_class`) is counter based: every random number of
sample ``k`` is a SplitMix64 hash of ``(seed, stream, k, slot)``, so sample ``k``
depends only on ``(seed, stream, k)`` and on the data -- not on ``n`` -- and a
larger ``n`` extends a smaller one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from implreg.config import ConfigError
from implreg.factorizations.cp import _check_int
from implreg.problems.images import DATASETS, DataError, load_dataset

__all__ = [
    "CPU",
    "PAPER",
    "IsSameClassData",
    "IsSameGeometry",
    "LabelledImages",
    "Location",
    "geometries",
    "is_same_class_splits",
    "load_labelled_images",
    "make_is_same_class",
    "resize_images",
]

PAPER = {"canvas": 224, "image_size": 32, "gaps": (0, 40, 80, 120, 160)}
"""Razin, Maman & Cohen (ICML 2022): 32 x 32 images on a 224 x 224 canvas."""

CPU = {"canvas": 64, "image_size": 14, "gaps": (0, 9, 18, 27, 36)}
"""CPU scale: 14 x 14 images (28 x 28 halved by area averaging) on a 64 x 64 canvas."""

SPLITS = ("train", "test")
TEST_EVERY = 5
"""Single-set ``.npz``: every 5th image of each class (in file order) is the test split."""

_RESIZE_CHUNK = 4096  # images per torch.nn.functional.interpolate call
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_SLOTS = 8  # random numbers reserved per sample (5 used)


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True, eq=False)
class LabelledImages:
    """A labelled image set: ``images`` ``(n, C, H, W)`` and integer ``labels`` ``(n,)``.

    ``images`` are uint8 bytes 0..255 or float32 values in [0, 1]; ``labels``
    are int64 (any integer values; the distinct values are the classes).
    Construction checks what Is-Same-Class needs -- at least two classes, and at
    least two images of every class (a positive pair holds two distinct images of
    one class) -- and raises :class:`~implreg.problems.images.DataError` naming
    ``source`` otherwise.  :meth:`from_arrays` converts other layouts and dtypes.
    """

    images: np.ndarray
    labels: np.ndarray
    source: str = "arrays"
    _classes: np.ndarray = field(init=False, repr=False)
    _counts: np.ndarray = field(init=False, repr=False)
    _starts: np.ndarray = field(init=False, repr=False)
    _order: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        images, labels, src = self.images, self.labels, self.source
        if not isinstance(images, np.ndarray) or images.ndim != 4:
            raise DataError(f"the images of {src} must be an (n, C, H, W) array")
        if images.dtype not in (np.uint8, np.float32):
            raise DataError(f"the images of {src} must be uint8 or float32, not {images.dtype}")
        if images.dtype == np.float32 and images.size:
            lo, hi = float(images.min()), float(images.max())
            if not (lo >= 0.0 and hi <= 1.0):
                raise DataError(f"the float images of {src} must lie in [0, 1], not {lo}..{hi}")
        if not isinstance(labels, np.ndarray) or labels.ndim != 1 or labels.dtype != np.int64:
            raise DataError(f"the labels of {src} must be an int64 vector (n,)")
        if images.shape[0] != labels.shape[0]:
            raise DataError(f"{src} has {images.shape[0]} images but {labels.shape[0]} labels")
        if min(images.shape[1:]) < 1:
            raise DataError(f"the images of {src} have an empty axis, shape {images.shape}")
        classes, counts = np.unique(labels, return_counts=True)
        if classes.size < 2:
            what = "no images" if classes.size == 0 else f"a single class ({int(classes[0])})"
            raise DataError(
                f"{src} has {what}; Is-Same-Class needs negative pairs from two classes"
            )
        if counts.min() < 2:
            bad = int(classes[np.argmin(counts)])
            raise DataError(
                f"class {bad} of {src} has a single image; "
                "a positive pair needs two distinct images of one class"
            )
        order = np.argsort(labels, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        for name, value in (
            ("_classes", classes),
            ("_counts", counts),
            ("_starts", starts),
            ("_order", order),
        ):
            object.__setattr__(self, name, value)

    @property
    def num_classes(self) -> int:
        """The number of distinct labels."""
        return int(self._classes.size)

    @property
    def classes(self) -> np.ndarray:
        """The distinct labels, ascending."""
        return self._classes.copy()

    @property
    def counts(self) -> np.ndarray:
        """Images per class, in the order of :attr:`classes`."""
        return self._counts.copy()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @classmethod
    def from_arrays(cls, images, labels, source: str = "arrays") -> LabelledImages:
        """Check and convert arrays in the layouts :func:`load_labelled_images` accepts.

        ``images``: ``(n, H, W)`` (one channel is added), ``(n, H, W, C)``
        (channels-last, taken when the last axis is 1 or 3 and the second is
        not) or ``(n, C, H, W)``.  Integer images must hold bytes 0..255 (kept
        as uint8); float images must lie in [0, 1] (kept as float32); boolean
        images become float32 0/1.  ``labels`` must have an integer dtype.
        """
        return cls(_images_array(images, source), _labels_array(labels, source), source)


def _images_array(images, where: str) -> np.ndarray:
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4:
        if arr.shape[3] in (1, 3) and arr.shape[1] not in (1, 3):
            arr = arr.transpose(0, 3, 1, 2)
    else:
        raise DataError(
            f"the images of {where} have {arr.ndim} dimensions, "
            "not (n, H, W), (n, H, W, C) or (n, C, H, W)"
        )
    if arr.dtype == np.bool_:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 255):
            raise DataError(f"the integer images of {where} must hold bytes 0..255")
        return np.ascontiguousarray(arr, dtype=np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and not (float(arr.min()) >= 0.0 and float(arr.max()) <= 1.0):
            raise DataError(f"the float images of {where} must lie in [0, 1] (and be finite)")
        return np.ascontiguousarray(arr, dtype=np.float32)
    raise DataError(f"the images of {where} have dtype {arr.dtype}, not integers or floats")


def _labels_array(labels, where: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise DataError(f"the labels of {where} must be a vector (n,), not shape {arr.shape}")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"the labels of {where} have dtype {arr.dtype}, not integers")
    return arr.astype(np.int64)


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


def _from_idx(name: str, split: str, data_dir) -> LabelledImages:
    part = load_dataset(name, data_dir)[split]
    return LabelledImages.from_arrays(part.images, part.labels, f"{name} ({split})")


def load_labelled_images(
    source: str | os.PathLike, data_dir: str | os.PathLike | None = None, split: str = "train"
) -> LabelledImages:
    """One split of a labelled image set as :class:`LabelledImages`.

    ``source`` is ``"mnist"`` or ``"fashion-mnist"`` -- read from
    ``data_dir/<name>/`` (or ``$IMPLREG_DATA_DIR``) by
    :func:`~implreg.problems.images.load_dataset`, uint8 ``(n, 1, 28, 28)`` --
    or the path of an ``.npz`` file (``data_dir`` is then ignored) holding

    - ``train_images``/``train_labels`` and ``test_images``/``test_labels``:
      ``split`` picks the pair; or
    - ``images``/``labels`` only: one set, split deterministically and
      stratified: within each class, in file order, every 5th image (the 5th,
      10th, ...) is ``test`` and the rest ``train`` -- no seed involved.  A
      class of 5-9 images then has a single test image (a ``DataError`` for
      ``split="test"``) and one of 1-4 none; give per-split keys instead.

    Per-split keys win when present.  Images and labels are converted as
    :meth:`LabelledImages.from_arrays` describes.  Raises
    :class:`~implreg.problems.images.DataError`, one sentence naming the file
    or key, for a missing file, a file that is not an ``.npz`` archive, a
    missing key, images of the wrong rank, non-integer labels, image and label
    counts that differ, fewer than two classes, or a class with one image.
    """
    split = _check_split(split)
    if isinstance(source, str) and source in DATASETS:
        return _from_idx(source, split, data_dir)
    return _from_npz(Path(source), split)


def _from_npz(path: Path, split: str) -> LabelledImages:
    if not path.is_file():
        raise DataError(
            f"no file at {path} (a source is {', '.join(map(repr, DATASETS))} or an .npz path)"
        )
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:  # OSError, ValueError, zipfile.BadZipFile, EOFError ...
        raise DataError(f"{path} is not a readable .npz archive ({type(exc).__name__})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(f"{path} holds a single array, not an .npz archive of named arrays")
    with loaded as archive:
        keys = set(archive.files)
        pair = (f"{split}_images", f"{split}_labels")
        whole = not (pair[0] in keys or pair[1] in keys)
        if whole and {"train_images", "train_labels", "test_images", "test_labels"} & keys:
            raise DataError(f"{path} has no {pair[0]!r} key")
        chosen = ("images", "labels") if whole else pair
        for key in chosen:
            if key not in keys:
                raise DataError(f"{path} has no {key!r} key")
        arrays = []
        for key in chosen:
            try:
                arrays.append(archive[key])
            except Exception as exc:  # object arrays (pickles), corrupt members
                raise DataError(
                    f"{path} has an unreadable {key!r} array ({type(exc).__name__})"
                ) from None
        images, labels = arrays
    where_i, where_l = f"{path} (key {chosen[0]!r})", f"{path} (key {chosen[1]!r})"
    images, labels = _images_array(images, where_i), _labels_array(labels, where_l)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{path} has {images.shape[0]} images under {chosen[0]!r} "
            f"but {labels.shape[0]} labels under {chosen[1]!r}"
        )
    if whole:
        keep = _single_set_split(labels, split)
        images, labels = images[keep], labels[keep]
        source = f"the {split} part of {path} (every {TEST_EVERY}th image of a class is test)"
    else:
        source = f"{path} (keys {chosen[0]!r}, {chosen[1]!r})"
    return LabelledImages(images, labels, source)


def _single_set_split(labels: np.ndarray, split: str) -> np.ndarray:
    """Indices of ``split`` (file order): every ``TEST_EVERY``-th image per class is test."""
    order = np.argsort(labels, kind="stable")
    _, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    rank = np.arange(labels.size) - np.repeat(starts, counts)
    test = np.zeros(labels.size, dtype=bool)
    test[order] = rank % TEST_EVERY == TEST_EVERY - 1
    return np.flatnonzero(test if split == "test" else ~test)


# ------------------------------------------------------------------------- geometry


class Location(NamedTuple):
    """A rectangle of the canvas: top row, left column, height and width (pixels)."""

    top: int
    left: int
    height: int
    width: int

    @property
    def rows(self) -> slice:
        return slice(self.top, self.top + self.height)

    @property
    def cols(self) -> slice:
        return slice(self.left, self.left + self.width)


@dataclass(frozen=True)
class IsSameGeometry:
    """Two ``image_size`` squares on a ``canvas`` x ``canvas`` canvas, ``gap`` columns apart.

    Both images are vertically centred; the pair (two images and the gap) is
    horizontally centred.  When the free space is odd the extra row goes below
    and the extra column to the right: ``top = (canvas - image_size) // 2``,
    ``left = (canvas - 2 * image_size - gap) // 2``.  Invalid geometries raise
    :class:`~implreg.config.ConfigError` on construction (see :meth:`check`).
    """

    canvas: int
    image_size: int
    gap: int

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ``ConfigError`` naming the argument unless the two images and the gap fit."""
        for name, minimum in (("canvas", 1), ("image_size", 1), ("gap", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
            if value < minimum:
                what = "positive" if minimum else "non-negative"
                raise ConfigError(f"{name} must be {what}, got {value}")
        need = 2 * self.image_size + self.gap
        if 2 * self.image_size > self.canvas:
            raise ConfigError(
                f"image_size {self.image_size} does not fit: two images side by side need "
                f"{2 * self.image_size} pixels but the canvas is {self.canvas} wide"
            )
        if need > self.canvas:
            raise ConfigError(
                f"gap {self.gap} does not fit: two {self.image_size}-pixel images {self.gap} "
                f"pixels apart need {need} pixels but the canvas is {self.canvas} wide "
                f"(largest gap {self.canvas - 2 * self.image_size})"
            )

    @property
    def max_gap(self) -> int:
        """The largest gap on this canvas: the images then touch the left and right borders."""
        return self.canvas - 2 * self.image_size

    def locations(self) -> tuple[Location, Location]:
        """The ``(top, left, height, width)`` of the first (left) and second (right) image."""
        s = self.image_size
        top = (self.canvas - s) // 2
        left = (self.canvas - 2 * s - self.gap) // 2
        return Location(top, left, s, s), Location(top, left + s + self.gap, s, s)


def geometries(spec: dict = CPU) -> tuple[IsSameGeometry, ...]:
    """One :class:`IsSameGeometry` per gap of ``spec`` (:data:`PAPER` or :data:`CPU`)."""
    return tuple(IsSameGeometry(spec["canvas"], spec["image_size"], g) for g in spec["gaps"])


# ------------------------------------------------------------------------- resizing


def resize_images(images, size: int) -> np.ndarray:
    """``(n, C, H, W)`` images resized to ``(n, C, size, size)`` float32, in the input's units.

    When ``size`` divides both ``H`` and ``W`` (including ``size == H == W``)
    each output pixel is the exact mean of its ``H/size x W/size`` block (area
    averaging; 28 -> 14 averages 2 x 2 blocks).  Otherwise the images go
    through ``torch.nn.functional.interpolate(mode="bilinear",
    align_corners=False, antialias=True)``, which low-pass filters when
    shrinking.  Both are convex combinations of input pixels, so bytes stay in
    0..255 and [0, 1] images in [0, 1].  Non-square images are stretched to a
    square.
    """
    size = _check_int("size", size, minimum=1)
    arr = np.asarray(images)
    if arr.ndim != 4:
        raise ValueError(f"images must be (n, C, H, W), got shape {arr.shape}")
    n, c, h, w = arr.shape
    if h % size == 0 and w % size == 0:
        fh, fw = h // size, w // size
        if fh == fw == 1:
            return arr.astype(np.float32)
        out = np.zeros((n, c, size, size), dtype=np.float32)
        for a in range(fh):  # strided block sums: much faster than a reshape + mean
            for b in range(fw):
                out += arr[:, :, a::fh, b::fw]
        return np.multiply(out, np.float32(1.0 / (fh * fw)), out=out)
    out = np.empty((n, c, size, size), dtype=np.float32)
    for lo in range(0, n, _RESIZE_CHUNK):
        chunk = torch.from_numpy(np.ascontiguousarray(arr[lo : lo + _RESIZE_CHUNK], np.float32))
        res = torch.nn.functional.interpolate(
            chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
        out[lo : lo + _RESIZE_CHUNK] = res.numpy()
    lo, hi = (0.0, 255.0) if arr.dtype == np.uint8 else (0.0, 1.0)
    return np.clip(out, lo, hi, out=out)


def _prepare(images: np.ndarray, size: int, dtype: np.dtype) -> np.ndarray:
    """Source images resized to ``size`` in the output encoding (bytes, or [0, 1] floats)."""
    byte = images.dtype == np.uint8
    if dtype == np.uint8 and byte and images.shape[2:] == (size, size):
        return images
    res = resize_images(images, size)
    if dtype == np.uint8:
        scaled = res if byte else res * np.float32(255.0)
        return np.rint(scaled).clip(0, 255).astype(np.uint8)
    return res / np.float32(255.0) if byte else res


# ------------------------------------------------------------------------- sampling


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _uniform_bits(seed: int, stream: int, n: int) -> np.ndarray:
    """``(n, _SLOTS)`` uint64 hashes, entry ``(k, j)`` a function of (seed, stream, k, j) only."""
    key = _splitmix64(np.array([seed], dtype=np.uint64))
    key = _splitmix64(key ^ np.array([stream], dtype=np.uint64))
    counter = np.arange(n * _SLOTS, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return _splitmix64(key + counter * _GOLDEN).reshape(n, _SLOTS)


def _below(bits: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Integers uniform in ``0..m-1`` from 64-bit hashes (53-bit float, bias < m / 2**53)."""
    unit = (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return np.minimum((unit * m).astype(np.int64), np.asarray(m, dtype=np.int64) - 1)


def _check_dtype(dtype) -> np.dtype:
    try:
        out = np.dtype(dtype)
    except TypeError:
        out = None
    if out not in (np.dtype(np.float32), np.dtype(np.uint8)):
        raise ValueError(f"dtype must be 'float32' or 'uint8', got {dtype!r}")
    return out


def make_is_same_class(
    data: LabelledImages,
    n: int,
    geometry: IsSameGeometry,
    seed: int,
    *,
    dtype: str = "float32",
    stream: int = 0,
    return_indices: bool = False,
):
    """``n`` Is-Same-Class samples ``(x, y)`` (Razin, Maman & Cohen, ICML 2022).

    Per sample ``k``: a fair coin sets the label ``y``.  For ``y = 1`` a class
    is chosen uniformly among the classes of ``data`` and two distinct images of
    it are drawn uniformly without replacement (the first uniform over the
    class, the second uniform over the rest of it).  For ``y = 0`` the first
    image's class is uniform over all classes, the second's uniform over the
    *other* classes, and each image is uniform within its class.  The first
    image goes to the left location of ``geometry``, the second to the right;
    the rest of the canvas is 0.  Images are resized to
    ``geometry.image_size`` by :func:`resize_images`.

    ``x`` is ``(n, C, canvas, canvas)``: with ``dtype="float32"`` (default)
    values in [0, 1] (bytes divided by 255, no mean/std normalization -- do
    that on the training set if wanted); with ``dtype="uint8"`` bytes 0..255
    (float sources are scaled by 255 and rounded), a quarter of the memory --
    at the paper's canvas 10000 samples are 2.0 GB in float32 and 0.5 GB in
    uint8; convert batches with ``x.astype(np.float32) / 255``.  ``y`` is
    float32 0/1 ``(n,)``.

    Every random number of sample ``k`` is a SplitMix64 hash of
    ``(seed, stream, k, slot)``: the sample depends only on those and the
    data, not on ``n`` (the first ``m`` samples of ``n > m`` are the ``m``
    samples).  Use another ``stream`` for an independent set from one seed
    (:func:`is_same_class_splits` uses 0 for train and 1 for test).  With
    ``return_indices=True`` also returns ``(n, 2)`` int64 indices into ``data``
    of the left and right image.
    """
    if not isinstance(data, LabelledImages):
        raise TypeError(f"data must be LabelledImages, got {type(data).__name__}")
    if not isinstance(geometry, IsSameGeometry):
        raise TypeError(f"geometry must be an IsSameGeometry, got {type(geometry).__name__}")
    n = _check_int("n", n, minimum=0)
    seed = _check_int("seed", seed, minimum=0)
    stream = _check_int("stream", stream, minimum=0)
    if seed >= 1 << 64 or stream >= 1 << 64:
        raise ValueError("seed and stream must be below 2**64")
    out_dtype = _check_dtype(dtype)

    bits = _uniform_bits(seed, stream, n)
    k_classes = data.num_classes
    y = (bits[:, 0] >> np.uint64(63)).astype(np.int64)
    c1 = _below(bits[:, 1], k_classes)
    other = _below(bits[:, 3], k_classes - 1)
    c2 = np.where(y == 1, c1, other + (other >= c1))
    counts, starts, order = data._counts, data._starts, data._order
    p1 = _below(bits[:, 2], counts[c1])
    draw = _below(bits[:, 4], counts[c2] - y)  # positives: uniform over the rest of the class
    p2 = np.where(y == 1, draw + (draw >= p1), draw)
    i1, i2 = order[starts[c1] + p1], order[starts[c2] + p2]

    channels = data.images.shape[1]
    x = np.zeros((n, channels, geometry.canvas, geometry.canvas), dtype=out_dtype)
    if n:
        used, inverse = np.unique(np.concatenate([i1, i2]), return_inverse=True)
        prepared = _prepare(data.images[used], geometry.image_size, out_dtype)
        for loc, inv in zip(geometry.locations(), (inverse[:n], inverse[n:])):
            x[:, :, loc.rows, loc.cols] = prepared[inv]
    y_out = y.astype(np.float32)
    if return_indices:
        return x, y_out, np.stack([i1, i2], axis=1)
    return x, y_out


@dataclass(frozen=True, eq=False)
class IsSameClassData:
    """Train and test Is-Same-Class sets; ``*_indices`` index the source's train/test split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    train_indices: np.ndarray
    test_indices: np.ndarray
    geometry: IsSameGeometry
    num_classes: int


def is_same_class_splits(
    source: str | os.PathLike,
    data_dir: str | os.PathLike | None,
    n_train: int,
    n_test: int,
    geometry: IsSameGeometry,
    seed: int,
    *,
    dtype: str = "float32",
    classes: tuple[int, ...] | None = None,
) -> IsSameClassData:
    """Train pairs from the source's train split, test pairs from its test split.

    ``classes``: keep only the images of these labels (at least two; each must be
    present in both splits), e.g. ``(0, 1)`` for a two-class version.

    ``source``/``data_dir`` as in :func:`load_labelled_images` (an ``.npz``
    without per-split keys is split deterministically, every 5th image of each
    class being test).  Train samples use ``stream=0`` and test samples
    ``stream=1`` of :func:`make_is_same_class` with the same ``seed``, so the two
    sets' coins and draws are independent.  The paper uses 5000 train and 10000
    test pairs.
    """
    if isinstance(source, str) and source in DATASETS:
        both = load_dataset(source, data_dir)
        parts = {
            s: LabelledImages.from_arrays(both[s].images, both[s].labels, f"{source} ({s})")
            for s in SPLITS
        }
    else:
        parts = {s: load_labelled_images(source, data_dir, s) for s in SPLITS}
    if classes is not None:
        parts = {s: _keep_classes(parts[s], classes, f"{source} ({s})") for s in SPLITS}
    if parts["train"].images.shape[1] != parts["test"].images.shape[1]:
        raise DataError(
            f"the train and test images of {source} have different channel counts "
            f"({parts['train'].images.shape[1]} and {parts['test'].images.shape[1]})"
        )
    x_tr, y_tr, i_tr = make_is_same_class(
        parts["train"], n_train, geometry, seed, dtype=dtype, stream=0, return_indices=True
    )
    x_te, y_te, i_te = make_is_same_class(
        parts["test"], n_test, geometry, seed, dtype=dtype, stream=1, return_indices=True
    )
    classes = np.union1d(parts["train"].classes, parts["test"].classes)
    return IsSameClassData(x_tr, y_tr, x_te, y_te, i_tr, i_te, geometry, int(classes.size))


def _keep_classes(data: LabelledImages, classes, where: str) -> LabelledImages:
    """The images of ``data`` whose label is in ``classes`` (checked like any image set)."""
    wanted = np.asarray(sorted({int(c) for c in classes}), dtype=np.int64)
    missing = np.setdiff1d(wanted, data.classes)
    if missing.size:
        raise DataError(f"{where} has no image of class {int(missing[0])} named in classes")
    keep = np.isin(data.labels, wanted)
    return LabelledImages.from_arrays(data.images[keep], data.labels[keep], where)
