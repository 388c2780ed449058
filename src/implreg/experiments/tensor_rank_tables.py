"""The settings, result tables, claim helpers and memory estimate of the tensor-rank experiment
(:mod:`implreg.experiments.tensor_rank_complexity`): Razin, Maman & Cohen, ICML 2021, Section 5.2,
Figure 4."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from implreg.config import param
from implreg.experiments.base import Claim, find_entry
from implreg.experiments.image_tasks import input_groups, load_images
from implreg.problems.images import DATASETS, resolve_data_dir
from implreg.resources import Estimate

VARIANTS = ("original", "rand_image", "rand_label")


@dataclass(frozen=True)
class TensorRankConfig:
    """Settings of Figure 4.  Data, tasks and metric are the paper's.

    The optimizer is mine (the authors: Adam lr 5e-4, batch 5000, 10000 epochs,
    about 6.7 hours per fit here): full-batch L-BFGS with ``memory`` pairs for
    up to ``iterations`` iterations per fit; a task stops earlier once three
    iterations in a row improve its train MSE by less than ``rel_tol``
    (relative).  ``train_samples`` / ``test_samples`` > 0 keep the first that
    many images of each split (for quick runs); ``threads`` > 0 sets torch's
    thread count.  ``representation="patches"`` is footnote 10 of the paper:
    every non-overlapping ``patch_size`` x ``patch_size`` patch becomes the
    index of its nearest of ``centroids`` k-means centroids (fit on at most
    ``max_patches`` training patches), an input of order (28/size)^2 with
    modes of size ``centroids``.  ``engine`` picks how the fit's products with the
    features are taken (:func:`implreg.factorizations.cp_exp.fit_exp_sum`): the same
    objective either way, ``auto`` is the table look-up on the CPU.
    """

    data_dir: str | None = param(None, doc="folder of mnist/ and fashion-mnist/")
    datasets: tuple[Literal["mnist", "fashion-mnist"], ...] = param(DATASETS, unique=True)
    variants: tuple[Literal["original", "rand_image", "rand_label"], ...] = param(
        VARIANTS, unique=True
    )
    classes: tuple[int, ...] = param(tuple(range(10)), ge=0, le=9, unique=True)
    ranks: tuple[int, ...] = param(tuple(range(1, 16)), ge=1, doc="CP ranks fitted")
    iterations: int = param(500, ge=1, doc="L-BFGS iterations per fit (cap)")
    rel_tol: float = param(1e-5, ge=0)
    memory: int = param(20, ge=1, doc="L-BFGS memory pairs")
    engine: Literal["auto", "dense", "packed"] = param(
        "auto", doc="fit products: packed (table look-up, CPU), dense (GEMMs), auto"
    )
    init_scale: float = param(0.05, ge=0)
    linear_baseline: bool = True
    representation: Literal["pixels", "patches"] = "pixels"
    patch_size: int = param(4, ge=1)
    centroids: int = param(16, ge=2, le=256)
    max_patches: int = param(200_000, ge=1)
    train_samples: int = param(0, ge=0, doc="keep the first N train images (0: all)")
    test_samples: int = param(0, ge=0, doc="keep the first N test images (0: all)")
    threads: int = param(0, ge=0, doc="torch threads (0: default)")
    workers: int = param(1, ge=1, doc="units run at once (each holds a dataset)")
    seed: int = param(0, ge=0)


FIG4 = "Razin, Yadin & Cohen 2021, Figure 4"


def mean_mse(dataset: str, variant: str, rank: int, split: str = "train"):
    """Mean train (or test) MSE over the one-vs-all tasks of a CP fit of one rank."""

    def measure(summary: dict) -> float:
        e = find_entry(
            summary["means"], dataset=dataset, variant=variant, predictor="cp", rank=rank
        )
        return float(e[f"{split}_mean"])

    return measure


def random_over_original(dataset: str, rank: int):
    """Train MSE of the better-fit random variant over that of the original data."""

    def measure(summary: dict) -> float:
        rand = min(mean_mse(dataset, v, rank)(summary) for v in ("rand_image", "rand_label"))
        return rand / mean_mse(dataset, "original", rank)(summary)

    return measure


def _fit_claim(dataset, variant, rank, published, compare, tol, budget="full") -> Claim:
    name = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}[dataset]
    return Claim(
        f"{name} {variant.replace('_', ' ')} rank {rank}",
        f"{name}, {variant.replace('_', ' ')} data: mean train MSE of the best CP rank-{rank} "
        f"predictor over the ten one-vs-all tasks (published {published:g}, read off the plot)",
        FIG4,
        published,
        mean_mse(dataset, variant, rank),
        compare,
        tol,
        budget,
    )


def table(results: list[dict]) -> list[dict]:
    """One row per (dataset, variant, class, rank | linear) with train and test MSE."""
    rows = []
    for res in results:
        for v, values in res["train_mse"].items():
            for c, tr, te in zip(res["classes"], values, res["test_mse"][v]):
                rows.append(
                    {
                        "dataset": res["dataset"],
                        "variant": v,
                        "class": c,
                        "predictor": "linear" if res["rank"] is None else "cp",
                        "rank": "" if res["rank"] is None else res["rank"],
                        "train_mse": tr,
                        "test_mse": te,
                    }
                )
    return rows


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and std over the classes for each (dataset, variant, predictor, rank)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["variant"], r["predictor"], r["rank"]), []).append(r)
    out = []
    for (ds, v, pred, rank), rs in groups.items():
        tr = np.array([r["train_mse"] for r in rs])
        te = np.array([r["test_mse"] for r in rs])
        out.append(
            {
                "dataset": ds,
                "variant": v,
                "predictor": pred,
                "rank": rank,
                "tasks": len(rs),
                "train_mean": float(tr.mean()),
                "train_std": float(tr.std()),
                "test_mean": float(te.mean()),
                "test_std": float(te.std()),
            }
        )
    return out


def variance(cfg: TensorRankConfig) -> dict:
    """The paper's "variance" line: mean over the tasks of p(1-p), p the test positive rate."""
    root = str(resolve_data_dir(cfg.data_dir))
    out = {}
    for ds in cfg.datasets:
        labels = load_images(root, ds)["test"].labels
        labels = labels[: cfg.test_samples] if cfg.test_samples > 0 else labels
        ps = [float((labels == c).mean()) for c in cfg.classes]
        out[ds] = float(np.mean([p * (1 - p) for p in ps]))
    return out


_IMAGES = {"train": 60_000, "test": 10_000}  # images per split of MNIST and Fashion-MNIST
_PIXELS = 28 * 28
_UNIT_OVERHEAD = 64 * 2**20  # a worker's allocator and BLAS buffers (measured)
_SKLEARN = 128 * 2**20  # scikit-learn's import and k-means (patch centroids)


def _unit_peak(cfg: TensorRankConfig, tasks: int, rank: int | None) -> Estimate:
    """Peak bytes of one unit (a forked worker): a rank-``rank`` fit of ``tasks`` tasks, or
    (``rank=None``) the linear baseline.  Sizes are the datasets' (60000 + 10000 images of
    28 x 28) unless ``train_samples`` / ``test_samples`` keep fewer."""
    n = min(cfg.train_samples or _IMAGES["train"], _IMAGES["train"])
    n_test = min(cfg.test_samples or _IMAGES["test"], _IMAGES["test"])
    patches = cfg.representation == "patches"
    order = (28 // cfg.patch_size) ** 2 if patches else _PIXELS
    levels = cfg.centroids if patches else 2
    d = order * (levels - 1)  # one-hot features
    onehot = n * d if levels > 2 else 0  # the comparison before the cast
    inputs = (n + n_test) * (8 * order if patches else _PIXELS) + (n + n_test) * tasks * 4
    if patches:  # unit images, their patches, distance blocks, k-means on max_patches
        prep = 8 * n * _PIXELS + 2**18 * (cfg.centroids + cfg.patch_size**2) * 16
        prep += 16 * cfg.max_patches * cfg.patch_size**2
    else:  # binarization through int64
        prep = 10 * n * _PIXELS
    fixed = inputs + _UNIT_OVERHEAD + (_SKLEARN if patches else 0)
    if rank is None:  # float64 features, the design matrix and gelsd's copies
        work = 8 * (d + 1) * (4 * n + 2 * n_test) + onehot
        what = f"a least-squares fit over {n} x {d + 1} features"
        return Estimate(float(fixed + max(prep, work)), "train_samples", what)
    standardize = 20 * n * d + onehot  # float32 features, float64 centring and squares
    params = tasks * rank * (d + 1)
    train = 4 * n * d + 16 * n * tasks * rank + 4 * (4 * cfg.memory + 12) * params
    what = f"{tasks} rank-{rank} fits over {n} images"
    key = "ranks" if train - 4 * n * d > standardize else "train_samples"
    return Estimate(float(fixed + max(prep, standardize, train)), key, what)


def _memory_estimate(cfg: TensorRankConfig) -> Estimate:
    """The ``workers`` largest units at once, on top of the datasets the driver holds."""
    peaks = []
    for _ in cfg.datasets:
        for _, variants in input_groups(cfg.variants):
            tasks = len(cfg.classes) * len(variants)
            if cfg.linear_baseline:
                peaks.append(_unit_peak(cfg, tasks, None))
            peaks.extend(_unit_peak(cfg, tasks, r) for r in sorted(set(cfg.ranks)))
    peaks.sort(key=lambda e: -e.bytes)
    loaded = len(cfg.datasets) * sum(_IMAGES.values()) + _IMAGES["train"]  # and one being read
    driver = Estimate(float(loaded * (_PIXELS + 1)), "datasets")
    return sum(peaks[: cfg.workers], driver)
