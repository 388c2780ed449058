"""The 2x2 determinant-sign example: implicit regularization is not norm minimization.

Razin & Cohen, "Implicit Regularization in Deep Learning May Not Be Explainable
by Norms" (NeurIPS 2020), Section 3; Cohen's 2021 slides.  A depth-N
factorization of a 2x2 matrix is fit to (1,2) = 1, (2,1) = 1, (2,2) = 0, with
(1,1) unobserved.  Every solution has ``det = -1``, but gradient flow cannot
change the sign of ``det(W_e)``: from an init with ``det > 0`` it fits the
data only by letting ``|W_11| -> infinity`` while the effective rank falls to
1, along ``|W_11| = (2 loss)^{-1/2}``, so every norm and quasi-norm grows.

The preset runs depths x step rules (``gd``: the published fixed step;
``flow``: a flow-faithful step control) x inits (``random``: per-layer
Gaussian with det > 0 enforced; ``balanced``: an SVD split of a random
product), one unit each, on the compiled kernel of
:mod:`implreg.factorizations.det_sign`.  Runs that cross ``det = 0`` are
reported as such and drawn apart.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from implreg.config import param
from implreg.experiments.base import GridExperiment, Preset
from implreg.factorizations.det_sign import init_layers, run_gd
from implreg.resources import Estimate
from implreg.runs import pyplot, save_figure


@dataclass(frozen=True)
class DetSignConfig:
    """Settings of the determinant-sign experiment (Razin & Cohen 2020 defaults).

    ``end_std`` is the entry std of the product at init (the per-layer std is
    set from it); ``flow_c`` the relative change allowed per flow step;
    ``max_steps_flow`` caps the flow runs, which cannot finish at depth 2 (the
    small singular value decays exponentially there and det(W_e) falls below
    float64 resolution).
    """

    depths: tuple[int, ...] = param((2, 3, 4), ge=1)
    modes: tuple[Literal["gd", "flow"], ...] = param(("gd", "flow"), doc="step rules")
    inits: tuple[Literal["random", "balanced"], ...] = ("random", "balanced")
    lr: float = param(3e-3, gt=0)
    end_std: float = param(1e-3, gt=0, doc="entry std of the end matrix at init")
    loss_tol: float = param(1e-4, gt=0, doc="stop at this loss")
    max_steps_gd: int = param(20_000_000, ge=1)
    max_steps_flow: int = param(5_000_000, ge=1)
    flow_c: float = param(1e-3, gt=0, lt=1, doc="relative change allowed per flow step")
    record_ratio: float = param(0.97, gt=0, lt=1, doc="record when the loss fell by this factor")
    workers: int = param(2, ge=1, doc="units run at once")
    seed: int = param(0, ge=0)


@dataclass(frozen=True)
class DetSignUnit:
    """One run: a depth, a step rule and an init (the same draw for both step rules)."""

    name: str
    depth: int
    mode: str
    init: str
    lr: float
    end_std: float
    loss_tol: float
    max_steps: int
    flow_c: float
    record_ratio: float
    seed_seq: tuple[int, ...]

    def execute(self, should_stop=None) -> dict:
        """Compiled GD to ``loss_tol``; returns records and the det-sign verdict."""
        rng = np.random.default_rng(list(self.seed_seq))
        layers = init_layers(self.depth, self.init, self.end_std, rng)
        flow = self.mode == "flow"
        start = time.perf_counter()
        status, steps, rec = run_gd(
            layers,
            self.lr,
            self.flow_c if flow else 0.0,
            self.loss_tol,
            self.max_steps,
            self.record_ratio,
        )
        seconds = time.perf_counter() - start
        signs = np.sign(rec[:, 6])
        nz = np.flatnonzero(signs != 0)
        flips = [int(rec[nz[i], 0]) for i in range(1, nz.size) if signs[nz[i]] != signs[nz[i - 1]]]
        norms = end_matrix_norms(rec[:, 2:6].reshape(-1, 2, 2), self.depth)
        return {
            "depth": self.depth,
            "mode": self.mode,
            "init": self.init,
            "lr": self.lr,
            "status": ["reached_loss_tol", "max_steps", "non_finite", "step_control_failed"][
                status
            ],
            "steps": int(steps),
            "seconds": seconds,
            "initial_loss": float(rec[0, 1]),
            "final_loss": float(rec[-1, 1]),
            "final_abs_w11": float(abs(rec[-1, 2])),
            "final_det": float(rec[-1, 6]),
            "rank_one_abs_w11": float((2 * rec[-1, 1]) ** -0.5),
            "det_sign_changes": flips,
            "crossed_det_zero": bool(flips),
            "flow_time": float(rec[-1, 7]),
            "final_norms": {k: float(v[-1]) for k, v in norms.items()},
            "final_balancedness": balancedness(layers),
            "records": {
                "step": rec[:, 0].tolist(),
                "loss": rec[:, 1].tolist(),
                "w11": rec[:, 2].tolist(),
                "det": rec[:, 6].tolist(),
                **{k: v.tolist() for k, v in norms.items()},
            },
        }


def balancedness(layers: list[np.ndarray]) -> list[float]:
    """``||W_{j+1}^T W_{j+1} - W_j W_j^T||`` per pair of layers (inf once a run overflowed)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return [
            float(np.linalg.norm(layers[j + 1].T @ layers[j + 1] - layers[j] @ layers[j].T))
            for j in range(len(layers) - 1)
        ]


def end_matrix_norms(w: np.ndarray, depth: int) -> dict[str, np.ndarray]:
    """Norms, quasi-norms and effective rank of end matrices ``(T, 2, 2)`` (float64).

    Schatten-p quasi-norms ``(sum sigma^p)^{1/p}`` for p = 2/depth, 1/2, 1 (nuclear)
    and 2 (Frobenius); effective rank of Roy & Vetterli (zero sigma dropped).
    """
    from implreg import matrix_metrics as mm

    t = torch.from_numpy(np.ascontiguousarray(w))
    out = {
        f"schatten_{p:.3g}": mm.schatten_quasi_norm(t, p).numpy()
        for p in sorted({2.0 / depth, 0.5, 1.0, 2.0})
    }
    out["effective_rank"] = mm.effective_rank(t).numpy()
    return out


class DetSign(GridExperiment):
    name = "mf_det_sign"
    aliases = ("det_sign",)
    Config = DetSignConfig
    bulky = "records"
    devices = ("cpu",)  # a compiled (numba) kernel of 2x2 matrices
    presets = (
        Preset(
            "mf-det-sign",
            "Razin & Cohen 2020 (|W_11| against the loss); Cohen 2021 slides",
            "2x2 completion with det > 0 at init, depth 2 / 3 / 4, published GD (lr 3e-3) and a "
            "flow-faithful step control, random and balanced inits, to loss 1e-4",
            tiny={"depths": (2, 3), "max_steps_gd": 3000, "max_steps_flow": 3000, "workers": 1},
        ),
    )

    def units(self, cfg: DetSignConfig, device: str = "cpu") -> list[DetSignUnit]:
        return [
            DetSignUnit(
                f"depth{d}-{mode}-{init}",
                d,
                mode,
                init,
                cfg.lr,
                cfg.end_std,
                cfg.loss_tol,
                cfg.max_steps_flow if mode == "flow" else cfg.max_steps_gd,
                cfg.flow_c,
                cfg.record_ratio,
                # the same init draw for both step rules of a depth and init
                (cfg.seed, d, ["random", "balanced"].index(init)),
            )
            for d in cfg.depths
            for mode in cfg.modes
            for init in cfg.inits
        ]

    def memory_estimate(self, cfg: DetSignConfig) -> Estimate:
        """Per worker about 75 MB (measured): the compiled kernel's runtime and its records."""
        at_once = min(cfg.workers, len(cfg.depths) * len(cfg.modes) * len(cfg.inits))
        return Estimate(80e6 * at_once, "workers", f"{at_once} compiled-kernel workers")

    def summarize(self, cfg: DetSignConfig, results: list[dict]) -> dict:
        return {"runs": [self.strip(r) for r in results]}

    def describe(self, unit, result) -> str:
        return f"{unit.name}: |W11| {result['final_abs_w11']:.3g}"

    def summary_text(self, summary: dict) -> str:
        lines = []
        for r in summary["runs"]:
            cross = (
                f"CROSSED det = 0 at step {r['det_sign_changes'][0]}"
                if r["crossed_det_zero"]
                else "det stayed positive"
            )
            lines.append(
                f"depth {r['depth']} {r['mode']:4s} {r['init']:8s}: {r['status']} after "
                f"{r['steps']} steps, loss {r['final_loss']:.3g}, |W11| {r['final_abs_w11']:.3g} "
                f"(rank-one path {r['rank_one_abs_w11']:.3g}); {cross}"
            )
        return "\n".join(lines)

    def plot(self, run_dir: Path) -> list[Path]:
        """|W_11| and det(W_e) against the train loss (log, decreasing), one column per depth."""
        plt = pyplot()

        run_dir = Path(run_dir)
        _, units, results = self.unit_results(run_dir)
        runs = [results[u.name] for u in units]
        depths = sorted({r["depth"] for r in runs})
        fig, axes = plt.subplots(2, len(depths), figsize=(4.6 * len(depths), 7), squeeze=False)
        for c, d in enumerate(depths):
            top, bottom = axes[0, c], axes[1, c]
            lo = math.inf
            for r in runs:
                if r["depth"] != d:
                    continue
                rec = r["records"]
                loss = np.asarray(rec["loss"])
                lo = min(lo, float(loss.min()))
                label = f"{r['mode']}, {r['init']} init"
                style = "-"
                if r["crossed_det_zero"]:
                    label += " (crossed det=0)"
                    style = "--"
                top.plot(loss, np.abs(rec["w11"]), style, label=label)
                bottom.plot(loss, rec["det"], style, label=label)
            grid = np.logspace(math.log10(lo), 0, 200)
            top.plot(grid, (2 * grid) ** -0.5, "k:", lw=1.5, label="rank one: (2 loss)^-1/2")
            for ax in (top, bottom):
                ax.set_xscale("log")
                ax.invert_xaxis()
                ax.set_xlabel("train loss")
                ax.grid(alpha=0.3)
            top.set_yscale("log")
            top.set_ylabel("|W_11|")
            top.set_title(f"depth {d}")
            top.legend(fontsize=7)
            bottom.set_yscale("symlog", linthresh=1e-6)
            bottom.set_ylabel("det(W_e)")
            bottom.axhline(0.0, color="k", lw=0.8)
        return [save_figure(fig, run_dir / "figure.png", dpi=110)]


EXPERIMENT = DetSign()
