"""Shared timing helper of the benchmarks (run as scripts: ``python bench/NAME.py``)."""

from __future__ import annotations

import time
from collections.abc import Callable


def rate(step: Callable[[], object], seconds: float, warmup: int = 20) -> float:
    """Calls of ``step`` per second over about ``seconds``, after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        n += 1
    return n / (time.perf_counter() - start)
