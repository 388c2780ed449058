"""Singular-value dynamics of deep matrix factorization (Arora et al. 2019; seeds/003 Fig. 1).

Completion of a 100 x 100 rank-5 matrix from 2000 entries by factorizations of
depth 1, 2, 3, trained from a small init with the papers' adaptive-step GD.
Deeper factorizations learn the singular values one after another, with
sharper jumps (Theorem 3: dσ_r/dt = -N (σ_r^2)^{1-1/N} <∇ℓ(W), u_r v_r^T>).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from implreg.experiments import mf_common
from implreg.experiments.config import require
from implreg.runs import SUMMARY, read_json
from implreg.sweep import Unit, grid_outcome, run_units


@dataclass(frozen=True)
class MFDynamicsConfig:
    """REFERENCE §3 defaults (ground truth, observations, optimizer, stop rule)."""

    shape: tuple[int, ...] = (100, 100)
    gt_rank: int = 5
    gt_norm: float = 100.0
    num_observations: int = 2000
    depths: tuple[int, ...] = (1, 2, 3)
    init_scale: float = 1e-3
    init: str = "gaussian"
    lr: float = 1e-3
    eps: float = 1e-4
    tol: float = 1e-6
    max_iterations: int = 200_000
    log_every: int = 100
    top_k: int = 10
    dtype: str = "float32"
    workers: int = 2
    seed: int = 0

    def validate(self) -> None:
        require(
            len(self.shape) == 2 and min(self.shape) >= 1,
            f"shape must be two positive sizes, got {self.shape}",
        )
        require(self.gt_rank >= 1, f"gt_rank must be positive, got {self.gt_rank}")
        require(self.gt_norm > 0, f"gt_norm must be positive, got {self.gt_norm}")
        size = self.shape[0] * self.shape[1]
        require(
            1 <= self.num_observations <= size,
            f"num_observations must lie in 1..{size} (the number of entries), "
            f"got {self.num_observations}",
        )
        require(
            len(self.depths) >= 1 and all(d >= 1 for d in self.depths),
            f"every depth must be >= 1, got {self.depths}",
        )
        require(self.init_scale > 0, f"init_scale must be positive, got {self.init_scale}")
        require(
            self.init in {"gaussian", "balanced", "orthogonal", "identity"},
            f"unknown init {self.init!r}",
        )
        require(self.lr > 0 and self.eps > 0, "lr and eps must be positive")
        require(self.tol >= 0, f"tol must be non-negative, got {self.tol}")
        require(
            self.max_iterations >= 1 and self.log_every >= 1,
            "max_iterations and log_every must be positive",
        )
        require(self.top_k >= 1, f"top_k must be positive, got {self.top_k}")
        require(
            self.dtype in mf_common.DTYPES,
            f"dtype must be 'float32' or 'float64', got {self.dtype!r}",
        )
        require(self.workers >= 1, f"workers must be positive, got {self.workers}")


Config = MFDynamicsConfig


def prepare(cfg: MFDynamicsConfig) -> MFDynamicsConfig:
    cfg.validate()
    return cfg


def units(cfg: MFDynamicsConfig) -> list[Unit]:
    base = {
        "shape": list(cfg.shape),
        "gt_rank": cfg.gt_rank,
        "gt_norm": cfg.gt_norm,
        "m": cfg.num_observations,
        "init_scale": cfg.init_scale,
        "init": cfg.init,
        "lr": cfg.lr,
        "eps": cfg.eps,
        "tol": cfg.tol,
        "max_iterations": cfg.max_iterations,
        "log_every": cfg.log_every,
        "top_k": cfg.top_k,
        "dtype": cfg.dtype,
        "seed": cfg.seed,
        "history": True,
    }
    return [Unit(f"depth{d}", {**base, "depth": d}) for d in cfg.depths]


def run(
    cfg, run_dir: Path, *, prepared=None, resume=False, progress=True, interrupt=None, log=print
) -> dict:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    grid = units(cfg)
    start = time.perf_counter()
    results, interrupted = run_units(
        grid, mf_common.fit, run_dir, workers=cfg.workers, interrupt=interrupt
    )
    return grid_outcome(
        run_dir, grid, results, interrupted, started=start, bulky="history", plot=plot
    )


def summary_text(summary: dict) -> str:
    return "\n".join(
        f"depth {r['depth']}: {r['status']} after {r['iterations']} iterations; test MSE "
        f"{r['test_mse']:.3g}, effective rank {r['effective_rank']:.3g}, top singular values "
        + ", ".join(f"{s:.3g}" for s in r["singular_values_top10"][:6])
        for r in summary["runs"]
    )


def plot(run_dir: Path) -> list[Path]:
    """Top singular values of the end matrix over iterations, one panel per depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    runs = read_json(run_dir / SUMMARY)["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(4.4 * len(runs), 3.5), squeeze=False)
    for ax, r in zip(axes[0], runs):
        hist = read_json(run_dir / "units" / f"depth{r['depth']}.json")["history"]
        sv = np.asarray(hist["singular_values"])
        for k in range(sv.shape[1]):
            ax.plot(hist["iteration"], sv[:, k], lw=1.2)
        ax.set_title(f"depth {r['depth']}: top {sv.shape[1]} singular values")
        ax.set_xlabel("iteration")
        ax.set_ylabel("singular value")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = run_dir / "figure.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
