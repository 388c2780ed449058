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

from pathlib import Path

import numpy as np

from implreg.config import require
from implreg.experiments.base import Claim, GridExperiment, Preset
from implreg.experiments.image_tasks import RankUnit, input_groups, load_images
from implreg.experiments.tensor_rank_tables import (  # noqa: F401
    _IMAGES,
    _PIXELS,
    _SKLEARN,
    _UNIT_OVERHEAD,
    FIG4,
    VARIANTS,
    TensorRankConfig,
    _fit_claim,
    _memory_estimate,
    _unit_peak,
    aggregate,
    mean_mse,
    random_over_original,
    table,
    variance,
)
from implreg.problems.images import resolve_data_dir
from implreg.resources import Estimate
from implreg.runs import SUMMARY, pyplot, read_json, reading, save_figure

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
        require(
            cfg.engine != "packed" or str(device).split(":")[0] == "cpu",
            f"engine 'packed' runs on the CPU; the run is on {device} (use engine=dense or auto)",
        )
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

    def run_threads(self, cfg: TensorRankConfig, requested: int | None = None) -> int:
        """``threads`` > 0 is every unit's own count (it wins over ``--threads``)."""
        if cfg.threads > 0:
            return cfg.threads * max(1, cfg.workers)
        return super().run_threads(cfg, requested)

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
            engine=cfg.engine,
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
