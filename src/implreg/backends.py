"""Where the units of a grid run: in this process, a local process pool, or a Ray cluster.

A backend maps a module-level function over picklable items and hands every
result back to the driver as it arrives (``on_result(i, value)``); the driver
(:mod:`implreg.sweep`) writes the unit files, so workers need no shared
filesystem.  Every backend

- runs at most ``workers`` items at once, each with ``threads`` torch threads
  (the same on every backend, so the same grid gives the same numbers);
- stops submitting when ``interrupt.is_set()``, cancels what is in flight and
  returns ``True`` (interrupted); finished results have been handed over;
- leaves no worker behind when it returns or raises.

``local`` (the default) needs nothing installed; ``ray`` runs plain Ray remote
tasks (``pip install 'implreg[ray]'``; :mod:`implreg.ray_backend`, imported
only when asked for).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol

BACKENDS = ("local", "ray")


class InterruptFlag(Protocol):
    def is_set(self) -> bool: ...


def default_threads(workers: int) -> int:
    """Torch threads per worker: the machine's cores shared between the workers."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def call_with_threads(fn: Callable[[Any], Any], item: Any, threads: int) -> Any:
    """Run ``fn(item)`` with ``threads`` torch threads (the unit of work on every backend)."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return fn(item)


def _pool_init() -> None:
    """Pool workers leave Ctrl-C to the driver (which terminates them with SIGTERM) and die
    with the driver, even when it is killed with SIGKILL (Linux ``PR_SET_PDEATHSIG``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1


def map_local(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    *,
    workers: int,
    threads: int,
    on_result: Callable[[int, Any], None],
    interrupt: InterruptFlag | None = None,
    poll: float = 0.1,
) -> bool:
    """A local process pool (``fork``); ``workers <= 1`` would be better run in-process.

    On an interrupt the pool is terminated at once: the items in flight are
    lost (their units are redone on resume), finished ones are kept.
    """
    if not items:
        return False
    ctx = multiprocessing.get_context("fork")
    pool = ctx.Pool(processes=min(workers, len(items)), initializer=_pool_init)
    try:
        queue = list(enumerate(items))
        pending: dict[int, Any] = {}
        while queue or pending:
            if interrupt is not None and interrupt.is_set():
                return True
            while queue and len(pending) < workers:
                i, item = queue.pop(0)
                pending[i] = pool.apply_async(call_with_threads, (fn, item, threads))
            for i in [i for i, res in pending.items() if res.ready()]:
                on_result(i, pending.pop(i).get())  # re-raises a worker's exception
            if pending and not any(res.ready() for res in pending.values()):
                next(iter(pending.values())).wait(poll)
        return False
    finally:
        pool.terminate()
        pool.join()


def map_items(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    *,
    backend: str = "local",
    workers: int,
    threads: int | None = None,
    on_result: Callable[[int, Any], None],
    interrupt: InterruptFlag | None = None,
) -> bool:
    """Run ``fn`` over ``items`` on ``backend``; returns whether it was interrupted."""
    threads = threads if threads is not None else default_threads(workers)
    if backend == "local":
        return map_local(
            fn, items, workers=workers, threads=threads, on_result=on_result, interrupt=interrupt
        )
    if backend == "ray":
        from implreg.ray_backend import map_ray

        return map_ray(
            fn, items, workers=workers, threads=threads, on_result=on_result, interrupt=interrupt
        )
    raise ValueError(f"unknown backend {backend!r}; use {' or '.join(BACKENDS)}")
