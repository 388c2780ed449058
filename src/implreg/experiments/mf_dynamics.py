"""Singular-value dynamics of deep matrix factorization.

Arora, Cohen, Hu & Luo (NeurIPS 2019), Figure 3; Razin's 2022 blog post,
Figure 1.  Completion of a 100 x 100 rank-5 matrix from 2000 entries by
factorizations of depth 1, 2, 3, trained from a small init with the papers'
adaptive-step GD.  Deeper factorizations learn the singular values one after
another, with sharper jumps (Theorem 3: dσ_r/dt = -N (σ_r^2)^{1-1/N}
<∇ℓ(W), u_r v_r^T>).  One depth per unit; the summary and figure are the
batched-dynamics runner's (which singular values left zero and when; top-k
trajectories).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from implreg.config import param, require
from implreg.experiments.base import Claim, GridExperiment, Preset, find_entry
from implreg.experiments.dynamics import (
    FLOW_AXIS,
    flow_spec,
    learned_summary,
    learned_text,
    topk_figure,
)
from implreg.experiments.mf_fit import FitUnit, fit_memory
from implreg.flow import FlowOptions
from implreg.resources import Estimate


@dataclass(frozen=True)
class MFDynamicsConfig(FlowOptions):
    """Defaults of Arora et al. 2019, Section 5 (ground truth, observations, optimizer, stop)."""

    shape: tuple[int, ...] = param((100, 100), ge=1, min_len=2, max_len=2)
    gt_rank: int = param(5, ge=1)
    gt_norm: float = param(100.0, gt=0)
    num_observations: int = param(2000, ge=1, doc="observed entries")
    depths: tuple[int, ...] = param((1, 2, 3), ge=1, doc="one unit per depth")
    init_scale: float = param(1e-3, gt=0, doc="Frobenius norm of the end matrix at init")
    init: Literal["gaussian", "balanced", "orthogonal", "identity"] = "gaussian"
    optimizer: Literal["adaptive", "flow"] = param(
        "adaptive", doc="flow: gradient flow (an adaptive ODE solver, float64)"
    )
    lr: float = param(1e-3, gt=0)
    eps: float = param(1e-4, gt=0)
    tol: float = param(1e-6, ge=0, doc="stop at train MSE below tol")
    max_iterations: int = param(200_000, ge=1)
    log_every: int = param(100, ge=1)
    top_k: int = param(10, ge=1)
    learned_fraction: float = param(0.1, gt=0, lt=1, doc="a singular value left zero above this")
    dtype: Literal["float32", "float64"] = "float32"
    workers: int = param(2, ge=1, doc="units run at once")
    seed: int = param(0, ge=0)

    def check(self) -> None:
        self.check_flow()
        size = self.shape[0] * self.shape[1]
        require(
            self.num_observations <= size,
            f"num_observations must lie in 1..{size} (the number of entries), "
            f"got {self.num_observations}",
        )


ARORA = "Arora, Cohen, Hu & Luo 2019, Figure 3; Razin 2022 blog, Figure 1"


def _depth(key: str, depth: int = 3):
    def measure(summary: dict) -> float:
        return float(find_entry(summary["runs"], depth=depth)[key])

    return measure


class MFDynamics(GridExperiment):
    name = "mf_dynamics"
    Config = MFDynamicsConfig
    bulky = "history"
    presets = (
        Preset(
            "mf-dynamics",
            "Arora et al. 2019 Figure 3; Razin 2022 blog Figure 1",
            "100x100 rank-5 completion from 2000 entries, depth 1 / 2 / 3, init scale 1e-3: "
            "top singular values over iterations",
            tiny={
                "shape": (12, 12),
                "gt_rank": 2,
                "gt_norm": 12.0,
                "num_observations": 80,
                "depths": (1, 2),
                "max_iterations": 400,
                "log_every": 20,
                "workers": 1,
            },
            claims=(
                Claim(
                    "depth 3 learns 5 singular values",
                    "a depth-3 factorization from a small init learns the five singular values "
                    "of the rank-5 truth one after another; the others stay near zero",
                    ARORA,
                    5.0,
                    _depth("n_learned"),
                    "equals",
                    0.0,  # a count
                ),
                Claim(
                    "depth 3 effective rank",
                    "the depth-3 solution has effective rank near the truth's rank 5",
                    "Arora, Cohen, Hu & Luo 2019",
                    5.0,
                    _depth("effective_rank"),
                    "within_abs",
                    # the truth's own effective rank is 4.94 (unequal singular values); 0.3
                    # separates it from depth 2 (9.7) and depth 1 (69) by far
                    0.3,
                ),
            ),
            reduced={},  # 55 s here
        ),
    )

    def units(self, cfg: MFDynamicsConfig, device: str = "cpu") -> list[FitUnit]:
        return [
            FitUnit(
                f"depth{d}",
                tuple(cfg.shape),
                cfg.gt_rank,
                cfg.gt_norm,
                cfg.num_observations,
                cfg.seed,
                d,
                cfg.init_scale,
                cfg.lr,
                cfg.eps,
                cfg.tol,
                cfg.max_iterations,
                dtype=cfg.dtype,
                init=cfg.init,
                log_every=cfg.log_every,
                top_k=cfg.top_k,
                history=True,
                device=device,
                flow=flow_spec(cfg),
            )
            for d in cfg.depths
        ]

    def memory_estimate(self, cfg: MFDynamicsConfig) -> Estimate:
        """The ``workers`` largest fits at once (each a forked worker, :func:`fit_memory`)."""
        peaks = sorted(
            (fit_memory(u.shape, u.depth, u.m, u.dtype) for u in self.units(cfg)), reverse=True
        )[: cfg.workers]
        n_rows, n_cols = cfg.shape
        what = f"{len(peaks)} fit{'s' * (len(peaks) > 1)} of a {n_rows} x {n_cols} matrix at once"
        return Estimate(float(sum(peaks)), "shape", what)

    def summarize(self, cfg: MFDynamicsConfig, results: list[dict]) -> dict:
        runs = []
        for r in results:
            h = r["history"]
            learned = learned_summary(
                np.asarray(h["iteration"]),
                np.asarray(h["singular_values"]),
                fraction=cfg.learned_fraction,
                top_k=cfg.top_k,
            )
            runs.append({**self.strip(r), **learned})
        return {"runs": runs}

    def describe(self, unit, result) -> str:
        return f"{unit.name}: test MSE {result['test_mse']:.3g}"

    def summary_text(self, summary: dict) -> str:
        return "\n".join(
            f"depth {r['depth']}: {r['status']} after {r['iterations']} iterations; test MSE "
            f"{r['test_mse']:.3g}, effective rank {r['effective_rank']:.3g}, "
            f"{r['n_learned']} singular values left zero (at iterations "
            f"{learned_text(r['learned'])}); top singular values "
            + ", ".join(f"{s:.3g}" for s in r["singular_values_top10"][:6])
            for r in summary["runs"]
        )

    def plot(self, run_dir: Path) -> list[Path]:
        """Top singular values of the end matrix over iterations, one panel per depth."""
        cfg, units, hist = self.unit_results(run_dir)
        series, lines = [], []
        for u in units:
            h = hist[u.name]["history"]
            its = np.asarray(h["iteration"])
            series.append((f"depth {u.depth}", its, np.asarray(h["singular_values"])))
            lines.append((f"depth {u.depth}", its, np.asarray(h["test_mse"])))
        return topk_figure(
            run_dir,
            series,
            top_k=cfg.top_k,
            what="singular value",
            scalar=("test_mse", "MSE over unobserved entries", lines),
            xlabel=FLOW_AXIS if cfg.optimizer == "flow" else "iteration",
        )


EXPERIMENT = MFDynamics()
