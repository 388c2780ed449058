"""Tensor rank as a measure of complexity (Razin, Maman & Cohen, ICML 2021, Section 5.2, Figure 4).

MNIST and Fashion-MNIST, binarized (a pixel is 1 iff its byte is >= 128), are
order-784 tensor-completion problems: each image indexes an entry, its label
is the value.  For every one-vs-all task and every rank ``k`` in 1..15 the CP
predictor of rank ``k`` with the lowest train MSE is sought; original data are
fit far better than "rand image" (i.i.d. Bernoulli(1/2) pixels) and "rand
label" (labels permuted within each split) at every rank.  Errors are on the
0/1 scale; the test error clips each sample's squared error at 1.

How the fit is done (:mod:`implreg.factorizations.cp_exp`): a CP predictor
with positive factors is a sum of ``k`` exponentials of linear functions of
the pixels, fitted by full-batch L-BFGS over standardized features, all ten
tasks of a dataset (and its rand-label variant, which shares the images) in
one matrix product.  One unit of the resumable grid
(:class:`~implreg.experiments.image_tasks.RankUnit`) is one (dataset, inputs,
rank) fit of all its tasks; the linear least-squares baseline is one unit per
(dataset, inputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from implreg.config import param, require
from implreg.experiments.base import Claim, GridExperiment, Preset, find_entry
from implreg.experiments.image_tasks import RankUnit, input_groups, load_images
from implreg.problems.images import DATASETS, resolve_data_dir
from implreg.resources import Estimate
from implreg.runs import SUMMARY, pyplot, read_json, reading, save_figure

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
    modes of size ``centroids``.
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


# Tolerances: values read off a log plot carry ~10% (0.003 at 0.023-0.033, 0.005 at 0.088); at
# rank 15 the fits here stop at 500 L-BFGS iterations while the loss still creeps down, so those
# claims are one-sided: at most 0.001 above the published value (a fit further from the minimum
# than that would not show the published picture).
FIG4_CLAIMS = (
    _fit_claim("mnist", "original", 1, 0.023, "within_abs", 0.003, "both"),
    _fit_claim("mnist", "rand_label", 1, 0.088, "within_abs", 0.005, "both"),
    _fit_claim("mnist", "original", 15, 0.002, "at_most", 0.001),
    _fit_claim("fashion-mnist", "original", 1, 0.033, "within_abs", 0.003),
    _fit_claim("fashion-mnist", "original", 15, 0.009, "at_most", 0.001),
    Claim(
        "MNIST original far simpler than random",
        "at rank 15 the original data are fit far better than both random variants "
        "(published 0.002 against 0.015 and 0.044: 7.5x the better random variant)",
        FIG4,
        7.5,
        random_over_original("mnist", 15),
        "at_least",
        5.5,  # at least 2x: 'far better' at a scale where the fits here fall short of the minimum
        "full",
    ),
    Claim(
        "random labels test above the variance",
        "at rank 15 the rand-label test error is above the variance line p(1-p) = 0.09 "
        "(published 0.14-0.15)",
        FIG4,
        0.14,
        mean_mse("mnist", "rand_label", 15, "test"),
        "at_least",
        0.05,  # the bound is the variance line itself (0.09)
        "full",
    ),
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


class TensorRankComplexity(GridExperiment):
    name = "tensor_rank_complexity"
    aliases = ("tensor_rank",)
    Config = TensorRankConfig
    table = "results.csv"
    presets = (
        Preset(
            "tensor-rank-complexity",
            "Razin et al. 2021, Figure 4 (tensor rank as a measure of complexity)",
            "MNIST and Fashion-MNIST (--data-dir) as order-784 tensor completion: original, "
            "rand image, rand label x 10 one-vs-all tasks x CP ranks 1..15, linear baseline",
            tiny={
                "datasets": ("mnist",),
                "ranks": (1, 2),
                "classes": (3,),
                "iterations": 15,
                "train_samples": 200,
                "test_samples": 100,
            },
            claims=FIG4_CLAIMS,
            # MNIST rank 1, original and rand label, all 10 tasks on all 60000 images
            reduced={"datasets": ("mnist",), "ranks": (1,), "variants": ("original", "rand_label")},
        ),
    )

    def memory_estimate(self, cfg: TensorRankConfig) -> Estimate:
        return _memory_estimate(cfg)

    def prepare(self, cfg: TensorRankConfig, device: str = "cpu") -> TensorRankConfig:
        """Check the data (every dataset readable) before any folder exists."""
        root = resolve_data_dir(cfg.data_dir)
        for name in cfg.datasets:
            data = load_images(str(root), name)
            train, test = data["train"].images, data["test"].images
            where = f"the {name} files in {root}"
            require(train.shape[0] > 0, f"{where} hold no training images")
            require(test.shape[0] > 0, f"{where} hold no test images")
            require(
                train.shape[1:] == test.shape[1:],
                f"{where} disagree: training images are {'x'.join(map(str, train.shape[1:]))}, "
                f"test images {'x'.join(map(str, test.shape[1:]))}",
            )
            require(min(train.shape[1:]) > 0, f"{where} hold images of zero pixels")
            side = min(train.shape[1:])
            require(
                cfg.representation != "patches" or cfg.patch_size <= side,
                f"patch_size {cfg.patch_size} does not fit the {side}-pixel {name} images",
            )
        return cfg

    def units(self, cfg: TensorRankConfig, device: str = "cpu") -> list[RankUnit]:
        """Linear baselines first (fast), then fits by dataset, inputs and rank."""
        data_dir = str(resolve_data_dir(cfg.data_dir).resolve())
        common = dict(
            data_dir=data_dir,
            classes=tuple(cfg.classes),
            iterations=cfg.iterations,
            rel_tol=cfg.rel_tol,
            memory=cfg.memory,
            init_scale=cfg.init_scale,
            train_samples=cfg.train_samples,
            test_samples=cfg.test_samples,
            threads=cfg.threads,
            seed=cfg.seed,
            representation=cfg.representation,
            patch_size=cfg.patch_size,
            centroids=cfg.centroids,
            max_patches=cfg.max_patches,
            device=device,
        )
        out = []
        for ds in cfg.datasets:
            for inputs, variants in input_groups(cfg.variants):
                group = dict(dataset=ds, inputs=inputs, variants=tuple(variants), **common)
                if cfg.linear_baseline:
                    out.append(RankUnit(f"linear-{ds}-{inputs}", "linear", rank=None, **group))
                for r in sorted(set(cfg.ranks)):
                    out.append(RankUnit(f"fit-{ds}-{inputs}-r{r}", "fit", rank=r, **group))
        return out

    def summarize(self, cfg: TensorRankConfig, results: list[dict]) -> dict:
        return {
            "fit_seconds_total": sum(r["seconds"] for r in results),
            "variance": variance(cfg),
            "means": aggregate(table(results)),
        }

    def rows(self, results: list[dict], summary: dict) -> list[dict]:
        return table(results)

    def describe(self, unit, result) -> str:
        return unit.name

    def summary_text(self, summary: dict) -> str:
        lines = []
        for m in summary["means"]:
            what = "linear" if m["predictor"] == "linear" else f"rank {m['rank']:>2}"
            lines.append(
                f"{m['dataset']:<13} {m['variant']:<10} {what:<8}: train {m['train_mean']:.4f} "
                f"(std {m['train_std']:.4f})  test {m['test_mean']:.4f} (std {m['test_std']:.4f})"
            )
        for ds, v in summary["variance"].items():
            lines.append(f"{ds}: variance p(1-p) = {v:.4f}")
        lines.append(f"fitting time {summary['fit_seconds_total']:.0f} s")
        return "\n".join(lines)

    _COLORS = {"original": "C0", "rand_image": "C1", "rand_label": "C2"}

    def plot(self, run_dir: Path) -> list[Path]:
        """Figure 4: train (solid) and test (dashed) MSE against rank, mean +- std over tasks."""
        plt = pyplot()
        from matplotlib.ticker import MaxNLocator

        run_dir = Path(run_dir)
        with reading(run_dir / SUMMARY, "summary"):
            s = read_json(run_dir / SUMMARY)
            means = s["means"]
            for m in means:
                m["dataset"], m["variant"], m["predictor"], float(m["train_mean"])
        datasets = list(dict.fromkeys(m["dataset"] for m in means))
        fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.2), squeeze=False)
        for ax, ds in zip(axes[0], datasets):
            for v in VARIANTS:
                cp = sorted(
                    (
                        m
                        for m in means
                        if m["dataset"] == ds and m["variant"] == v and m["predictor"] == "cp"
                    ),
                    key=lambda m: m["rank"],
                )
                if not cp:
                    continue
                ranks = [m["rank"] for m in cp]
                for key, style, label in (("train", "-o", "train"), ("test", "--s", "test")):
                    mu = np.array([m[f"{key}_mean"] for m in cp])
                    sd = np.array([m[f"{key}_std"] for m in cp])
                    ax.plot(ranks, mu, style, color=self._COLORS[v], ms=3, label=f"{v} {label}")
                    ax.fill_between(ranks, mu - sd, mu + sd, color=self._COLORS[v], alpha=0.12)
                lin = [
                    m
                    for m in means
                    if m["dataset"] == ds and m["variant"] == v and m["predictor"] == "linear"
                ]
                for m in lin:
                    ax.axhline(
                        m["train_mean"],
                        color=self._COLORS[v],
                        ls=":",
                        lw=1,
                        label=f"{v} linear train",
                    )
            ax.axhline(s["variance"][ds], color="k", ls="-.", lw=1, label="variance p(1-p)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("tensor rank")
            ax.set_ylabel("mean squared error (0/1 scale)")
            ax.set_title(ds)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, ncol=2)
        return [save_figure(fig, run_dir / "figure.png", dpi=110)]


EXPERIMENT = TensorRankComplexity()
