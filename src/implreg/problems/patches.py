"""Patch-centroid inputs, the alternative representation of Razin et al. 2021 footnote 10.

Section 5.2 indexes an order-784 tensor by an image's binarized pixels.
Footnote 10 notes that the input may instead be a sequence of small image
patches, each replaced by the index of the centroid it is closest to, the
centroids coming from clustering the patches of the dataset (as in Cohen et
al. 2016).  With ``size x size`` non-overlapping patches of a 28 x 28 image
and ``k`` centroids, an image becomes an index into an order-``(28/size)^2``
tensor with modes of size ``k`` (4 x 4 patches: order 49).

Pixel values are scaled to [0, 1] before clustering: integer images (bytes
0..255) are divided by 255, float images must already lie in [0, 1].
Centroids are fitted by scikit-learn's ``KMeans`` on the training patches only
(optionally a seeded subsample of them); scikit-learn is imported only when
:meth:`PatchCentroids.fit` runs, so the rest of the package works without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from implreg.factorizations.cp import _check_int

__all__ = ["PatchCentroids", "extract_patches", "patch_task_inputs"]

_ENCODE_CHUNK = 1 << 18  # patches per distance block: 2**18 x k float64 scores


def _unit_images(images) -> np.ndarray:
    """``(n, H, W)`` images as float32 in [0, 1] (integers are bytes scaled by 1/255)."""
    arr = np.asarray(images)
    if arr.ndim != 3:
        raise ValueError(f"images must be an (n, height, width) array, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError("integer images must hold byte values 0..255")
        return arr.astype(np.float32) / np.float32(255.0)
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and not (arr.min() >= 0.0 and arr.max() <= 1.0):
            raise ValueError("float images must be scaled to [0, 1] (and be finite)")
        return arr.astype(np.float32, copy=False)
    raise ValueError(f"images must be bytes or floats in [0, 1], got dtype {arr.dtype}")


def _grid(images: np.ndarray, size: int, stride: int | None) -> tuple[np.ndarray, int, int]:
    """A strided view ``(n, rows, cols, size, size)`` of the patches, the size and the stride."""
    if stride is None:
        stride = size
    if int(size) != size or int(stride) != stride:
        raise ValueError("size and stride must be integers")
    size, stride = int(size), int(stride)
    height, width = images.shape[1:]
    if size < 1 or size > min(height, width):
        raise ValueError(f"patch size {size} does not fit {height} x {width} images")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    view = np.lib.stride_tricks.sliding_window_view(images, (size, size), axis=(1, 2))
    return view[:, ::stride, ::stride], size, stride


def extract_patches(images, size: int, stride: int | None = None) -> np.ndarray:
    """All ``size x size`` patches of every image: ``(n, P, size*size)`` float32 in [0, 1].

    Patches start every ``stride`` pixels (default ``size``: non-overlapping);
    they are ordered row-major over their top-left corners and their pixels
    row-major, so ``P = ((H - size) // stride + 1) * ((W - size) // stride + 1)``.
    Rows and columns that do not fill a whole patch at the bottom and right are
    dropped (28 x 28 images tile exactly for sizes 1, 2, 4, 7, 14 and 28).
    """
    unit = _unit_images(images)
    view, size, _ = _grid(unit, size, stride)
    n, rows, cols = view.shape[:3]
    return np.ascontiguousarray(view).reshape(n, rows * cols, size * size)


def _nearest(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (Euclidean, first on ties) for ``points`` ``(m, d)``.

    Squared distances ``||x||^2 - 2 x.c + ||c||^2`` in float64, without the
    ``||x||^2`` term that is constant per point: its rounding error (about 1e-15
    relative) can only matter for ties closer than that.
    """
    c = torch.from_numpy(np.asarray(centroids, dtype=np.float64))
    half_sq = 0.5 * (c * c).sum(dim=1)
    out = np.empty(points.shape[0], dtype=np.int64)
    for start in range(0, points.shape[0], _ENCODE_CHUNK):
        block = torch.from_numpy(points[start : start + _ENCODE_CHUNK]).to(torch.float64)
        scores = half_sq - block @ c.T
        out[start : start + block.shape[0]] = scores.argmin(dim=1).numpy()
    return out


@dataclass(frozen=True, eq=False)
class PatchCentroids:
    """``k`` patch centroids ``(k, size*size)`` (float32, in [0, 1]) and the patch grid.

    Build with :meth:`fit`; :meth:`encode` maps images to centroid indices.
    """

    centroids: np.ndarray
    size: int
    stride: int

    def __post_init__(self) -> None:
        cents = np.ascontiguousarray(self.centroids, dtype=np.float32)
        object.__setattr__(self, "centroids", cents)
        object.__setattr__(self, "size", _check_int("size", self.size, minimum=1))
        object.__setattr__(self, "stride", _check_int("stride", self.stride))
        if cents.ndim != 2 or cents.shape[1] != self.size * self.size:
            raise ValueError(
                f"centroids must be (k, {self.size * self.size}) for {self.size} x {self.size} "
                f"patches, got shape {cents.shape}"
            )
        if not np.isfinite(cents).all():
            raise ValueError("centroids must be finite")
        if cents.shape[0] < 2:
            raise ValueError(f"need at least 2 centroids, got {cents.shape[0]}")
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @classmethod
    def fit(
        cls,
        images,
        k: int,
        size: int,
        stride: int | None = None,
        *,
        seed: int = 0,
        max_patches: int | None = None,
        n_init: int = 1,
    ) -> PatchCentroids:
        """K-means (scikit-learn ``KMeans``, k-means++ init, ``n_init`` runs) on training patches.

        ``max_patches`` draws that many patches without replacement (seeded by
        ``seed``) from all patches of ``images`` before clustering; ``None``
        clusters them all.  ``k`` must be at least 2 and at most the number of
        distinct patches clustered.  K-means runs on one thread, so equal
        arguments give equal centroids whatever the core count.
        """
        if int(k) != k or k < 2:
            raise ValueError(f"k must be an integer >= 2, got {k}")
        n_init = _check_int("n_init", n_init)
        if n_init < 1:
            raise ValueError(f"n_init must be >= 1, got {n_init}")
        seed = _check_int("seed", seed, minimum=0)
        if max_patches is not None:
            max_patches = _check_int("max_patches", max_patches)
            if max_patches < 1:
                raise ValueError(f"max_patches must be >= 1, got {max_patches}")
        unit = _unit_images(images)
        view, size, stride = _grid(unit, size, stride)
        n, rows, cols = view.shape[:3]
        total = n * rows * cols
        if total == 0:
            raise ValueError("no patches to cluster: the image array is empty")
        rng = np.random.default_rng(seed)
        if max_patches is not None and max_patches < total:
            if max_patches < 1:
                raise ValueError(f"max_patches must be >= 1, got {max_patches}")
            pick = np.sort(rng.choice(total, size=int(max_patches), replace=False))
            img, rest = np.divmod(pick, rows * cols)
            row, col = np.divmod(rest, cols)
            patches = view[img, row, col].reshape(len(pick), size * size)
        else:
            patches = np.ascontiguousarray(view).reshape(total, size * size)
        # Fewer distinct points than clusters makes KMeans warn and leave clusters empty.
        head = max(4096, 16 * int(k))
        if np.unique(patches[:head], axis=0).shape[0] < k:
            distinct = np.unique(patches, axis=0).shape[0]
            if distinct < k:
                raise ValueError(f"only {distinct} distinct patches to cluster, fewer than k={k}")
        try:
            from sklearn.cluster import KMeans
            from threadpoolctl import threadpool_limits
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "patch centroids need scikit-learn; install it with `pip install scikit-learn`"
            ) from exc
        # One OpenMP thread: k-means' float32 sums then do not depend on the core count, and
        # scikit-learn's OpenMP runtime no longer contends with torch's (2 cores, 980k MNIST
        # patches: 1.9 s instead of 3.8 s; tiny problems 300x faster).
        with threadpool_limits(limits=1, user_api="openmp"):
            km = KMeans(n_clusters=int(k), n_init=n_init, random_state=seed).fit(patches)
        return cls(km.cluster_centers_, size, stride)

    def encode(self, images, dtype=np.uint8) -> np.ndarray:
        """Index of the nearest centroid for every patch: ``(n, P)`` of ``dtype``.

        ``dtype`` uint8 (the default, like :func:`implreg.problems.images.discretize`)
        needs ``k <= 256``; pass ``np.int64`` for more centroids.
        """
        dtype = np.dtype(dtype)
        if not np.issubdtype(dtype, np.integer) or np.iinfo(dtype).max < self.k - 1:
            raise ValueError(f"{self.k} centroid indices do not fit dtype {dtype}")
        unit = _unit_images(images)
        view, _, _ = _grid(unit, self.size, self.stride)
        n, rows, cols = view.shape[:3]
        out = np.empty((n, rows * cols), dtype=dtype)
        step = max(1, _ENCODE_CHUNK // (rows * cols))
        for start in range(0, n, step):
            block = np.ascontiguousarray(view[start : start + step])
            codes = _nearest(block.reshape(-1, self.size * self.size), self.centroids)
            out[start : start + block.shape[0]] = codes.reshape(block.shape[0], rows * cols)
        return out


def patch_task_inputs(
    train_images,
    test_images,
    size: int,
    k: int,
    seed: int = 0,
    max_patches: int | None = None,
    *,
    stride: int | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Footnote 10's inputs: ``(x_train, x_test, levels)`` with ``levels = k``.

    Centroids are fitted on ``train_images`` only; both splits are encoded as
    uint8 centroid indices ``(n, P)`` (so ``2 <= k <= 256``), ready to stand in
    for :func:`implreg.problems.images.discretize` in a prediction task.
    """
    if int(k) != k or not 2 <= k <= 256:
        raise ValueError(f"k must lie in 2..256 for uint8 indices, got {k}")
    cents = PatchCentroids.fit(train_images, k, size, stride, seed=seed, max_patches=max_patches)
    return cents.encode(train_images), cents.encode(test_images), int(k)
