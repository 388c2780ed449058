"""Countering locality in CNNs: what the Is-Same-Class and Pathfinder presets share.

Razin, Maman & Cohen, "Implicit Regularization in Hierarchical Tensor
Factorization and Deep Convolutional Neural Networks" (ICML 2022, Section 6)
and the 2022 blog post: a CNN's implicit bias toward low hierarchical tensor
rank is a bias toward local interactions; the explicit penalty of
:mod:`implreg.cnn.regularizer` counteracts it, and long-range tasks are solved.

A run is a grid of distance (image gap, or path length) x lambda x seed, one
unit per training run (:class:`TrainUnit`), through the common sweep engine so
``--backend ray`` spreads it over a cluster.  Every unit checkpoints after each
epoch under ``<run>/work/<unit>/`` (kill -9 loses at most one epoch); the
folder is removed once the whole grid has finished.  Keys left ``None`` take
the value of the chosen ``scale``: ``cpu`` (a configuration measured to run on
a laptop) or ``paper`` (the published setting, for a GPU or a cluster).
"""

from __future__ import annotations

import abc
import dataclasses
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from implreg.config import param
from implreg.experiments.base import GridExperiment, Outcome, RunContext
from implreg.resources import Estimate
from implreg.runs import pyplot, save_figure

WORK = "work"
# the published training recipe of both tasks (Razin, Maman & Cohen 2022, appendix)
PAPER_RECIPE = {"epochs": 150, "batch_size": 64, "lr": 0.01, "momentum": 0.9, "patience": 20}
TINY = {"n_train": 64, "n_test": 32, "epochs": 2, "width": 4, "seeds": 1, "workers": 1}


@dataclass(frozen=True)
class LocalityConfig:
    """Keys shared by the locality presets; ``None`` means "the value of ``scale``"."""

    scale: Literal["cpu", "paper"] = param("cpu", doc="defaults for keys left None")
    distances: tuple[int, ...] | None = param(
        None, ge=0, unique=True, doc="gaps or path lengths (None: by scale)"
    )
    lambdas: tuple[float, ...] | None = param(
        None, ge=0, unique=True, doc="penalty weights (None: by scale)"
    )
    seeds: int = param(3, ge=1, doc="training seeds per (distance, lambda)")
    model: Literal["resnet18", "cnn"] | None = param(None, doc="network (None: by scale)")
    width: int | None = param(None, ge=1, doc="channels of the first stage (None: by scale)")
    depth: int | None = param(None, ge=1, doc="blocks of the cnn; resnet18 ignores it")
    stem: Literal["small", "imagenet"] | None = param(None, doc="resnet18 stem (None: by scale)")
    n_train: int | None = param(None, ge=1, doc="training images (None: by scale)")
    n_test: int | None = param(None, ge=1, doc="test images (None: by scale)")
    epochs: int | None = param(None, ge=1, doc="cap on epochs (None: by scale)")
    batch_size: int | None = param(None, ge=2, doc="(None: by scale; published 64)")
    lr: float | None = param(None, gt=0, doc="SGD step (None: by scale; published 0.01)")
    momentum: float | None = param(None, ge=0, lt=1, doc="(None: by scale; published 0.9)")
    patience: int | None = param(
        None, ge=0, doc="epochs trained after 100% train accuracy (None: by scale)"
    )
    eps: float = param(1e-8, gt=0, doc="added to the gradient norms of the penalty")
    data_seed: int = param(0, ge=0, doc="seed of the datasets (the same for every unit)")
    workers: int = param(2, ge=1, doc="units trained at once (one thread each here)")
    seed: int = param(0, ge=0, doc="first training seed")

    SCALES: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    def value(self, key: str) -> Any:
        """The key's value, or the scale's when it is None."""
        v = getattr(self, key)
        return self.SCALES[self.scale][key] if v is None else v


@dataclass(frozen=True)
class TrainUnit(abc.ABC):
    """One training run: the fields every task shares.  A task's unit is a frozen dataclass
    deriving from it that adds its data fields and ``problem() -> (Splits, patch sampler,
    channels)``."""

    # where a unit works and caches, not what it computes (moving a folder keeps its results)
    transient: ClassVar[tuple[str, ...]] = ("workdir", "cache_dir")

    name: str
    distance: int
    lam: float
    seed: int
    model: str
    width: int
    depth: int
    stem: str
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    patience: int
    eps: float
    device: str = field(default="cpu", kw_only=True)
    workdir: str = field(default="", kw_only=True)

    @abc.abstractmethod
    def problem(self) -> tuple[Any, Any, int]:
        """(train/test :class:`~implreg.cnn.train.Splits`, patch sampler, input channels)."""

    def execute(self, should_stop=None) -> dict | None:
        import torch

        from implreg.cnn.models import build_model
        from implreg.cnn.train import CHECKPOINT, TrainSpec, init_model, train

        splits, patches, channels = self.problem()
        model = init_model(
            lambda: build_model(self.model, channels, self.width, self.stem, depth=self.depth),
            self.seed,
        )
        ckpt = None
        if self.workdir:
            Path(self.workdir).mkdir(parents=True, exist_ok=True)
            ckpt = Path(self.workdir) / CHECKPOINT
        spec = TrainSpec(
            self.epochs,
            self.batch_size,
            self.lr,
            self.momentum,
            self.lam,
            self.eps,
            self.patience,
            self.seed,
        )
        device = torch.device(self.device)
        res = train(model, splits, spec, patches, device=device, checkpoint=ckpt,
                    should_stop=should_stop)  # fmt: skip
        if res is None:
            return None
        return {"distance": self.distance, "lam": self.lam, "seed": self.seed, **res}


def mean_spread(values: list[float]) -> dict:
    a = np.asarray(values, dtype=float)
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
        "runs": int(a.size),
    }


class LocalityExperiment(GridExperiment):
    """A grid of (distance, lambda, seed) training runs; subclasses give the task's units."""

    bulky = "history"
    distance_name: ClassVar[str] = "distance"
    title: ClassVar[str] = ""

    @abc.abstractmethod
    def make_unit(self, cfg: Any, distance: int, lam: float, seed: int, device: str) -> Any:
        """The task's unit (a :class:`TrainUnit`) of one distance, lambda and seed."""

    def training(self, cfg: LocalityConfig, device: str) -> dict:
        """The unit fields every task shares, resolved against the scale."""
        keys = ("model", "width", "depth", "stem", "epochs", "batch_size", "lr", "momentum")
        keys += ("patience", "n_train", "n_test")
        return {k: cfg.value(k) for k in keys} | {
            "eps": cfg.eps,
            "data_seed": cfg.data_seed,
            "device": device,
        }

    def units(self, cfg: LocalityConfig, device: str = "cpu") -> list:
        return [
            self.make_unit(cfg, d, float(lam), cfg.seed + s, device)
            for d in cfg.value("distances")
            for lam in cfg.value("lambdas")
            for s in range(cfg.seeds)
        ]

    @staticmethod
    def unit_name(distance: int, lam: float, seed: int) -> str:
        return f"d{distance}-lam{lam:g}-seed{seed}"

    def bind(self, grid: list, run_dir: Path) -> list:
        return [dataclasses.replace(u, workdir=str(Path(run_dir) / WORK / u.name)) for u in grid]

    def run(self, cfg: Any, prepared: Any, ctx: RunContext) -> Outcome:
        out = super().run(cfg, prepared, ctx)
        if not out.interrupted:  # every unit's result is written: the checkpoints are spent
            shutil.rmtree(ctx.run_dir / WORK, ignore_errors=True)
        return out

    def summarize(self, cfg: LocalityConfig, results: list[dict]) -> dict:
        """Test accuracy (final epoch) per (distance, lambda): mean and spread over seeds, and
        the regularizer's effect at the longest and shortest distance."""
        groups: dict[tuple[int, float], list[dict]] = {}
        for r in results:
            groups.setdefault((r["distance"], r["lam"]), []).append(r)
        table = []
        for (d, lam), rs in sorted(groups.items()):
            table.append(
                {
                    self.distance_name: d,
                    "lam": lam,
                    "test_acc": mean_spread([r["final_test_acc"] for r in rs]),
                    "best_test_acc": mean_spread([r["best_test_acc"] for r in rs]),
                    "train_acc": mean_spread([r["final_train_acc"] for r in rs]),
                    "epochs": mean_spread([r["epochs_run"] for r in rs]),
                }
            )
        dists = sorted({d for d, _ in groups})
        lams = sorted({lam for _, lam in groups})
        effect = {}
        if 0.0 in lams and len(lams) > 1:
            top = lams[-1]
            for label, d in (("longest", dists[-1]), ("shortest", dists[0])):
                base = np.mean([r["final_test_acc"] for r in groups[(d, 0.0)]])
                reg = np.mean([r["final_test_acc"] for r in groups[(d, top)]])
                effect[label] = {
                    self.distance_name: d,
                    "lam": top,
                    "gain_points": float(100 * (reg - base)),
                }
        return {
            "task": self.name,
            "scale": cfg.scale,
            "table": table,
            "effect": effect,
            "unit_seconds": float(sum(r["seconds"] for r in results)),
        }

    def rows(self, results: list[dict], summary: dict) -> list[dict]:
        return [self.strip(r) for r in results]

    def describe(self, unit, result) -> str:
        return f"{unit.name}: test {100 * result['final_test_acc']:.1f}%"

    def summary_text(self, summary: dict) -> str:
        scale = summary["scale"]
        lines = [f"test accuracy (%) at the last epoch, mean +- std over seeds ({scale} scale)"]
        for row in summary["table"]:
            t = row["test_acc"]
            lines.append(
                f"  {self.distance_name} {row[self.distance_name]:>4}  lambda {row['lam']:<5g} "
                f"{100 * t['mean']:5.1f} +- {100 * t['std']:4.1f}  ({t['runs']} seeds, train "
                f"{100 * row['train_acc']['mean']:.1f}%, {row['epochs']['mean']:.0f} epochs)"
            )
        for label, e in summary["effect"].items():
            lines.append(
                f"  lambda {e['lam']:g} vs 0 at the {label} {self.distance_name} "
                f"({e[self.distance_name]}): {e['gain_points']:+.1f} points"
            )
        return "\n".join(lines)

    def plot(self, run_dir: Path) -> list[Path]:
        return [self.plot_accuracy(run_dir), self.plot_examples(run_dir)]

    @abc.abstractmethod
    def plot_examples(self, run_dir: Path) -> Path:
        """A figure of training examples with their labels."""

    def example_unit(self, run_dir: Path) -> Any:
        """The unit of the longest distance at lambda 0 (the examples' data)."""
        cfg = self.config_of(run_dir)
        return self.make_unit(cfg, max(cfg.value("distances")), 0.0, cfg.seed, "cpu")

    def plot_accuracy(self, run_dir: Path) -> Path:
        """Test accuracy against distance, one line per lambda (mean, std bars), as published."""
        from implreg.runs import SUMMARY, read_json

        summary = read_json(Path(run_dir) / SUMMARY)
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(5.2, 3.8))
        for lam in sorted({r["lam"] for r in summary["table"]}):
            rows = [r for r in summary["table"] if r["lam"] == lam]
            x = [r[self.distance_name] for r in rows]
            m = [100 * r["test_acc"]["mean"] for r in rows]
            s = [100 * r["test_acc"]["std"] for r in rows]
            ax.errorbar(x, m, yerr=s, marker="o", capsize=3, label=f"lambda = {lam:g}")
        ax.axhline(50, color="k", lw=0.8, ls=":")
        ax.set_xlabel(self.distance_name.replace("_", " "))
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{self.title} ({summary['scale']} scale)")
        ax.grid(alpha=0.3)
        ax.legend()
        return save_figure(fig, Path(run_dir) / "figure.png")

    def memory_estimate(self, cfg: LocalityConfig) -> Estimate:
        per = self.data_bytes(cfg) + 400e6  # torch, the model, activations of a batch
        at_once = min(cfg.workers, len(self.units(cfg)))
        return Estimate(per * at_once, "n_train", f"{at_once} training workers")

    def data_bytes(self, cfg: Any) -> float:
        return 0.0
