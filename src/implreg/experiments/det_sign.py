"""The 2x2 determinant-sign example: implicit regularization is not norm minimization.

Razin & Cohen (NeurIPS 2020), REFERENCE §3; slides of ``seeds/002``.  A
depth-N factorization of a 2x2 matrix is fit to (1,2) = 1, (2,1) = 1,
(2,2) = 0, with (1,1) unobserved.  Every solution has ``det = -1``, but
gradient flow cannot change the sign of ``det(W_e)``: from an init with
``det > 0`` it fits the data only by letting ``|W_11| -> infinity`` while the
effective rank falls to 1, along ``|W_11| = (2 loss)^{-1/2}``, so every norm and
quasi-norm grows.

The preset runs depths x step rules (``gd``: the published fixed step;
``flow``: a flow-faithful step control) x inits (``random``: per-layer
Gaussian with det > 0 enforced; ``balanced``: an SVD split of a random
product).  Runs that cross ``det = 0`` are reported as such and drawn apart.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from implreg.experiments.config import require
from implreg.runs import SUMMARY
from implreg.sweep import Unit, grid_outcome, load_results, run_units


@dataclass(frozen=True)
class DetSignConfig:
    """Settings of the determinant-sign experiment (REFERENCE §3 defaults).

    ``end_std`` is the entry std of the product at init (the per-layer std is
    set from it); ``flow_c`` the relative change allowed per flow step;
    ``max_steps_flow`` caps the flow runs, which cannot finish at depth 2 (the
    small singular value decays exponentially there and det(W_e) falls below
    float64 resolution).
    """

    depths: tuple[int, ...] = (2, 3, 4)
    modes: tuple[str, ...] = ("gd", "flow")
    inits: tuple[str, ...] = ("random", "balanced")
    lr: float = 3e-3
    end_std: float = 1e-3
    loss_tol: float = 1e-4
    max_steps_gd: int = 20_000_000
    max_steps_flow: int = 5_000_000
    flow_c: float = 1e-3
    record_ratio: float = 0.97
    workers: int = 2
    seed: int = 0

    def validate(self) -> None:
        require(len(self.depths) >= 1, "depths needs at least one value")
        require(all(d >= 1 for d in self.depths), f"every depth must be >= 1, got {self.depths}")
        require(
            all(m in {"gd", "flow"} for m in self.modes) and self.modes,
            f"modes must be from 'gd', 'flow', got {self.modes}",
        )
        require(
            all(i in {"random", "balanced"} for i in self.inits) and self.inits,
            f"inits must be from 'random', 'balanced', got {self.inits}",
        )
        require(self.lr > 0, f"lr must be positive, got {self.lr}")
        require(self.end_std > 0, f"end_std must be positive, got {self.end_std}")
        require(self.loss_tol > 0, f"loss_tol must be positive, got {self.loss_tol}")
        require(self.max_steps_gd >= 1, f"max_steps_gd must be positive, got {self.max_steps_gd}")
        require(
            self.max_steps_flow >= 1, f"max_steps_flow must be positive, got {self.max_steps_flow}"
        )
        require(0 < self.flow_c < 1, f"flow_c must lie in (0, 1), got {self.flow_c}")
        require(
            0 < self.record_ratio < 1, f"record_ratio must lie in (0, 1), got {self.record_ratio}"
        )
        require(self.workers >= 1, f"workers must be positive, got {self.workers}")


Config = DetSignConfig


def init_layers(depth: int, init: str, end_std: float, rng: np.random.Generator) -> np.ndarray:
    """Layers ``(depth, 2, 2)`` with ``det(W_e) > 0``.

    ``random``: i.i.d. N(0, s^2) entries with ``s^depth 2^{(depth-1)/2} = end_std`` (the
    entry std of the product), the first row of ``W_1`` negated if ``det < 0``.
    ``balanced``: a random ``M`` with entry std ``end_std`` and ``det M > 0``,
    ``M = U S V^T``, ``W_1 = S^{1/N} V^T``, ``W_j = S^{1/N}``, ``W_N = U S^{1/N}`` so that
    ``W_{j+1}^T W_{j+1} = W_j W_j^T``.
    """
    if init == "random":
        s = (end_std / 2 ** ((depth - 1) / 2)) ** (1.0 / depth)
        layers = rng.normal(0.0, s, size=(depth, 2, 2))
        if np.linalg.det(product(layers)) < 0:
            layers[0, 0] *= -1.0
        return layers
    if init == "balanced":
        m = rng.normal(0.0, end_std, size=(2, 2))
        if np.linalg.det(m) < 0:
            m[:, 0] *= -1.0
        u, sv, vt = np.linalg.svd(m)
        if np.linalg.det(u) < 0:  # then det(vt) < 0 too: flip both, the product is unchanged
            u[:, 1] *= -1.0
            vt[1] *= -1.0
        root = np.diag(sv ** (1.0 / depth))
        if depth == 1:
            return (u @ np.diag(sv) @ vt)[None]
        mids = [root.copy() for _ in range(depth - 2)]
        return np.stack([root @ vt, *mids, u @ root])
    raise ValueError(f"unknown init {init!r}")


def product(layers: np.ndarray) -> np.ndarray:
    w = layers[0]
    for layer in layers[1:]:
        w = layer @ w
    return w


def _worker(params: dict) -> dict:
    """One run: compiled GD to ``loss_tol``; returns records and the det-sign verdict."""
    from implreg.det_sign_kernel import run_gd

    rng = np.random.default_rng(params["seed_seq"])
    layers = init_layers(params["depth"], params["init"], params["end_std"], rng)
    flow = params["mode"] == "flow"
    start = time.perf_counter()
    status, steps, rec = run_gd(
        layers,
        params["lr"],
        params["flow_c"] if flow else 0.0,
        params["loss_tol"],
        params["max_steps_flow"] if flow else params["max_steps_gd"],
        params["record_ratio"],
    )
    seconds = time.perf_counter() - start
    signs = np.sign(rec[:, 6])
    nz = np.flatnonzero(signs != 0)
    flips = [int(rec[nz[i], 0]) for i in range(1, nz.size) if signs[nz[i]] != signs[nz[i - 1]]]
    norms = end_matrix_norms(rec[:, 2:6].reshape(-1, 2, 2), params["depth"])
    last = {k: float(v[-1]) for k, v in norms.items()}
    return {
        **{k: params[k] for k in ("depth", "mode", "init", "lr")},
        "status": ["reached_loss_tol", "max_steps", "non_finite", "step_control_failed"][status],
        "steps": int(steps),
        "seconds": seconds,
        "final_loss": float(rec[-1, 1]),
        "final_abs_w11": float(abs(rec[-1, 2])),
        "final_det": float(rec[-1, 6]),
        "rank_one_abs_w11": float((2 * rec[-1, 1]) ** -0.5),
        "det_sign_changes": flips,
        "crossed_det_zero": bool(flips),
        "flow_time": float(rec[-1, 7]),
        "final_norms": last,
        "final_balancedness": [
            float(np.linalg.norm(layers[j + 1].T @ layers[j + 1] - layers[j] @ layers[j].T))
            for j in range(params["depth"] - 1)
        ],
        "records": {
            "step": rec[:, 0].tolist(),
            "loss": rec[:, 1].tolist(),
            "w11": rec[:, 2].tolist(),
            "det": rec[:, 6].tolist(),
            **{k: v.tolist() for k, v in norms.items()},
        },
    }


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


def units(cfg: DetSignConfig) -> list[Unit]:
    out = []
    for d in cfg.depths:
        for mode in cfg.modes:
            for init in cfg.inits:
                out.append(
                    Unit(
                        f"depth{d}-{mode}-{init}",
                        {
                            "depth": d,
                            "mode": mode,
                            "init": init,
                            "lr": cfg.lr,
                            "end_std": cfg.end_std,
                            "loss_tol": cfg.loss_tol,
                            "max_steps_gd": cfg.max_steps_gd,
                            "max_steps_flow": cfg.max_steps_flow,
                            "flow_c": cfg.flow_c,
                            "record_ratio": cfg.record_ratio,
                            # the same init draw for both step rules of a depth and init
                            "seed_seq": [cfg.seed, d, ["random", "balanced"].index(init)],
                        },
                    )
                )
    return out


def prepare(cfg: DetSignConfig) -> DetSignConfig:
    cfg.validate()
    return cfg


def run(
    cfg, run_dir: Path, *, prepared=None, resume=False, progress=True, interrupt=None, log=print
) -> dict:
    """Run every unfinished unit (two processes by default), then summarize and plot."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    grid = units(cfg)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(grid), initial=len(load_results(run_dir, grid)), unit="run")

    def done(u: Unit, res: dict) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{u.name}: |W11| {res['final_abs_w11']:.3g}")

    start = time.perf_counter()
    try:
        results, interrupted = run_units(
            grid, _worker, run_dir, workers=cfg.workers, interrupt=interrupt, on_done=done
        )
    finally:
        if bar is not None:
            bar.close()
    return grid_outcome(
        run_dir, grid, results, interrupted, started=start, bulky="records", plot=plot
    )


def summary_text(summary: dict) -> str:
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


def plot(run_dir: Path) -> list[Path]:
    """|W_11| and det(W_e) against the train loss (log, decreasing), one column per depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from implreg.runs import read_json

    run_dir = Path(run_dir)
    summary = read_json(run_dir / SUMMARY)
    depths = sorted({r["depth"] for r in summary["runs"]})
    fig, axes = plt.subplots(2, len(depths), figsize=(4.6 * len(depths), 7), squeeze=False)
    for c, d in enumerate(depths):
        top, bottom = axes[0, c], axes[1, c]
        lo = math.inf
        for r in summary["runs"]:
            if r["depth"] != d:
                continue
            res = read_json(run_dir / "units" / f"depth{d}-{r['mode']}-{r['init']}.json")
            rec = res["records"]
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
    fig.tight_layout()
    path = run_dir / "figure.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
