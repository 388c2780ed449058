"""Image datasets as tensor completion (Razin et al. 2021, Section 5.2, Figure 1).

A binary image of N pixels is an index into an order-N tensor with modes of
size 2; its label is the entry at that index.  This module reads MNIST and
Fashion-MNIST from IDX files in a directory the user gives (no downloads),
validates them, and builds the prediction tasks of the paper: binarization at
byte value >= 128 (or k gray levels), one-vs-all labels on the 0/1 scale, and
the random variants "rand image" (i.i.d. Bernoulli(1/2) pixels) and "rand
label" (labels permuted within train and within test).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from implreg.factorizations.cp import _check_int

DATASETS = ("mnist", "fashion-mnist")
ENV_DATA_DIR = "IMPLREG_DATA_DIR"
_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(ValueError):
    """A missing, corrupt, truncated or mismatched data file, stated in one sentence."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or gzip), validating magic number, dimensions and length.

    Raises :class:`DataError` naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no IDX file at {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path} is not a valid gzip file ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} does not start with an IDX magic number")
    code, ndim = raw[2], raw[3]
    if code not in _DTYPES:
        raise DataError(f"{path} has an unknown IDX data type code 0x{code:02x}")
    if ndim < 1 or len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path} has a truncated IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[code])
    expect = int(np.prod(dims)) * dtype.itemsize
    body = raw[4 + 4 * ndim :]
    if len(body) != expect:
        raise DataError(
            f"{path} holds {len(body)} data bytes but its header {dims} needs {expect}"
            + (" (truncated)" if len(body) < expect else " (trailing bytes)")
        )
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The folder holding mnist/ and fashion-mnist/: the argument, else $IMPLREG_DATA_DIR."""
    if data_dir is None:
        data_dir = os.environ.get(ENV_DATA_DIR)
        if not data_dir:
            raise DataError(f"no data directory given: pass --data-dir or set ${ENV_DATA_DIR}")
    path = Path(data_dir)
    if path.exists() and not path.is_dir():
        raise DataError(f"the data directory {path} is a file, not a folder")
    if not path.is_dir():
        raise DataError(f"the data directory {path} does not exist")
    return path


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder} has no {stem} or {stem}.gz")


@dataclass(frozen=True)
class ImageSplit:
    """Images ``(n, 28, 28)`` uint8 and labels ``(n,)`` uint8 of one split."""

    images: np.ndarray
    labels: np.ndarray


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> dict[str, ImageSplit]:
    """MNIST or Fashion-MNIST (``train`` and ``test`` splits) from ``data_dir/name/``.

    Checks that images are ``(n, H, W)`` uint8, labels ``(n,)`` uint8 in 0..9 and
    that the counts agree.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}")
    folder = resolve_data_dir(data_dir) / name
    if not folder.is_dir():
        raise DataError(f"the data directory has no {name}/ folder ({folder})")
    out = {}
    for split, (img_stem, lab_stem) in _SPLIT_FILES.items():
        img_path, lab_path = _find(folder, img_stem), _find(folder, lab_stem)
        images, labels = read_idx(img_path), read_idx(lab_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataError(f"{img_path} is not an (n, height, width) array of bytes")
        if labels.ndim != 1 or labels.dtype != np.uint8:
            raise DataError(f"{lab_path} is not a vector of byte labels")
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{img_path} has {images.shape[0]} images "
                f"but {lab_path} has {labels.shape[0]} labels"
            )
        if labels.size and int(labels.max()) > 9:
            raise DataError(f"{lab_path} has a label {int(labels.max())} outside 0-9")
        out[split] = ImageSplit(images, labels)
    return out


def discretize(images: np.ndarray, levels: int = 2) -> np.ndarray:
    """Pixel indices in ``0..levels-1``; ``levels=2`` is the paper's value >= 128 (round(v/255)).

    Gray levels split 0..255 into ``levels`` equal bins.  Returns ``(n, H*W)`` uint8.
    """
    levels = _check_levels(levels)
    images = np.asarray(images)
    if images.ndim < 2:
        raise ValueError(f"images must be (n, height, width), got shape {images.shape}")
    if not np.issubdtype(images.dtype, np.integer):
        raise TypeError(f"images must hold integer byte values 0..255, got dtype {images.dtype}")
    if images.size and (int(images.min()) < 0 or int(images.max()) > 255):
        raise ValueError(
            f"images must hold byte values 0..255, got {int(images.min())}..{int(images.max())}"
        )
    flat = images.reshape(images.shape[0], -1).astype(np.int64)
    if levels == 2:
        return (flat >= 128).astype(np.uint8)
    return np.minimum(flat * levels // 256, levels - 1).astype(np.uint8)


def _check_levels(levels) -> int:
    levels = _check_int("levels", levels)
    if levels < 2 or levels > 256:
        raise ValueError(f"levels must lie in 2..256, got {levels}")
    return levels


def _check_rng(rng) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return rng


def one_vs_all(labels: np.ndarray, cls: int) -> np.ndarray:
    """Labels 1.0 for class ``cls`` and 0.0 otherwise (the paper's 0/1 scale)."""
    cls = _check_int("cls", cls)
    labels = np.asarray(labels)
    if not 0 <= cls <= 9:
        raise ValueError(f"the class must lie in 0-9, got {cls}")
    return (labels == cls).astype(np.float64)


def rand_image(shape: tuple[int, ...], *, levels: int, rng: np.random.Generator) -> np.ndarray:
    """The "rand image" variant: i.i.d. uniform pixel indices (Bernoulli(1/2) for two levels)."""
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    shape = tuple(_check_int(f"shape[{i}]", d, minimum=0) for i, d in enumerate(shape))
    levels = _check_levels(levels)
    _check_rng(rng)
    return rng.integers(0, levels, size=shape, dtype=np.uint8)


def rand_label(labels: np.ndarray, *, rng: np.random.Generator) -> np.ndarray:
    """The "rand label" variant: a seeded permutation of the labels of one split."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional (n,), got shape {labels.shape}")
    _check_rng(rng)
    return labels[rng.permutation(labels.shape[0])]


@dataclass(frozen=True)
class PredictionTask:
    """A prediction task as tensor completion: index tuples ``x`` (n, N) and targets ``y`` (n,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    levels: int

    @property
    def order(self) -> int:
        return self.x_train.shape[1]


def image_task(
    data: dict[str, ImageSplit],
    cls: int,
    *,
    variant: str = "original",
    levels: int = 2,
    seed: int = 0,
) -> PredictionTask:
    """One-vs-all task of class ``cls`` for ``variant`` in {original, rand_image, rand_label}."""
    if variant not in {"original", "rand_image", "rand_label"}:
        raise ValueError(f"unknown variant {variant!r}; use original, rand_image or rand_label")
    cls = _check_int("cls", cls)
    if not 0 <= cls <= 9:
        raise ValueError(f"the class must lie in 0-9, got {cls}")
    levels = _check_levels(levels)
    seed = _check_int("seed", seed, minimum=0)
    for split in ("train", "test"):
        if not isinstance(data, Mapping) or not isinstance(data.get(split), ImageSplit):
            raise TypeError(
                "data must map 'train' and 'test' to ImageSplit (as load_dataset returns), "
                f"got {type(data).__name__} without an ImageSplit for {split!r}"
            )
    rng = np.random.default_rng(seed)
    parts = {}
    for split in ("train", "test"):
        images, labels = data[split].images, data[split].labels
        x = discretize(images, levels)
        if variant == "rand_image":
            x = rand_image(x.shape, levels=levels, rng=rng)
        if variant == "rand_label":
            labels = rand_label(labels, rng=rng)
        parts[split] = (x, one_vs_all(labels, cls))
    return PredictionTask(*parts["train"], *parts["test"], levels=levels)
