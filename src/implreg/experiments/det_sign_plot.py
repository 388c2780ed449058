"""The figure of the determinant-sign experiment (:mod:`implreg.experiments.mf_det_sign`):
|W_11| and log10|det(W_e)| against the train loss.  Razin & Cohen, "Implicit Regularization in
Deep Learning May Not Be Explainable by Norms" (NeurIPS 2020), Section 3."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from implreg.experiments.base import GridExperiment
from implreg.runs import pyplot, save_figure


def plot_det_sign(exp: GridExperiment, run_dir: Path) -> list[Path]:
    """The figure of :meth:`.DetSign.plot` from the units of ``exp`` in ``run_dir``."""
    plt = pyplot()

    run_dir = Path(run_dir)
    _, units, results = exp.unit_results(run_dir)
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
