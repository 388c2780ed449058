"""Tensor rank as a measure of complexity (Razin et al. 2021 Section 5.2, Figure 4; REFERENCE §2).

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
one matrix product.  One unit of the resumable grid is one (dataset, inputs,
rank) fit of all its tasks; the linear least-squares baseline is one unit per
(dataset, inputs).
"""

from __future__ import annotations

import csv
import functools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from implreg.baselines.linear import fit_linear, mse
from implreg.experiments.config import require
from implreg.factorizations.cp_exp import fit_exp_sum, one_hot_features
from implreg.problems.images import (
    DATASETS,
    discretize,
    load_dataset,
    rand_image,
    rand_label,
    resolve_data_dir,
)
from implreg.runs import SUMMARY, read_json, write_json
from implreg.sweep import Unit, load_results, unit_path

VARIANTS = ("original", "rand_image", "rand_label")
CSV_NAME = "results.csv"


@dataclass(frozen=True)
class TensorRankConfig:
    """Settings of Figure 4.  Data, tasks and metric are the paper's (REFERENCE §2).

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

    data_dir: str | None = None
    datasets: tuple[str, ...] = DATASETS
    variants: tuple[str, ...] = VARIANTS
    classes: tuple[int, ...] = tuple(range(10))
    ranks: tuple[int, ...] = tuple(range(1, 16))
    iterations: int = 500
    rel_tol: float = 1e-5
    memory: int = 20
    init_scale: float = 0.05
    linear_baseline: bool = True
    representation: str = "pixels"
    patch_size: int = 4
    centroids: int = 16
    max_patches: int = 200_000
    train_samples: int = 0
    test_samples: int = 0
    threads: int = 0
    seed: int = 0

    def validate(self) -> None:
        require(len(self.datasets) > 0, "give at least one dataset")
        for d in self.datasets:
            require(d in DATASETS, f"unknown dataset {d!r}; use {', '.join(DATASETS)}")
        require(len(self.variants) > 0, "give at least one variant")
        for v in self.variants:
            require(v in VARIANTS, f"unknown variant {v!r}; use {', '.join(VARIANTS)}")
        require(len(self.classes) > 0, "give at least one class")
        for c in self.classes:
            require(0 <= c <= 9, f"a class must lie in 0-9, got {c}")
        require(len(set(self.classes)) == len(self.classes), "classes repeat")
        require(len(self.ranks) > 0, "give at least one rank")
        for r in self.ranks:
            require(r >= 1, f"a rank must be at least 1, got {r}")
        require(self.iterations >= 1, f"iterations must be positive, got {self.iterations}")
        require(self.rel_tol >= 0, f"rel_tol must be non-negative, got {self.rel_tol}")
        require(self.memory >= 1, f"memory must be positive, got {self.memory}")
        require(self.init_scale >= 0, f"init_scale must be non-negative, got {self.init_scale}")
        require(self.train_samples >= 0 and self.test_samples >= 0, "sample counts must be >= 0")
        require(self.threads >= 0, f"threads must be >= 0, got {self.threads}")
        require(
            self.representation in ("pixels", "patches"),
            f"representation must be 'pixels' or 'patches', got {self.representation!r}",
        )
        require(self.patch_size >= 1, f"patch_size must be positive, got {self.patch_size}")
        require(2 <= self.centroids <= 256, f"centroids must lie in 2..256, got {self.centroids}")
        require(self.max_patches >= 1, f"max_patches must be positive, got {self.max_patches}")


Config = TensorRankConfig


def prepare(cfg: TensorRankConfig) -> TensorRankConfig:
    """Validate the config and the data (every dataset readable) before any folder exists."""
    cfg.validate()
    root = resolve_data_dir(cfg.data_dir)
    for name in cfg.datasets:
        side = min(_load(str(root), name)["train"].images.shape[1:])
        require(
            cfg.representation != "patches" or cfg.patch_size <= side,
            f"patch_size {cfg.patch_size} does not fit the {side}-pixel {name} images",
        )
    return cfg


@functools.lru_cache(maxsize=2)
def _load(root: str, name: str):
    return load_dataset(name, root)


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


def task_data(params: dict) -> dict:
    """Inputs and target matrices of one unit: ``x_train``, ``x_test`` and per-variant ``y``s.

    Seeds are fixed per dataset so every unit (and every rank) sees the same
    random variants: ``rand_image`` draws from ``seed``, ``rand_label`` permutes
    with ``seed + 1``, in train then test order.
    """
    root = str(resolve_data_dir(params["data_dir"]))
    data = _load(root, params["dataset"])
    classes = np.asarray(params["classes"])
    splits = {}
    for split, count in (("train", params["train_samples"]), ("test", params["test_samples"])):
        images = _subset(data[split].images, count)
        labels = _subset(data[split].labels, count)
        splits[split] = (images, labels)
    out = {"y_train": {}, "y_test": {}, "levels": 2}
    if params["inputs"] == "rand_image":
        rng = np.random.default_rng([params["seed"], DATASETS.index(params["dataset"]), 0])
        for split in ("train", "test"):
            images = splits[split][0]
            x = rand_image((images.shape[0], images[0].size), levels=2, rng=rng)
            out[f"x_{split}"] = x
            if params["representation"] == "patches":
                # random binary images, encoded by the centroids of the real ones
                out[f"x_{split}"] = (x * 255).astype(np.uint8).reshape(images.shape)
    else:
        for split in ("train", "test"):
            out[f"x_{split}"] = (
                splits[split][0]
                if params["representation"] == "patches"
                else discretize(splits[split][0])
            )
    if params["representation"] == "patches":
        cents = _centroids(
            root,
            params["dataset"],
            params["train_samples"],
            params["patch_size"],
            params["centroids"],
            params["max_patches"],
            params["seed"],
        )
        for split in ("train", "test"):
            out[f"x_{split}"] = cents.encode(out[f"x_{split}"])
        out["levels"] = cents.k
    perm_rng = np.random.default_rng([params["seed"], DATASETS.index(params["dataset"]), 1])
    for split in ("train", "test"):
        labels = splits[split][1]
        shuffled = rand_label(labels, rng=perm_rng) if "rand_label" in params["variants"] else None
        for v in params["variants"]:
            lab = shuffled if v == "rand_label" else labels
            out[f"y_{split}"][v] = (lab[:, None] == classes[None, :]).astype(np.float32)
    return out


@functools.lru_cache(maxsize=2)
def _centroids(root, dataset, train_samples, size, k, max_patches, seed):
    """Patch centroids of a dataset's (original) training images (footnote 10)."""
    from implreg.problems.patches import PatchCentroids

    images = _subset(_load(root, dataset)["train"].images, train_samples)
    return PatchCentroids.fit(images, k, size, seed=seed, max_patches=max_patches)


def _targets(data: dict, split: str, variants) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([data[f"y_{split}"][v] for v in variants], axis=1))


def _per_variant(values: torch.Tensor, variants, n_classes: int) -> dict:
    vals = values.detach().to(torch.float64).tolist()
    return {v: vals[i * n_classes : (i + 1) * n_classes] for i, v in enumerate(variants)}


def fit_unit(params: dict, should_stop=None) -> dict | None:
    """Fit one (dataset, inputs, rank) unit; returns None if ``should_stop()`` became true."""
    start = time.perf_counter()
    if params["threads"] > 0:
        torch.set_num_threads(params["threads"])
    data = task_data(params)
    variants = params["variants"]
    x_tr = torch.from_numpy(data["x_train"])
    x_te = torch.from_numpy(data["x_test"])
    y_tr = _targets(data, "train", variants)
    y_te = _targets(data, "test", variants)
    n_classes = len(params["classes"])
    stopped = False

    def callback(it, loss):
        nonlocal stopped
        if should_stop is not None and should_stop():
            stopped = True
        return stopped

    res = fit_exp_sum(
        x_tr,
        y_tr,
        params["rank"],
        levels=data["levels"],
        iterations=params["iterations"],
        memory=params["memory"],
        rel_tol=params["rel_tol"],
        init_scale=params["init_scale"],
        seed=params["seed"] * 1000 + params["rank"],
        callback=callback,
    )
    if stopped:
        return None
    pred = res.predictor
    train = mse(pred.values(x_tr), y_tr)
    test = mse(pred.values(x_te), y_te, clip=1.0)
    return {
        "dataset": params["dataset"],
        "inputs": params["inputs"],
        "rank": params["rank"],
        "classes": list(params["classes"]),
        "train_mse": _per_variant(train, variants, n_classes),
        "test_mse": _per_variant(test, variants, n_classes),
        "iterations": res.iterations,
        "evaluations": res.evaluations,
        "seconds": time.perf_counter() - start,
    }


def linear_unit(params: dict, should_stop=None) -> dict:
    """Least squares over the pixels plus a bias, per task (the paper's appendix baseline).

    For patch inputs the features are the one-hot codes of the centroid indices.
    """
    start = time.perf_counter()
    data = task_data(params)
    variants = params["variants"]
    levels = data["levels"]
    x_tr = one_hot_features(torch.from_numpy(data["x_train"]), levels, torch.float64)
    x_te = one_hot_features(torch.from_numpy(data["x_test"]), levels, torch.float64)
    y_tr = _targets(data, "train", variants).to(torch.float64)
    y_te = _targets(data, "test", variants).to(torch.float64)
    fit = fit_linear(x_tr, y_tr)
    n_classes = len(params["classes"])
    return {
        "dataset": params["dataset"],
        "inputs": params["inputs"],
        "rank": None,
        "classes": list(params["classes"]),
        "train_mse": _per_variant(mse(fit.predict(x_tr), y_tr), variants, n_classes),
        "test_mse": _per_variant(mse(fit.predict(x_te), y_te, clip=1.0), variants, n_classes),
        "seconds": time.perf_counter() - start,
    }


def units(cfg: TensorRankConfig) -> list[Unit]:
    """Linear baselines first (fast), then fits by dataset, inputs and rank."""
    data_dir = str(resolve_data_dir(cfg.data_dir).resolve())
    base = {
        "data_dir": data_dir,
        "classes": list(cfg.classes),
        "iterations": cfg.iterations,
        "rel_tol": cfg.rel_tol,
        "memory": cfg.memory,
        "init_scale": cfg.init_scale,
        "train_samples": cfg.train_samples,
        "test_samples": cfg.test_samples,
        "threads": cfg.threads,
        "seed": cfg.seed,
        "representation": cfg.representation,
        "patch_size": cfg.patch_size,
        "centroids": cfg.centroids,
        "max_patches": cfg.max_patches,
    }
    out = []
    for ds in cfg.datasets:
        for inputs, variants in input_groups(cfg.variants):
            common = {**base, "dataset": ds, "inputs": inputs, "variants": list(variants)}
            if cfg.linear_baseline:
                out.append(Unit(f"linear-{ds}-{inputs}", {**common, "kind": "linear"}))
            for r in sorted(set(cfg.ranks)):
                out.append(Unit(f"fit-{ds}-{inputs}-r{r}", {**common, "kind": "fit", "rank": r}))
    return out


class _Stopped(Exception):
    pass


def run(
    cfg, run_dir: Path, *, prepared=None, resume=False, progress=True, interrupt=None, log=print
) -> dict:
    run_dir = Path(run_dir)
    (run_dir / "units").mkdir(parents=True, exist_ok=True)
    grid = units(cfg)
    results = load_results(run_dir, grid)
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(grid), initial=len(results), unit="fit")
    should_stop = (lambda: interrupt.is_set()) if interrupt is not None else None
    interrupted = False
    try:
        for u in grid:
            if u.name in results:
                continue
            if should_stop is not None and should_stop():
                interrupted = True
                break
            if bar is not None:
                bar.set_postfix_str(u.name)
            worker = linear_unit if u.params["kind"] == "linear" else fit_unit
            res = worker(u.params, should_stop)
            if res is None:
                interrupted = True
                break
            write_json(unit_path(run_dir, u.name), res)
            results[u.name] = res
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if interrupted:
        return {"interrupted": True, "summary": None, "exit_code": 130, "iteration": len(results)}
    rows = table(cfg, [results[u.name] for u in grid])
    write_csv(run_dir / CSV_NAME, rows)
    summary = {
        "wall_seconds_this_session": time.perf_counter() - start,
        "fit_seconds_total": sum(results[u.name]["seconds"] for u in grid),
        "variance": variance(cfg),
        "means": aggregate(rows),
    }
    write_json(run_dir / SUMMARY, summary)
    plot(run_dir)
    return {"interrupted": False, "summary": summary, "exit_code": 0}


def table(cfg: TensorRankConfig, results: list[dict]) -> list[dict]:
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


def write_csv(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    fields = ["dataset", "variant", "class", "predictor", "rank", "train_mse", "test_mse"]
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow(
                {**r, "train_mse": f"{r['train_mse']:.6g}", "test_mse": f"{r['test_mse']:.6g}"}
            )
    tmp.replace(path)


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
        labels = _subset(_load(root, ds)["test"].labels, cfg.test_samples)
        ps = [float((labels == c).mean()) for c in cfg.classes]
        out[ds] = float(np.mean([p * (1 - p) for p in ps]))
    return out


def summary_text(summary: dict) -> str:
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


def plot(run_dir: Path) -> list[Path]:
    """Figure 4: train (solid) and test (dashed) MSE against rank, mean +- std over the tasks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    run_dir = Path(run_dir)
    s = read_json(run_dir / SUMMARY)
    means = s["means"]
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
                ax.plot(ranks, mu, style, color=_COLORS[v], ms=3, label=f"{v} {label}")
                ax.fill_between(ranks, mu - sd, mu + sd, color=_COLORS[v], alpha=0.12)
            lin = [
                m
                for m in means
                if m["dataset"] == ds and m["variant"] == v and m["predictor"] == "linear"
            ]
            for m in lin:
                ax.axhline(
                    m["train_mean"], color=_COLORS[v], ls=":", lw=1, label=f"{v} linear train"
                )
        ax.axhline(s["variance"][ds], color="k", ls="-.", lw=1, label="variance p(1-p)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("tensor rank")
        ax.set_ylabel("mean squared error (0/1 scale)")
        ax.set_title(ds)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = run_dir / "figure.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
