"""Summary and figure helpers of the batched-dynamics runner (:mod:`implreg.experiments.dynamics`).

Which components left zero and when (:func:`learned_summary`, :func:`learned_now`,
:func:`learned_text`), the records of one run (:func:`trajectories`) and the
top-k trajectory figure (:func:`topk_figure`).  Re-exported by
:mod:`implreg.experiments.dynamics`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from implreg.metrics import learned_components, top_components
from implreg.runs import pyplot, save_figure


def learned_summary(
    its: np.ndarray, traj: np.ndarray, *, fraction: float, top_k: int, status: str = ""
) -> dict:
    """Which components of one run left zero and when; ``traj`` is ``(T, K)`` by identity.

    A run that diverged (``status``) has no learned components to count: its
    entries are None, so no reader mistakes a blow-up for low rank."""
    if status in ("diverged", "non_finite"):
        return {
            "n_learned": None,
            "learned": [],
            "next_largest_over_smallest_learned": None,
            "top_final_norms": [],
        }
    learned = learned_components(its, traj, fraction=fraction)
    final_sorted = np.sort(np.nan_to_num(traj[-1], nan=0.0))[::-1]
    n = len(learned)
    ratio = (
        float(final_sorted[n] / final_sorted[n - 1])
        if 0 < n < final_sorted.size and final_sorted[n - 1] > 0
        else None
    )
    return {
        "n_learned": n,
        "learned": learned,
        "next_largest_over_smallest_learned": ratio,
        "top_final_norms": [float(x) for x in final_sorted[:top_k]],
    }


def learned_now(traj: np.ndarray, start: np.ndarray, fraction: float) -> dict:
    """Live count for the progress bar, by the summary's rule on the current values ``(B, K)``."""
    counts = []
    for b, norms in enumerate(traj):
        if not np.isfinite(norms).all():
            counts.append("-")  # this run has stopped
            continue
        threshold = max(fraction * float(norms.max()), 10.0 * float(start[b]))
        counts.append(str(int((norms > threshold).sum())))
    return {"learned": "/".join(counts)}


def learned_text(learned: list[dict], limit: int = 10) -> str:
    when = ", ".join(str(c["left_zero_at"]) for c in learned[:limit])
    return when + (", ..." if len(learned) > limit else "")


def topk_figure(
    run_dir: Path,
    series: Sequence[tuple[str, np.ndarray, np.ndarray]],
    *,
    top_k: int,
    what: str,
    scalar: tuple[str, str, Sequence[tuple[str, np.ndarray, np.ndarray]]] | None = None,
    singles: Sequence[str] | None = None,
    xlabel: str = "iteration",
) -> list[Path]:
    """``figure.png``: per run the ``top_k`` trajectories (by final value), and one scalar panel.

    ``series`` holds ``(label, iterations, values (T, K))`` per run; ``scalar``
    is ``(file stem, y label, [(label, iterations, values)])`` drawn on a log
    scale; ``singles`` names a separate file per run panel (and the scalar's).
    """
    plt = pyplot()

    run_dir = Path(run_dir)
    n = len(series) + (scalar is not None)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    paths = []

    def save(f, name: str) -> None:
        paths.append(save_figure(f, run_dir / name))

    for i, (label, its, traj) in enumerate(series):
        sel = top_components(traj, top_k) if len(its) else []  # none: diverged at once
        single = plt.subplots(figsize=(4.8, 3.6)) if singles else None
        for a in [axes[0, i]] + ([single[1]] if single else []):
            if not len(its):
                a.set_title(f"{label}: diverged, no finite record")
                a.text(0.5, 0.5, "diverged", ha="center", va="center", transform=a.transAxes)
                continue
            for r in sel:
                a.plot(its, traj[:, r], lw=1.2)
            a.set_title(f"{label}: top {len(sel)} {what}s")
            a.set_xlabel(xlabel)
            a.set_ylabel(what)
            a.grid(alpha=0.3)
        if single:
            save(single[0], singles[i])
    if scalar is not None:
        stem, ylabel, lines = scalar
        single = plt.subplots(figsize=(4.8, 3.6)) if singles else None
        for a in [axes[0, -1]] + ([single[1]] if single else []):
            for label, its, vals in lines:
                a.plot(its, vals, label=label)
            a.set_yscale("log")
            a.set_title(stem.replace("_", " "))
            a.set_xlabel(xlabel)
            a.set_ylabel(ylabel)
            a.legend()
            a.grid(alpha=0.3)
        if single:
            save(single[0], f"{stem}.png")
    save(fig, "figure.png")
    return paths


def trajectories(its: np.ndarray, norms: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Records of run ``b`` up to its stop (later records of a stopped run are NaN)."""
    valid = np.isfinite(norms[:, b, :]).all(axis=1)
    return its[valid], norms[valid, b, :]


def add_step_record(runs: list[dict], optimizer_state: Any) -> None:
    """Add each run's elapsed gradient-flow time ``sum_t eta_t`` (``flow_time``) and the
    step size of its last step (``last_step_size``) from a GD-type optimizer's state.

    For the adaptive step (Razin et al. 2021, App. B.2) ``last_step_size`` tells whether
    a run was still on the plateau (``lr / eps``) or limited by the curvature of what it
    had learned: after an escape the normalized step settles where the learned component
    is at the edge of stability, and the flow time of the components still at zero then
    advances by that step per iteration, not by ``lr / eps``.
    """
    if not isinstance(optimizer_state, dict):
        return
    times, steps = optimizer_state.get("time"), optimizer_state.get("last_eta")
    for b, run in enumerate(runs):
        if isinstance(times, list) and b < len(times):
            run["flow_time"] = float(times[b])
        if isinstance(steps, list) and b < len(steps):
            run["last_step_size"] = float(steps[b])
