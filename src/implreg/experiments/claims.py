"""The published-claim machinery: what a preset checks and how a run's summary is measured.

:class:`Claim` (one published statement, its measure and verdict), the key-path
lookup :func:`summary_path` and :func:`find_entry`.  Re-exported by
:mod:`implreg.experiments.base`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

COMPARES = ("at_most", "at_least", "within_abs", "within_rel", "equals")
BUDGETS = ("reduced", "full", "both")


@dataclass(frozen=True)
class Claim:
    """One published statement a preset reproduces, with how to measure it and when it holds.

    ``measure`` turns a finished run's ``summary.json`` (a dict) into one number:
    a callable, or a key path like ``"runs.0.n_learned"`` (dots; integers index
    lists).  It is only called in the driver (:mod:`implreg.report`), never
    pickled.  The verdict compares the measured value ``m`` with ``published``
    (``p``):

    - ``at_most``: ``m <= p + tolerance``; ``at_least``: ``m >= p - tolerance``;
      for a qualitative claim (``published`` None) ``tolerance`` is the bound
      itself (``m <= tolerance``, ``m >= tolerance``);
    - ``within_abs`` / ``equals``: ``|m - p| <= tolerance``;
    - ``within_rel``: ``|m - p| <= tolerance * |p|``.

    ``budget`` says at which report budgets the claim is meaningful
    (``"reduced"``, ``"full"`` or ``"both"``); elsewhere its row reads "not run
    at this budget".  Published values come from the papers (see
    ``REFERENCE.md``): Razin, Yadin & Cohen (ICML 2021), Razin, Maman & Cohen
    (ICML 2022), Arora, Cohen, Hu & Luo (NeurIPS 2019), Razin & Cohen (NeurIPS 2020).
    """

    name: str
    statement: str
    source: str
    published: float | None
    measure: Callable[[Mapping[str, Any]], float] | str
    compare: Literal["at_most", "at_least", "within_abs", "within_rel", "equals"]
    tolerance: float
    budget: Literal["reduced", "full", "both"] = "both"

    def __post_init__(self) -> None:
        if self.compare not in COMPARES:
            raise ValueError(f"claim {self.name}: compare must be one of {COMPARES}")
        if self.budget not in BUDGETS:
            raise ValueError(f"claim {self.name}: budget must be one of {BUDGETS}")
        if not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise ValueError(f"claim {self.name}: tolerance must be finite and >= 0")
        if self.compare == "within_rel" and not self.published:
            raise ValueError(f"claim {self.name}: within_rel needs a nonzero published value")

    def runs_at(self, budget: str) -> bool:
        """Whether the claim is meaningful at a report budget (``tiny`` counts as reduced)."""
        budget = "reduced" if budget == "tiny" else budget
        return self.budget == "both" or self.budget == budget

    def value(self, summary: Mapping[str, Any]) -> float:
        """The measured value from a run's summary (a number; NaN when it is missing)."""
        if callable(self.measure):
            out = self.measure(summary)
        else:
            out = summary_path(summary, self.measure)
        if out is None or isinstance(out, bool):
            return float("nan") if out is None else float(out)
        return float(out)

    def holds(self, measured: float) -> bool:
        """The verdict for a measured value (a non-finite one never holds)."""
        if not math.isfinite(measured):
            return False
        p = 0.0 if self.published is None else float(self.published)
        if self.compare == "at_most":
            return measured <= self.bound()
        if self.compare == "at_least":
            return measured >= self.bound()
        if self.compare == "within_rel":
            return abs(measured - p) <= self.tolerance * abs(p)
        return abs(measured - p) <= self.tolerance

    def bound(self) -> float:
        """The bound of an ``at_most`` / ``at_least`` claim (see the class docstring)."""
        if self.published is None:
            return self.tolerance
        sign = 1.0 if self.compare == "at_most" else -1.0
        return float(self.published) + sign * self.tolerance

    def criterion(self) -> str:
        """The pass condition in words, e.g. ``"<= 0.01"`` or ``"within 2% of 70.71"``."""
        p = 0.0 if self.published is None else float(self.published)
        t = self.tolerance
        if self.compare == "at_most":
            return f"<= {self.bound():.4g}"
        if self.compare == "at_least":
            return f">= {self.bound():.4g}"
        if self.compare == "within_rel":
            return f"within {100 * t:.3g}% of {p:.4g}"
        if self.compare == "equals" and t == 0:
            return f"= {p:.4g}"
        return f"within {t:.3g} of {p:.4g}"


def summary_path(summary: Mapping[str, Any], path: str) -> Any:
    """``summary["runs"][0]["n_learned"]`` from ``"runs.0.n_learned"`` (None when absent)."""
    node: Any = summary
    for part in path.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif (
            isinstance(node, list)
            and part.lstrip("-").isdigit()
            and -len(node) <= int(part) < len(node)
        ):
            node = node[int(part)]
        else:
            return None
    return node


def find_entry(entries: Sequence[Mapping[str, Any]], **match: Any) -> Mapping[str, Any]:
    """The first entry of a summary list whose keys equal ``match`` (KeyError if none)."""
    for e in entries:
        if all(e.get(k) == v for k, v in match.items()):
            return e
    raise KeyError(f"no run with {match}")
