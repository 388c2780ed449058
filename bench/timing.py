"""Shared helpers of the benchmarks (run as scripts: ``python bench/NAME.py``)."""

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


def mnist_one_vs_rest(data_dir, cls: int, dtype):
    """The discretized MNIST training images and the 0/1 targets of ``cls`` as torch tensors,
    or None (after saying so) when ``data_dir`` holds no ``mnist/``."""
    import torch

    from implreg.problems.images import discretize, load_dataset

    if not (data_dir / "mnist").is_dir():
        print(f"skipped: no MNIST under {data_dir} (pass --data-dir)")
        return None
    data = load_dataset("mnist", data_dir)
    x = torch.from_numpy(discretize(data["train"].images))
    y = torch.from_numpy((data["train"].labels == cls).astype(dtype))
    return x, y
