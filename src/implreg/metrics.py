"""Summary statistics of trajectories tracked by component identity: which components left
zero, and when (the incremental learning of Razin, Maman & Cohen 2021, Figure 3).
"""

from __future__ import annotations

import math

import numpy as np


def learned_components(
    iterations: np.ndarray, norms: np.ndarray, *, fraction: float = 0.1, growth: float = 10.0
) -> list[dict]:
    """Components that left zero, in the order they did.

    ``norms`` is ``(T, R)``: one run's component norms over time, columns being
    component identities.  A component counts as learned when its final norm
    exceeds ``fraction`` times the largest final norm and ``growth`` times the
    largest norm at the first record (so that a run in which nothing grew has
    learned nothing); it left zero at the first recorded iteration where its
    norm reached that threshold.
    """
    final = np.nan_to_num(norms[-1], nan=0.0)
    top = float(np.max(final)) if final.size else 0.0
    if not (top > 0 and math.isfinite(top)):
        return []
    start = float(np.nanmax(norms[0])) if norms.shape[0] else 0.0
    threshold = max(fraction * top, growth * start)
    out = []
    for r in np.flatnonzero(final > threshold):
        hit = np.flatnonzero(norms[:, r] >= threshold)
        out.append(
            {
                "component": int(r),
                "final_norm": float(final[r]),
                "left_zero_at": int(iterations[hit[0]]) if hit.size else None,
            }
        )
    out.sort(key=lambda d: d["left_zero_at"] if d["left_zero_at"] is not None else 1 << 62)
    return out


def top_components(norms: np.ndarray, k: int) -> np.ndarray:
    """Identities of the ``k`` components with the largest final norm (``norms`` is ``(T, R)``)."""
    final = np.nan_to_num(norms[-1], nan=-np.inf)
    k = min(k, final.shape[0])
    order = np.argsort(-final, kind="stable")
    return order[:k]
