"""How many torch threads a training step gets: a deterministic choice by problem size.

Measured on the project's 2-core machine (``python bench/bench_threads.py``,
``--sweep`` for larger problems; the table is in its docstring).  The steps
here are many short parallel regions (batched GEMMs of a few hundred rows,
elementwise ops on chunks of observations) and each region waits for its
slowest thread.  Beside a busy process a thread is often descheduled, and
with OpenMP's default wait policy its partner spins for milliseconds at the
barrier: the Figure 3 step on two threads fell to 1-4% of its one-thread
speed beside one busy process, while one thread kept 72-98% of its quiet
speed (88-98% in the three final runs).  A second thread pays only for large
matrix products (1.5x with no competitor from 4.8e9 flops per step, none at
9.6e8 or below) and never for the gather engine's elementwise work.  So a
step runs on one thread unless its matrix-product work is at least
``2 * MIN_WORK_PER_THREAD`` (4e9 flops); no preset comes near (Figure 3: 1.8e8).

The choice depends only on the configuration and the machine's core count,
never on timing or the current load: the thread count changes the GEMM
summation order, hence the numbers, and a resumed run must continue
bit-identically.  ``--threads N`` (``requested``) overrides it.

Where two threads are chosen, ``OMP_WAIT_POLICY=PASSIVE`` (idle threads
sleep instead of spinning; :func:`prefer_passive_wait`, before torch is
imported) is what keeps a busy neighbour from stalling them: the 4.8e9-flop
step beside one busy process ran at 0.96x of one thread with it and 0.36x
without.  It changes no numbers.  This module imports torch only when a
thread count is set.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

MIN_WORK_PER_THREAD = 2e9
"""Matrix-product flops per step each thread must get before a step uses more than one thread.

A step runs on ``min(cores, flops // MIN_WORK_PER_THREAD)`` threads, at least one:
on two cores, one thread below 4e9 flops per step and two from there on.  Measured by
``bench/bench_threads.py --sweep`` (see the module docstring).
"""


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def choose_threads(
    flops_per_step: float, requested: int | None = None, cores: int | None = None
) -> int:
    """Torch threads for a step of ``flops_per_step`` matrix-product flops.

    ``requested`` (a ``--threads`` option, >= 1) wins.  Otherwise one thread
    for every :data:`MIN_WORK_PER_THREAD` of work, at least one and at most
    ``cores`` (default :func:`available_cores`).  A pure function of its
    arguments: the same configuration on the same machine always gets the
    same count.
    """
    if requested is not None:
        if isinstance(requested, bool) or int(requested) != requested or requested < 1:
            raise ValueError(f"threads must be a positive integer, got {requested!r}")
        return int(requested)
    cores = available_cores() if cores is None else int(cores)
    if cores < 1:
        raise ValueError(f"cores must be >= 1, got {cores}")
    work = float(flops_per_step)
    if math.isnan(work) or work < 0:
        raise ValueError(f"flops_per_step must be >= 0, got {flops_per_step!r}")
    if math.isinf(work):
        return cores
    return max(1, min(cores, int(work // MIN_WORK_PER_THREAD)))


def cp_step_flops(
    dims: Sequence[int],
    rank: int,
    num_observations: int,
    batch: int = 1,
    *,
    task: str = "completion",
    measurement: str = "gaussian",
    method: str = "auto",
) -> float:
    """Matrix-product flops of one CP training step (loss, gradient, update) of ``batch`` runs.

    With ``P = prod(dims)``, ``R = rank``, ``m = num_observations``, ``B = batch``:

    - dense completion (:class:`~implreg.factorizations.cp_engine.DenseCompletion`):
      three ``P1 x R x P2`` GEMMs, ``6 B P R``;
    - sampled completion (:class:`~implreg.factorizations.cp_engine.SampledCompletion`):
      the same products at the ``m`` observed entries only, ``6 B m R``;
    - dense Gaussian sensing: the same plus ``4 B m P`` (predictions and ``X^T dpred``);
    - gather completion: only the contractions of its Khatri-Rao tables'
      backward, ``2 B R sum_g |g| P_g`` over mode groups ``g`` of ``P_g <= 1024``
      rows; its gathers, products and scatters are elementwise and are not
      counted (measured: a second thread gains nothing on them);
    - rank-one sensing: the projections and their transposes, ``4 B m R sum_n d_n``.

    ``method="auto"`` resolves as :func:`~implreg.factorizations.cp_engine.completion_engine`
    does.  Elementwise work (Khatri-Rao products, the optimizer update) is left out.
    """
    from implreg.factorizations.cp_engine import choose_completion_method, group_modes

    dims = [int(d) for d in dims]
    size = math.prod(dims)
    b, r, m = int(batch), int(rank), int(num_observations)
    if task == "completion":
        if method == "auto":
            method = choose_completion_method(dims, m)
        if method == "dense":
            return 6.0 * b * size * r
        if method == "sampled":
            return 6.0 * b * m * r
        if method != "gather":
            raise ValueError(f"unknown completion method {method!r}")
        groups = group_modes(dims, 1024)
        return 2.0 * b * r * sum(len(g) * math.prod(dims[n] for n in g) for g in groups)
    if task != "sensing":
        raise ValueError(f"unknown task {task!r}")
    if measurement == "gaussian":
        return 6.0 * b * size * r + 4.0 * b * m * size
    if measurement == "rank_one":
        return 4.0 * b * m * r * sum(dims)
    raise ValueError(f"unknown measurement {measurement!r}")


def mf_step_flops(
    shape: Sequence[int],
    depth: int,
    num_observations: int,
    batch: int = 1,
    *,
    widths: Sequence[int] | None = None,
    task: str = "completion",
) -> float:
    """Matrix-product flops of one deep matrix factorization step of ``batch`` runs.

    With sizes ``d_0 = n_cols, d_1, ..., d_N = n_rows`` (hidden widths default to
    ``min(shape)``): the prefix products, the running product from the top and
    the layer gradients are three GEMMs per layer above the first,
    ``6 B d_0 sum_{j=1}^{N-1} d_j d_{j+1}``; sensing adds ``4 B m n_rows n_cols``.
    """
    n_rows, n_cols = (int(s) for s in shape)
    depth = int(depth)
    hidden = [min(n_rows, n_cols)] * (depth - 1) if widths is None else [int(w) for w in widths]
    sizes = [n_cols, *hidden, n_rows]
    b = int(batch)
    flops = 6.0 * b * n_cols * sum(sizes[j] * sizes[j + 1] for j in range(1, depth))
    if task == "sensing":
        flops += 4.0 * b * int(num_observations) * n_rows * n_cols
    elif task != "completion":
        raise ValueError(f"unknown task {task!r}")
    return flops


def config_step_flops(cfg: Any) -> float | None:
    """Step work of a CP or matrix dynamics configuration, or ``None`` when unknown.

    CP configurations (``dims``, ``rank``, ``num_observations``, ``init_stds``)
    count all init scales as one batch; matrix configurations (``shape``,
    ``depths`` or ``depth``, ``num_observations`` or ``m``: the dynamics configs and
    their grid units) count one run of the deepest factorization.
    """
    own = getattr(cfg, "step_flops", None)
    if callable(own):  # a configuration that knows its step's work
        return float(own())
    if all(hasattr(cfg, k) for k in ("dims", "rank", "num_observations")):
        return cp_step_flops(
            cfg.dims,
            cfg.rank,
            cfg.num_observations,
            len(getattr(cfg, "init_stds", (None,))),
            task=getattr(cfg, "task", "completion"),
            measurement=getattr(cfg, "measurement", "gaussian"),
            method=getattr(cfg, "method", "auto"),
        )
    m = getattr(cfg, "num_observations", getattr(cfg, "m", None))
    if hasattr(cfg, "shape") and m is not None:
        depths = getattr(cfg, "depths", None) or (getattr(cfg, "depth", 1),)
        return mf_step_flops(cfg.shape, max(depths), m, task=getattr(cfg, "task", "completion"))
    return None


def threads_for_config(cfg: Any, requested: int | None = None, cores: int | None = None) -> int:
    """:func:`choose_threads` for a configuration; one thread when its work is unknown."""
    if requested is not None:
        return choose_threads(0.0, requested, cores)
    flops = config_step_flops(cfg)
    return choose_threads(0.0 if flops is None else flops, None, cores)


@contextmanager
def use_threads(n: int) -> Iterator[int]:
    """Run the block with ``n`` torch intra-op threads; the previous count is restored after."""
    import torch

    n = choose_threads(0.0, requested=n)  # validates
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def prefer_passive_wait() -> bool:
    """Make idle OpenMP threads sleep instead of spinning, if torch is not loaded yet.

    Sets ``OMP_WAIT_POLICY=PASSIVE`` unless the variable is already set (the
    user's value wins).  OpenMP reads it once, when torch loads it, so this must
    run before the first ``import torch``; returns whether the setting can
    still take effect.  It changes no numbers, only how threads wait.
    """
    if "torch" in sys.modules:
        return False
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return True
