"""Summary statistics of trajectories tracked by component identity: which components left
zero, and when (the incremental learning of Razin, Maman & Cohen 2021, Figure 3).
"""

from __future__ import annotations

import math
import numbers

import numpy as np


def _as_norms(norms) -> np.ndarray:
    arr = np.asarray(norms)
    if arr.ndim != 2:
        raise ValueError(f"norms must be (T, R): records by components, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"norms must hold real numbers, got dtype {arr.dtype}")
    return arr


def _real_arg(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    out = float(value)
    if not math.isfinite(out) or out < 0 or (positive and out == 0):
        kind = "positive" if positive else "non-negative"
        raise ValueError(f"{name} must be a finite {kind} number, got {out}")
    return out


def learned_components(
    iterations: np.ndarray, norms: np.ndarray, *, fraction: float = 0.1, growth: float = 10.0
) -> list[dict]:
    """Components that left zero, in the order they did.

    ``norms`` is ``(T, R)``: one run's component norms over time, columns being
    component identities.  A component counts as learned when its final norm
    exceeds ``fraction`` times the largest final norm and ``growth`` times the
    largest norm at the first record (so that a run in which nothing grew has
    learned nothing); it left zero at the first recorded iteration where its
    norm reached that threshold.  ``iterations`` is ``(T,)``; ``fraction`` lies in
    ``(0, 1]`` and ``growth`` is finite and non-negative.
    """
    norms = _as_norms(norms)
    iterations = np.asarray(iterations)
    if iterations.shape != (norms.shape[0],):
        raise ValueError(
            f"iterations must have shape ({norms.shape[0]},) (one per row of norms), "
            f"got {iterations.shape}"
        )
    fraction = _real_arg("fraction", fraction, positive=True)
    if fraction > 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    growth = _real_arg("growth", growth)
    if norms.shape[0] == 0:
        return []
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
    norms = _as_norms(norms)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an integer, got {type(k).__name__} {k!r}")
    if k < 0:
        raise ValueError(f"k must be non-negative, got {k}")
    if norms.shape[0] == 0:
        raise ValueError("norms must hold at least one record (row), got none")
    final = np.nan_to_num(norms[-1], nan=-np.inf)
    k = min(k, final.shape[0])
    order = np.argsort(-final, kind="stable")
    return order[:k]
