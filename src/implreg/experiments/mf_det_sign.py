"""The 2x2 determinant-sign example: implicit regularization is not norm minimization.

Razin & Cohen, "Implicit Regularization in Deep Learning May Not Be Explainable
by Norms" (NeurIPS 2020), Section 3; Cohen's 2021 slides.  A depth-N
factorization of a 2x2 matrix is fit to (1,2) = 1, (2,1) = 1, (2,2) = 0, with
(1,1) unobserved.  Every solution has ``det = -1``, but gradient flow from a
balanced factorization cannot change the sign of ``det(W_e)`` (the corollary of
the singular-value dynamics, which assume balancedness): from an init with
``det > 0`` it fits the data only by letting ``|W_11| -> infinity`` while the
effective rank falls to 1, along ``|W_11| = (2 loss)^{-1/2}``, so every norm and
quasi-norm grows.

The preset runs depths x step rules x inits (``random``: per-layer Gaussian
with det > 0 enforced; ``balanced``: an SVD split of a random product), one
unit each.  Step rules: ``gd``, the published fixed step, and ``flow``, a
flow-faithful step control, both on the compiled float64 kernel of
:mod:`implreg.factorizations.det_sign`; ``flow-exact``, gradient flow itself,
integrated with error control by :mod:`implreg.factorizations.det_sign_flow`
(end-to-end singular-value coordinates for balanced inits, so ``det(W_e)`` is
carried as its logarithm however small it gets; the layers for the others).

Every sign change of ``det(W_e)`` is reported with the margin by which it was
resolved: a GD run whose ``|det|`` at the crossing is within 100x of its float64
rounding bound crossed *by rounding*; a flow run's crossing is resolved
against the integration's error bound.  Measured: from the Gaussian ``random``
inits (unbalanced) the exact flow itself crosses ``det = 0`` (the corollary
assumes a balanced factorization), from ``balanced`` inits it never does.
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
from implreg.experiments.base import Claim, GridExperiment, Preset, find_entry
from implreg.factorizations.det_sign import init_layers, run_gd
from implreg.factorizations.det_sign_flow import COLUMNS, integrate_flow
from implreg.resources import Estimate
from implreg.runs import pyplot, save_figure

SOURCE = "Razin & Cohen 2020, Section 3 (|W_11| against the loss)"


def balanced_flow_w11_ratio(depth: int):
    """|W_11| of the exact flow from a balanced init over the rank-one path (2 loss)^(-1/2),
    at the run's final loss (the stop at 1e-4)."""

    def measure(summary: dict) -> float:
        r = find_entry(summary["runs"], depth=depth, mode="flow-exact", init="balanced")
        return float(r["final_abs_w11"]) * math.sqrt(2.0 * float(r["final_loss"]))

    return measure


def balanced_flow_sign_changes(summary: dict) -> float:
    """Exact-flow runs from balanced inits whose det(W_e) changed sign."""
    runs = [r for r in summary["runs"] if r["mode"] == "flow-exact" and r["init"] == "balanced"]
    if not runs:
        raise KeyError("no flow-exact run from a balanced init")
    return float(sum(bool(r["crossed_det_zero"]) for r in runs))


def _w11_claim(depth: int) -> Claim:
    return Claim(
        f"depth {depth}: |W11| on the rank-one path",
        f"depth {depth}, gradient flow from a balanced init with det > 0: at loss 1e-4 "
        "|W_11| = (2 loss)^(-1/2) = 70.7 (measured: |W_11| (2 loss)^(1/2), published 1)",
        SOURCE,
        1.0,
        balanced_flow_w11_ratio(depth),
        "within_rel",
        # 2%: the rank-one path holds up to O(loss) terms (1e-4) and the flow is integrated to
        # rtol 1e-10; measured deviations are 2e-4 ... 6e-4
        0.02,
    )


@dataclass(frozen=True)
class DetSignConfig:
    """Settings of the determinant-sign experiment (Razin & Cohen 2020 defaults).

    ``end_std`` is the entry std of the product at init (the per-layer std is
    set from it); ``flow_c`` the relative change allowed per step of ``flow``;
    ``max_steps_flow`` caps those runs, which cannot finish at depth 2 (float64
    layer entries cannot follow det(W_e) there).  ``flow_rtol`` / ``flow_atol``
    are the error tolerances of ``flow-exact`` (gradient flow integrated by
    Dormand-Prince 5(4); the defaults change |W_11| at loss 1e-4 by < 1e-7
    relative against 100x tighter ones), ``max_steps_exact`` caps its steps.
    """

    depths: tuple[int, ...] = param((2, 3, 4), ge=1)
    modes: tuple[Literal["gd", "flow", "flow-exact"], ...] = param(
        ("gd", "flow-exact"),
        doc="step rules: gd (fixed lr), flow (float64 step control), flow-exact (gradient flow)",
    )
    inits: tuple[Literal["random", "balanced"], ...] = ("random", "balanced")
    lr: float = param(3e-3, gt=0)
    end_std: float = param(1e-3, gt=0, doc="entry std of the end matrix at init")
    loss_tol: float = param(1e-4, gt=0, doc="stop at this loss")
    max_steps_gd: int = param(20_000_000, ge=1)
    max_steps_flow: int = param(5_000_000, ge=1)
    max_steps_exact: int = param(20_000_000, ge=1, doc="accepted steps allowed to flow-exact")
    flow_c: float = param(1e-3, gt=0, lt=1, doc="relative change allowed per flow step")
    flow_rtol: float = param(1e-10, gt=0, lt=1e-3, doc="relative error tolerance of flow-exact")
    flow_atol: float = param(1e-12, gt=0, lt=1e-3, doc="absolute error tolerance of flow-exact")
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
    flow_rtol: float = 1e-10
    flow_atol: float = 1e-12

    def execute(self, should_stop=None) -> dict:
        """Compiled GD or the integrated flow to ``loss_tol``; records and the det-sign verdict."""
        rng = np.random.default_rng(list(self.seed_seq))
        layers = init_layers(self.depth, self.init, self.end_std, rng)
        if self.mode == "flow-exact":
            return self._exact_flow(layers)
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
        with np.errstate(divide="ignore"):
            log_det = np.log10(np.abs(rec[:, 6]))
        res = float_det_resolution(rec[:, 2:6], self.depth)
        margins = [
            float(abs(rec[i, 6]) / res[i]) for i in np.flatnonzero(np.isin(rec[:, 0], flips))
        ]
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
            "crossing_margins": margins,
            "crossed_by_rounding": bool(margins) and margins[0] < ROUNDING_MARGIN,
            "flow_time": float(rec[-1, 7]),
            "final_norms": {k: float(v[-1]) for k, v in norms.items()},
            "final_balancedness": balancedness(layers),
            "records": {
                "step": rec[:, 0].tolist(),
                "loss": rec[:, 1].tolist(),
                "w11": rec[:, 2].tolist(),
                "det": rec[:, 6].tolist(),
                "det_sign": np.sign(rec[:, 6]).tolist(),
                "log10_abs_det": log_det.tolist(),
                **{k: v.tolist() for k, v in norms.items()},
            },
        }

    def _exact_flow(self, layers: np.ndarray) -> dict:
        """Gradient flow to ``loss_tol`` (:func:`.det_sign_flow.integrate_flow`)."""
        start = time.perf_counter()
        out = integrate_flow(
            layers,
            self.loss_tol,
            rtol=self.flow_rtol,
            atol=self.flow_atol,
            max_steps=self.max_steps,
            record_ratio=self.record_ratio,
        )
        seconds = time.perf_counter() - start
        rec = {name: out["records"][:, i] for i, name in enumerate(COLUMNS)}
        cross = out["crossings"]
        norms = singular_value_norms(rec["sigma1"], rec["log10_sigma2"], self.depth)
        loss, w11 = rec["loss"], rec["w11"]
        sign, log_det = rec["det_sign"], rec["log10_abs_det"]
        with np.errstate(under="ignore"):
            det = sign * np.power(10.0, log_det)
        path = float((2 * loss[-1]) ** -0.5)
        final_layers = out.get("layers")
        return {
            "depth": self.depth,
            "mode": self.mode,
            "init": self.init,
            "lr": None,
            "status": out["status"],
            "steps": out["steps"],
            "seconds": seconds,
            "representation": out["representation"],
            "rtol": self.flow_rtol,
            "atol": self.flow_atol,
            "initial_loss": float(loss[0]),
            "final_loss": float(loss[-1]),
            "final_abs_w11": float(abs(w11[-1])),
            "final_det": float(det[-1]),
            "final_det_sign": float(sign[-1]),
            "final_log10_abs_det": float(log_det[-1]),
            "min_log10_abs_det": float(log_det.min()),
            "rank_one_abs_w11": path,
            "w11_rel_dev": float(abs(w11[-1]) / path - 1.0),
            "det_sign_changes": [int(s) for s in np.interp(cross[:, 0], rec["time"], rec["steps"])],
            "det_crossings": [
                {"time": float(t), "loss": float(lo), "margin": float(m)} for t, lo, m in cross
            ],
            "crossed_det_zero": bool(len(cross)),
            "crossing_margins": [float(m) for m in cross[:, 2]],
            "crossed_by_rounding": False,
            "flow_time": float(rec["time"][-1]),
            "final_norms": {k: float(v[-1]) for k, v in norms.items()},
            "final_balancedness": (
                balancedness(list(final_layers))
                if final_layers is not None
                else [0.0] * (self.depth - 1)  # the end-to-end state is balanced by construction
            ),
            "records": {
                "step": rec["steps"].tolist(),
                "time": rec["time"].tolist(),
                "loss": loss.tolist(),
                "w11": w11.tolist(),
                "det": det.tolist(),
                "det_sign": sign.tolist(),
                "log10_abs_det": log_det.tolist(),
                "sigma1": rec["sigma1"].tolist(),
                "log10_sigma2": rec["log10_sigma2"].tolist(),
                **{k: v.tolist() for k, v in norms.items()},
            },
        }


#: a GD crossing with |det| under this many times its float64 rounding bound is called rounding
ROUNDING_MARGIN = 100.0


def float_det_resolution(w: np.ndarray, depth: int) -> np.ndarray:
    """Rounding bound of ``det(W_e)`` from float64 entries ``(T, 4)`` of a depth-``depth``
    product: ``4 depth eps (|W_11 W_22| + |W_12 W_21|)`` (each entry carries ``depth``
    rounded products, and the determinant one cancellation)."""
    w = np.asarray(w, dtype=np.float64)
    eps = np.finfo(np.float64).eps
    return 4 * depth * eps * (np.abs(w[:, 0] * w[:, 3]) + np.abs(w[:, 1] * w[:, 2]))


def singular_value_norms(sigma1, log10_sigma2, depth: int) -> dict[str, np.ndarray]:
    """:func:`end_matrix_norms` from the singular values (``sigma_2`` as its ``log10``, so a
    ``sigma_2`` far below ``eps sigma_1`` still counts; effective rank of Roy & Vetterli)."""
    s1 = np.asarray(sigma1, dtype=np.float64)
    lr = (np.asarray(log10_sigma2, dtype=np.float64) - np.log10(s1)) * math.log(10.0)  # ln s2/s1
    with np.errstate(under="ignore"):
        r = np.exp(lr)
        out = {
            f"schatten_{p:.3g}": s1 * (1.0 + r**p) ** (1.0 / p)
            for p in sorted({2.0 / depth, 0.5, 1.0, 2.0})
        }
        p2 = r / (1.0 + r)
        entropy = np.log1p(r) / (1.0 + r) - p2 * (lr - np.log1p(r))
    out["effective_rank"] = np.exp(entropy)
    return out


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
            "2x2 completion with det > 0 at init, depth 2 / 3 / 4, published GD (lr 3e-3) and "
            "gradient flow integrated with error control, random and balanced inits, to loss 1e-4",
            tiny={
                "depths": (2, 3),
                "max_steps_gd": 3000,
                "max_steps_flow": 3000,
                "max_steps_exact": 3000,
                "workers": 1,
            },
            claims=(
                *(_w11_claim(d) for d in (2, 3, 4)),
                Claim(
                    "det keeps its sign",
                    "gradient flow from a balanced init with det > 0 never changes the sign of "
                    "det(W_e) (from the unbalanced Gaussian inits the flow does cross det = 0 "
                    "here: the paper's statement assumes balancedness)",
                    SOURCE,
                    0.0,
                    balanced_flow_sign_changes,
                    "equals",
                    0.0,  # a count of runs
                ),
            ),
            reduced={},  # 17 s here
        ),
    )

    def units(self, cfg: DetSignConfig, device: str = "cpu") -> list[DetSignUnit]:
        caps = {"gd": cfg.max_steps_gd, "flow": cfg.max_steps_flow}
        return [
            DetSignUnit(
                f"depth{d}-{mode}-{init}",
                d,
                mode,
                init,
                cfg.lr,
                cfg.end_std,
                cfg.loss_tol,
                caps.get(mode, cfg.max_steps_exact),
                cfg.flow_c,
                cfg.record_ratio,
                # the same init draw for every step rule of a depth and init
                (cfg.seed, d, ["random", "balanced"].index(init)),
                cfg.flow_rtol,
                cfg.flow_atol,
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
        """Runs, and which are flow, which GD, which GD runs crossed det = 0 by rounding."""
        runs = [self.strip(r) for r in results]
        exact = {(r["depth"], r["init"]): r for r in runs if r["mode"] == "flow-exact"}
        for r in runs:
            twin = exact.get((r["depth"], r["init"]))
            if r["mode"] != "flow-exact" and twin is not None:
                r["exact_flow_crossed_det_zero"] = twin["crossed_det_zero"]
        name = "depth{depth}-{mode}-{init}".format
        return {
            "runs": runs,
            "flow_runs": [name(**r) for r in runs if r["mode"] != "gd"],
            "gd_runs": [name(**r) for r in runs if r["mode"] == "gd"],
            "gd_crossed_by_rounding": [
                name(**r) for r in runs if r["mode"] == "gd" and r["crossed_by_rounding"]
            ],
        }

    def describe(self, unit, result) -> str:
        return f"{unit.name}: |W11| {result['final_abs_w11']:.3g}"

    def summary_text(self, summary: dict) -> str:
        lines = []
        for r in summary["runs"]:
            if r["mode"] == "flow-exact":
                lines.append(_exact_line(r))
                continue
            what = f"GD (lr {r['lr']:g})" if r["mode"] == "gd" else "flow (float64 step control)"
            if not r["crossed_det_zero"]:
                cross = "det stayed positive"
            else:
                margin = r["crossing_margins"][0] if r.get("crossing_margins") else math.nan
                why = (
                    f"BY ROUNDING (|det| {margin:.2g}x its float64 rounding bound)"
                    if r.get("crossed_by_rounding")
                    else f"resolved (|det| {margin:.2g}x its float64 rounding bound)"
                )
                cross = f"CROSSED det = 0 at step {r['det_sign_changes'][0]} {why}"
                twin = r.get("exact_flow_crossed_det_zero")
                if twin is not None:
                    cross += "; the exact flow from this init " + (
                        "crosses too" if twin else "keeps det > 0"
                    )
            lines.append(
                f"depth {r['depth']} {what} {r['init']} init: {r['status']} after "
                f"{r['steps']} steps, loss {r['final_loss']:.3g}, |W11| {r['final_abs_w11']:.3g} "
                f"(rank-one path {r['rank_one_abs_w11']:.3g}); {cross}"
            )
        lines.append("flow runs: " + (", ".join(summary["flow_runs"]) or "none"))
        lines.append("GD runs: " + (", ".join(summary["gd_runs"]) or "none"))
        lines.append(
            "GD runs that crossed det = 0 by rounding: "
            + (", ".join(summary["gd_crossed_by_rounding"]) or "none")
        )
        return "\n".join(lines)

    def plot(self, run_dir: Path) -> list[Path]:
        """|W_11| and log10|det(W_e)| (with its sign) against the train loss (log, decreasing),
        one column per depth; GD thin, the float64 step control dash-dotted, the exact flow
        thick; crossings of det = 0 marked (x: by rounding, o: resolved)."""
        plt = pyplot()

        run_dir = Path(run_dir)
        _, units, results = self.unit_results(run_dir)
        runs = [results[u.name] for u in units]
        depths = sorted({r["depth"] for r in runs})
        fig, axes = plt.subplots(2, len(depths), figsize=(4.8 * len(depths), 7.5), squeeze=False)
        colors = {
            ("gd", "random"): "tab:blue",
            ("gd", "balanced"): "tab:cyan",
            ("flow", "random"): "tab:olive",
            ("flow", "balanced"): "tab:green",
            ("flow-exact", "random"): "tab:red",
            ("flow-exact", "balanced"): "tab:purple",
        }
        names = {"gd": "GD", "flow": "flow (float64 ctrl)", "flow-exact": "exact flow"}
        for c, d in enumerate(depths):
            top, bottom = axes[0, c], axes[1, c]
            lo = math.inf
            for r in runs:
                if r["depth"] != d:
                    continue
                rec = r["records"]
                loss = np.asarray(rec["loss"], dtype=float)
                lo = min(lo, float(loss.min()))
                label = f"{names[r['mode']]}, {r['init']} init"
                if r["crossed_det_zero"]:
                    label += (
                        " (crossed det=0 by rounding)"
                        if r.get("crossed_by_rounding")
                        else " (crossed det=0)"
                    )
                kw = {
                    "color": colors[(r["mode"], r["init"])],
                    "lw": 2.2 if r["mode"] == "flow-exact" else 1.0,
                    "ls": "-." if r["mode"] == "flow" else "-",
                }
                top.plot(loss, np.abs(rec["w11"]), label=label, **kw)
                sign = np.asarray(rec.get("det_sign", np.sign(rec["det"])), dtype=float)
                logd = np.asarray(rec.get("log10_abs_det", []), dtype=float)
                if logd.size != loss.size:
                    with np.errstate(divide="ignore"):
                        logd = np.log10(np.abs(np.asarray(rec["det"], dtype=float)))
                pos, neg = np.where(sign > 0, logd, np.nan), np.where(sign < 0, logd, np.nan)
                bottom.plot(loss, pos, **kw)
                bottom.plot(loss, neg, **{**kw, "ls": ":"})
                if r["crossed_det_zero"]:
                    i = int(np.argmax(sign * sign[0] < 0)) if (sign * sign[0] < 0).any() else -1
                    marker = "x" if r.get("crossed_by_rounding") else "o"
                    for ax, y in ((top, abs(rec["w11"][i])), (bottom, logd[i])):
                        ax.plot([loss[i]], [y], marker, color=kw["color"], ms=8, mfc="none")
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
            top.legend(fontsize=6.5)
            bottom.set_ylabel("log10 |det(W_e)|  (solid: det > 0, dotted: det < 0)")
        fig.suptitle(
            "thin: GD (float64), thick: gradient flow (Dormand-Prince 5(4)); "
            "x: det crossed 0 by rounding, o: resolved crossing",
            fontsize=9,
        )
        return [save_figure(fig, run_dir / "figure.png", dpi=110)]


def _exact_line(r: dict) -> str:
    """One summary line of a ``flow-exact`` run."""
    how = f"exact flow ({r['representation']}, rtol {r['rtol']:g}, atol {r['atol']:g})"
    if r["crossed_det_zero"]:
        c = r["det_crossings"][0]
        det = (
            f"det CHANGED SIGN at t = {c['time']:.4g} (loss {c['loss']:.3g}), resolved "
            f"{c['margin']:.2g}x above the det error bound: the flow itself crosses det = 0 "
            "from this unbalanced init"
        )
    else:
        det = (
            f"det never changed sign, log10 det(W_e) = {r['final_log10_abs_det']:.4g} at the end "
            f"(min {r['min_log10_abs_det']:.4g})"
        )
    return (
        f"depth {r['depth']} {how} {r['init']} init: {r['status']} at t = {r['flow_time']:.5g} "
        f"after {r['steps']} steps, loss {r['final_loss']:.3g}, |W11| {r['final_abs_w11']:.4g} "
        f"(rank-one path {r['rank_one_abs_w11']:.4g}, deviation {r['w11_rel_dev']:+.2e}); {det}"
    )


EXPERIMENT = DetSign()
