"""Metrics over time: a recorder with a fixed interval, log-spaced early steps and bounded memory.

Also the summary statistics of component-norm trajectories used by the CP
experiments (which components left zero, and when).
"""

from __future__ import annotations

import math

import numpy as np


class Recorder:
    """Record named per-run metrics at iteration 0, log-spaced early steps and every ``log_every``.

    Values are arrays whose first axis indexes the ``B`` runs (``(B,)`` scalars or
    ``(B, K)`` vectors such as all component norms).  When more than
    ``max_records`` records are held, every other periodic record is dropped
    and the interval doubles, so memory stays bounded for runs of any length;
    early and forced records (such as the iteration a run stopped) are kept.
    """

    def __init__(self, *, log_every: int, max_records: int = 4000, early_points: int = 16):
        if log_every < 1 or max_records < 4:
            raise ValueError("log_every must be >= 1 and max_records >= 4")
        self.every = int(log_every)
        self.max_records = int(max_records)
        grid = np.logspace(0, math.log10(max(self.every, 1)), early_points)
        self.early = {0} | {int(x) for x in np.unique(np.round(grid))}
        self.iterations: list[int] = []
        self.forced: list[bool] = []
        self.values: dict[str, list[np.ndarray]] = {}

    def should_log(self, iteration: int) -> bool:
        return iteration % self.every == 0 or iteration in self.early

    def record(
        self, iteration: int, values: dict[str, np.ndarray], *, forced: bool = False
    ) -> None:
        if self.iterations and self.iterations[-1] == iteration:
            return
        self.iterations.append(int(iteration))
        self.forced.append(bool(forced))
        for key, val in values.items():
            self.values.setdefault(key, []).append(np.asarray(val))
        if len(self.iterations) > self.max_records:
            self._thin()

    def _thin(self) -> None:
        every = 2 * self.every
        keep = [
            f or it in self.early or it % every == 0 for it, f in zip(self.iterations, self.forced)
        ]
        self.iterations = [x for x, k in zip(self.iterations, keep) if k]
        self.forced = [x for x, k in zip(self.forced, keep) if k]
        self.values = {
            key: [x for x, k in zip(vals, keep) if k] for key, vals in self.values.items()
        }
        self.every = every

    def arrays(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Iterations ``(T,)`` and each metric stacked to ``(T, B, ...)``."""
        its = np.asarray(self.iterations, dtype=np.int64)
        return its, {k: np.stack(v) for k, v in self.values.items() if v}

    def last(self, key: str) -> np.ndarray | None:
        vals = self.values.get(key)
        return vals[-1] if vals else None

    def state_dict(self) -> dict:
        return {
            "every": self.every,
            "iterations": list(self.iterations),
            "forced": list(self.forced),
            "values": {k: [v.copy() for v in vals] for k, vals in self.values.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.every = state["every"]
        self.iterations = list(state["iterations"])
        self.forced = list(state["forced"])
        self.values = {k: list(v) for k, v in state["values"].items()}


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
