"""The grid unit of the determinant-sign experiment (:mod:`implreg.experiments.mf_det_sign`)
and its numeric helpers: the float64 rounding bound of ``det(W_e)``, norms of the end matrix and
balancedness.  Razin & Cohen, "Implicit Regularization in Deep Learning May Not Be Explainable
by Norms" (NeurIPS 2020), Section 3."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from implreg.factorizations.det_sign import init_layers, run_gd
from implreg.factorizations.det_sign_flow import COLUMNS, integrate_flow


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
