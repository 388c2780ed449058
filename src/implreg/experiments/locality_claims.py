"""Measures of the claims the locality presets declare (checked by ``implreg report``):
the test-accuracy gain of the input-gradient penalty over lambda 0 (Razin, Maman & Cohen
2022, Section 6; Razin 2022 blog, last figure)."""

from __future__ import annotations


def gain_points(where: str):
    """The measure: test-accuracy gain (points) of the largest lambda over lambda 0 at the
    ``"longest"`` or ``"shortest"`` distance (the summary's ``effect``)."""

    def measure(summary: dict) -> float:
        return float(summary["effect"][where]["gain_points"])

    return measure


def unregularized_at_longest(summary: dict) -> float:
    """Test accuracy (%, mean over seeds) without the penalty at the longest distance."""
    d = summary["effect"]["longest"]
    key = next(k for k in d if k not in ("lam", "gain_points"))
    row = next(r for r in summary["table"] if r["lam"] == 0.0 and r[key] == d[key])
    return 100.0 * float(row["test_acc"]["mean"])
