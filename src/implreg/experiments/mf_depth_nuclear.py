"""Depth versus nuclear-norm minimization (Arora et al. 2019; slides of seeds/002: "MF gives up
min nuclear norm for low rank").

For depths 2, 3, 4 and init scales 1e-3 ... 1e-6, completion of a 100 x 100
rank-5 matrix from 2000 and 5000 entries: reconstruction error, nuclear norm
and effective rank of the solution against the init scale, beside the
nuclear-norm minimizer (cvxpy + SCS) and the ground truth; and the error
against the number of observations.  Every fit is a unit of a resumable grid
run over the local cores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from implreg.experiments import mf_common
from implreg.experiments.config import require
from implreg.runs import SUMMARY, read_json, write_json
from implreg.sweep import Unit, run_units


@dataclass(frozen=True)
class DepthNuclearConfig:
    """REFERENCE §3 defaults; ``sweep_*`` set the error-against-observations panel."""

    shape: tuple[int, ...] = (100, 100)
    gt_rank: int = 5
    gt_norm: float = 100.0
    depths: tuple[int, ...] = (2, 3, 4)
    init_scales: tuple[float, ...] = (1e-3, 1e-4, 1e-5, 1e-6)
    observations: tuple[int, ...] = (2000, 5000)
    sweep_observations: tuple[int, ...] = (1000, 2000, 3000, 4000, 5000)
    sweep_depths: tuple[int, ...] = (2, 3)
    sweep_init_scale: float = 1e-3
    nuclear_tol: float = 1e-3
    solver: str = "SCS"
    lr: float = 1e-3
    eps: float = 1e-4
    tol: float = 1e-6
    max_iterations: int = 300_000
    dtype: str = "float32"
    workers: int = 2
    seed: int = 0

    def validate(self) -> None:
        require(
            len(self.shape) == 2 and min(self.shape) >= 1,
            f"shape must be two positive sizes, got {self.shape}",
        )
        size = self.shape[0] * self.shape[1]
        for m in (*self.observations, *self.sweep_observations):
            require(
                1 <= m <= size,
                f"observation counts must lie in 1..{size} (the number of entries), got {m}",
            )
        require(all(d >= 1 for d in (*self.depths, *self.sweep_depths)), "every depth must be >= 1")
        require(
            all(s > 0 for s in (*self.init_scales, self.sweep_init_scale)),
            "every init scale must be positive",
        )
        require(self.gt_rank >= 1 and self.gt_norm > 0, "gt_rank and gt_norm must be positive")
        require(self.nuclear_tol > 0, f"nuclear_tol must be positive, got {self.nuclear_tol}")
        require(
            self.lr > 0 and self.eps > 0 and self.tol >= 0,
            "lr, eps must be positive and tol non-negative",
        )
        require(
            self.max_iterations >= 1 and self.workers >= 1,
            "max_iterations and workers must be positive",
        )
        require(
            self.dtype in mf_common.DTYPES,
            f"dtype must be 'float32' or 'float64', got {self.dtype!r}",
        )


Config = DepthNuclearConfig


def prepare(cfg: DepthNuclearConfig) -> DepthNuclearConfig:
    cfg.validate()
    return cfg


def _base(cfg: DepthNuclearConfig) -> dict:
    return {
        "shape": list(cfg.shape),
        "gt_rank": cfg.gt_rank,
        "gt_norm": cfg.gt_norm,
        "lr": cfg.lr,
        "eps": cfg.eps,
        "tol": cfg.tol,
        "max_iterations": cfg.max_iterations,
        "dtype": cfg.dtype,
        "seed": cfg.seed,
        "nuclear_tol": cfg.nuclear_tol,
        "solver": cfg.solver,
    }


def fit_name(d: int, s: float, m: int) -> str:
    return f"fit-d{d}-s{s:g}-m{m}"


def units(cfg: DepthNuclearConfig) -> tuple[list[Unit], list[Unit]]:
    """(fits, nuclear baselines); fits shared by both panels are listed once."""
    base = _base(cfg)
    fits: dict[str, Unit] = {}
    combos = [(d, s, m) for m in cfg.observations for d in cfg.depths for s in cfg.init_scales]
    combos += [
        (d, cfg.sweep_init_scale, m) for m in cfg.sweep_observations for d in cfg.sweep_depths
    ]
    for d, s, m in combos:
        name = fit_name(d, s, m)
        fits.setdefault(name, Unit(name, {**base, "depth": d, "init_scale": s, "m": m}))
    ms = sorted(set(cfg.observations) | set(cfg.sweep_observations))
    nucl = [Unit(f"nuclear-m{m}", {**base, "m": m}) for m in ms]
    return list(fits.values()), nucl


def run(
    cfg, run_dir: Path, *, prepared=None, resume=False, progress=True, interrupt=None, log=print
) -> dict:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fits, nucl = units(cfg)
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(fits) + len(nucl), unit="run")

    def done(u, res):
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(u.name)

    try:
        r_fit, stop1 = run_units(
            fits, mf_common.fit, run_dir, workers=cfg.workers, interrupt=interrupt, on_done=done
        )
        r_nuc, stop2 = (
            ({}, True)
            if stop1
            else run_units(
                nucl,
                mf_common.nuclear,
                run_dir,
                workers=cfg.workers,
                interrupt=interrupt,
                on_done=done,
            )
        )
    finally:
        if bar is not None:
            bar.close()
    if stop1 or stop2:
        return {
            "interrupted": True,
            "summary": None,
            "exit_code": 130,
            "iteration": len(r_fit) + len(r_nuc),
        }
    truth = {m: mf_common.truth_summary({**_base(cfg), "m": m}) for m in cfg.observations}
    summary = {
        "wall_seconds_this_session": time.perf_counter() - start,
        "fits": [r_fit[u.name] for u in fits],
        "nuclear": [r_nuc[u.name] for u in nucl],
        "ground_truth": {
            "nuclear_norm": truth[cfg.observations[0]]["nuclear_norm"],
            "effective_rank": truth[cfg.observations[0]]["effective_rank"],
        },
    }
    write_json(run_dir / SUMMARY, summary)
    plot(run_dir)
    return {"interrupted": False, "summary": summary, "exit_code": 0}


def summary_text(summary: dict) -> str:
    lines = []
    for f in summary["fits"]:
        lines.append(
            f"depth {f['depth']} init {f['init_scale']:g} m {f['m']}: "
            f"test MSE {f['test_mse']:.3g}, "
            f"nuclear norm {f['nuclear_norm']:.4g}, effective rank {f['effective_rank']:.3g} "
            f"({f['status']}, {f['iterations']} iterations)"
        )
    for n in summary["nuclear"]:
        lines.append(
            f"nuclear-norm minimization m {n['m']}: test MSE {n['test_mse']:.3g}, "
            f"nuclear norm {n['nuclear_norm']:.4g}, effective rank {n['effective_rank']:.3g}"
        )
    gt = summary["ground_truth"]
    lines.append(
        f"ground truth: nuclear norm {gt['nuclear_norm']:.4g}, "
        f"effective rank {gt['effective_rank']:.3g}"
    )
    return "\n".join(lines)


def plot(run_dir: Path) -> list[Path]:
    """Per observation count: error, nuclear norm, effective rank vs init scale; error vs m."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    s = read_json(run_dir / SUMMARY)
    cfg = (
        read_json(run_dir / "config.json")["config"] if (run_dir / "config.json").exists() else None
    )
    ms = sorted({f["m"] for f in s["fits"]} & {n["m"] for n in s["nuclear"]})
    main_ms = [m for m in (cfg["observations"] if cfg else ms) if m in ms]
    nuc = {n["m"]: n for n in s["nuclear"]}
    keys = [
        ("test_mse", "test MSE", "log"),
        ("nuclear_norm", "nuclear norm", "linear"),
        ("effective_rank", "effective rank", "linear"),
    ]
    fig, axes = plt.subplots(
        len(main_ms) + 1, 3, figsize=(13, 3.3 * (len(main_ms) + 1)), squeeze=False
    )
    for row, m in enumerate(main_ms):
        for col, (key, label, scale) in enumerate(keys):
            ax = axes[row, col]
            for d in sorted({f["depth"] for f in s["fits"]}):
                pts = sorted(
                    (f["init_scale"], f[key]) for f in s["fits"] if f["m"] == m and f["depth"] == d
                )
                if len(pts) > 1:
                    ax.plot(*zip(*pts), "o-", label=f"depth {d}")
            ax.axhline(nuc[m][key], color="k", ls="--", label="min nuclear norm")
            if key != "test_mse":
                ax.axhline(s["ground_truth"][key], color="gray", ls=":", label="ground truth")
            ax.set_xscale("log")
            ax.set_yscale(scale)
            ax.set_xlabel("init scale")
            ax.set_title(f"{label}, {m} observations")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    ax = axes[len(main_ms), 0]
    sweep_scale = cfg["sweep_init_scale"] if cfg else None
    for d in sorted({f["depth"] for f in s["fits"]}):
        pts = sorted(
            (f["m"], f["test_mse"])
            for f in s["fits"]
            if f["depth"] == d and (sweep_scale is None or f["init_scale"] == sweep_scale)
        )
        if len(pts) > 1:
            ax.plot(*zip(*pts), "o-", label=f"depth {d}")
    ax.plot(
        *zip(*sorted((n["m"], n["test_mse"]) for n in s["nuclear"])),
        "k--o",
        label="min nuclear norm",
    )
    ax.set_yscale("log")
    ax.set_xlabel("observed entries")
    ax.set_title("test MSE against observations")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    for ax in axes[len(main_ms), 1:]:
        ax.axis("off")
    fig.tight_layout()
    path = run_dir / "figure.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
