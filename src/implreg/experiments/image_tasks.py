"""The units of the tensor-rank-as-complexity grid: data of one task set, one fit, one baseline.

Razin, Maman & Cohen (ICML 2021), Section 5.2 and Figure 4.  A
:class:`RankUnit` is one (dataset, inputs, rank) fit of all its one-vs-all
tasks by the positive CP predictor of :mod:`implreg.factorizations.cp_exp`, or
(``kind="linear"``) the linear least-squares baseline of the appendix.
Datasets and k-means centroids are loaded once per worker process
(:func:`implreg.sweep.worker_cache`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from implreg.baselines.linear import fit_linear, mse
from implreg.factorizations.cp_exp import fit_exp_sum, one_hot_features
from implreg.problems.images import (
    DATASETS,
    discretize,
    load_dataset,
    rand_image,
    rand_label,
    resolve_data_dir,
)
from implreg.sweep import worker_cache


@dataclass(frozen=True)
class RankUnit:
    """One fit (``kind="fit"``, a CP rank) or linear baseline of a (dataset, inputs) task set."""

    name: str
    kind: str
    dataset: str
    inputs: str
    variants: tuple[str, ...]
    rank: int | None
    data_dir: str
    classes: tuple[int, ...]
    iterations: int
    rel_tol: float
    memory: int
    init_scale: float
    train_samples: int
    test_samples: int
    threads: int
    seed: int
    representation: str
    patch_size: int
    centroids: int
    max_patches: int
    device: str = "cpu"
    engine: str = "auto"

    def execute(self, should_stop=None) -> dict | None:
        work = linear_unit if self.kind == "linear" else fit_unit
        return work(self, should_stop)


def load_images(root: str, name: str):
    """A dataset's splits, read once per worker process."""
    return worker_cache(("images", root, name), lambda: load_dataset(name, root))


def input_groups(variants) -> list[tuple[str, tuple[str, ...]]]:
    """Variants that share their inputs are fit together: ("images", original + rand_label)."""
    groups = []
    shared = tuple(v for v in ("original", "rand_label") if v in variants)
    if shared:
        groups.append(("images", shared))
    if "rand_image" in variants:
        groups.append(("rand_image", ("rand_image",)))
    return groups


def _subset(a: np.ndarray, count: int) -> np.ndarray:
    return a[:count] if count > 0 else a


def task_data(u: RankUnit) -> dict:
    """Inputs and target matrices of one unit: ``x_train``, ``x_test`` and per-variant ``y``s.

    Seeds are fixed per dataset so every unit (and every rank) sees the same
    random variants: ``rand_image`` draws from ``seed``, ``rand_label`` permutes
    with ``seed + 1``, in train then test order.
    """
    root = str(resolve_data_dir(u.data_dir))
    data = load_images(root, u.dataset)
    classes = np.asarray(u.classes)
    splits = {}
    for split, count in (("train", u.train_samples), ("test", u.test_samples)):
        images = _subset(data[split].images, count)
        labels = _subset(data[split].labels, count)
        splits[split] = (images, labels)
    out = {"y_train": {}, "y_test": {}, "levels": 2}
    if u.inputs == "rand_image":
        rng = np.random.default_rng([u.seed, DATASETS.index(u.dataset), 0])
        for split in ("train", "test"):
            images = splits[split][0]
            x = rand_image((images.shape[0], images[0].size), levels=2, rng=rng)
            out[f"x_{split}"] = x
            if u.representation == "patches":
                # random binary images, encoded by the centroids of the real ones
                out[f"x_{split}"] = (x * 255).astype(np.uint8).reshape(images.shape)
    else:
        for split in ("train", "test"):
            out[f"x_{split}"] = (
                splits[split][0] if u.representation == "patches" else discretize(splits[split][0])
            )
    if u.representation == "patches":
        cents = centroids(root, u)
        for split in ("train", "test"):
            out[f"x_{split}"] = cents.encode(out[f"x_{split}"])
        out["levels"] = cents.k
    perm_rng = np.random.default_rng([u.seed, DATASETS.index(u.dataset), 1])
    for split in ("train", "test"):
        labels = splits[split][1]
        shuffled = rand_label(labels, rng=perm_rng) if "rand_label" in u.variants else None
        for v in u.variants:
            lab = shuffled if v == "rand_label" else labels
            out[f"y_{split}"][v] = (lab[:, None] == classes[None, :]).astype(np.float32)
    return out


def centroids(root: str, u: RankUnit):
    """Patch centroids of a dataset's (original) training images (footnote 10), cached."""
    from implreg.problems.patches import PatchCentroids

    def build():
        images = _subset(load_images(root, u.dataset)["train"].images, u.train_samples)
        return PatchCentroids.fit(
            images, u.centroids, u.patch_size, seed=u.seed, max_patches=u.max_patches
        )

    key = ("centroids", root, u.dataset, u.train_samples, u.patch_size, u.centroids)
    return worker_cache((*key, u.max_patches, u.seed), build)


def _targets(data: dict, split: str, variants) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([data[f"y_{split}"][v] for v in variants], axis=1))


def _per_variant(values: torch.Tensor, variants, n_classes: int) -> dict:
    vals = values.detach().to(torch.float64).tolist()
    return {v: vals[i * n_classes : (i + 1) * n_classes] for i, v in enumerate(variants)}


def fit_unit(u: RankUnit, should_stop=None) -> dict | None:
    """Fit one (dataset, inputs, rank) unit; returns None if ``should_stop()`` became true."""
    start = time.perf_counter()
    if u.threads > 0:
        torch.set_num_threads(u.threads)
    data = task_data(u)
    variants = u.variants
    dev = torch.device(u.device)
    x_tr = torch.from_numpy(data["x_train"]).to(dev)
    x_te = torch.from_numpy(data["x_test"]).to(dev)
    y_tr = _targets(data, "train", variants).to(dev)
    y_te = _targets(data, "test", variants).to(dev)
    n_classes = len(u.classes)
    stopped = False

    def callback(it, loss):
        nonlocal stopped
        if should_stop is not None and should_stop():
            stopped = True
        return stopped

    res = fit_exp_sum(
        x_tr,
        y_tr,
        u.rank,
        levels=data["levels"],
        iterations=u.iterations,
        memory=u.memory,
        rel_tol=u.rel_tol,
        init_scale=u.init_scale,
        seed=u.seed * 1000 + u.rank,
        engine=u.engine,
        callback=callback,
    )
    if stopped:
        return None
    pred = res.predictor
    train = mse(pred.values(x_tr), y_tr)
    test = mse(pred.values(x_te), y_te, clip=1.0)
    return {
        "dataset": u.dataset,
        "inputs": u.inputs,
        "rank": u.rank,
        "classes": list(u.classes),
        "train_mse": _per_variant(train, variants, n_classes),
        "test_mse": _per_variant(test, variants, n_classes),
        "iterations": res.iterations,
        "evaluations": res.evaluations,
        "seconds": time.perf_counter() - start,
    }


def linear_unit(u: RankUnit, should_stop=None) -> dict:
    """Least squares over the pixels plus a bias, per task (the paper's appendix baseline).

    For patch inputs the features are the one-hot codes of the centroid indices.
    """
    start = time.perf_counter()
    data = task_data(u)
    variants = u.variants
    levels = data["levels"]
    dev = torch.device(u.device)
    x_tr = one_hot_features(torch.from_numpy(data["x_train"]).to(dev), levels, torch.float64)
    x_te = one_hot_features(torch.from_numpy(data["x_test"]).to(dev), levels, torch.float64)
    y_tr = _targets(data, "train", variants).to(dev, torch.float64)
    y_te = _targets(data, "test", variants).to(dev, torch.float64)
    fit = fit_linear(x_tr, y_tr)
    n_classes = len(u.classes)
    return {
        "dataset": u.dataset,
        "inputs": u.inputs,
        "rank": None,
        "classes": list(u.classes),
        "train_mse": _per_variant(mse(fit.predict(x_tr), y_tr), variants, n_classes),
        "test_mse": _per_variant(mse(fit.predict(x_te), y_te, clip=1.0), variants, n_classes),
        "seconds": time.perf_counter() - start,
    }
