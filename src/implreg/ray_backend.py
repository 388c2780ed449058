"""The ``ray`` backend of :func:`implreg.backends.map_items`: plain Ray remote tasks.

Each item runs as one remote task, :func:`implreg.backends.call_with_threads`
with ``num_cpus=threads``; at most ``workers`` tasks are in flight and the
driver hands every result to ``on_result`` as it arrives (the driver writes the
files, so the workers need no shared filesystem).  The contract is the one of
:mod:`implreg.backends`: an interrupt stops submitting, cancels what is in
flight and returns ``True``; a worker's exception is re-raised in the driver;
nothing is left running either way.

Ray is started here only when it is not initialized already:

- ``RAY_ADDRESS`` set: connect to that cluster, and disconnect when done (the
  cluster keeps running);
- otherwise: start a local Ray (all the machine's cores, no dashboard, quiet)
  and shut it down when done, on errors and interrupts too;
- Ray initialized by the caller: use it and leave it initialized.

Ray's usage statistics are switched off (``RAY_USAGE_STATS_ENABLED=0``) and so
is replicating a ``uv run`` environment on the workers: nothing is downloaded.
``fn`` must be a module-level function of a module the workers can import
(``implreg`` itself, installed where the workers run).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from implreg.backends import InterruptFlag, call_with_threads
from implreg.reaper import Reaper, start_reaper

RAY_MISSING = "the ray backend needs Ray: pip install 'implreg[ray]'"


class RayMissingError(ImportError, ValueError):
    """Ray is not installed (a ``ValueError`` too, so the CLI reports it in one sentence)."""


def _import_ray() -> Any:
    """``import ray`` without usage statistics or ``uv run`` hooks (no network)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    try:
        import ray
    except ImportError as err:
        raise RayMissingError(RAY_MISSING) from err
    return ray


def _init_ray(ray: Any, threads: int) -> Reaper | None:
    """Connect to ``RAY_ADDRESS`` or start a quiet local Ray fitting ``threads``-CPU tasks.

    A local Ray is watched by a :mod:`implreg.reaper` (returned), which kills its
    processes if this driver dies without shutting it down (kill -9).  On a
    cluster, Ray itself ends a job whose driver disconnects."""
    quiet: dict[str, Any] = {
        "log_to_driver": False,
        "configure_logging": True,
        "logging_level": logging.ERROR,
    }
    address = os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        ray.init(address=address, **quiet)
        return None
    # A task needing more CPUs than the node has would wait forever: offer at
    # least ``threads`` (the local pool oversubscribes the same way).
    num_cpus = max(os.cpu_count() or 1, threads)
    reaper = start_reaper()
    try:
        ray.init(address=None, num_cpus=num_cpus, include_dashboard=False, **quiet)
    except BaseException:
        if reaper is not None:
            reaper.stop()
        raise
    return reaper


def _shutdown_ray(ray: Any) -> None:
    """``ray.shutdown()``, waiting for the local processes to exit where Ray can."""
    if "wait_for_processes" in inspect.signature(ray.shutdown).parameters:
        ray.shutdown(wait_for_processes=True)
    else:  # older Ray
        ray.shutdown()


def _original_exception(ray: Any, err: BaseException) -> BaseException:
    """The exception a task raised, unwrapped from Ray's ``RayTaskError`` where possible."""
    cause = getattr(err, "cause", None)
    if isinstance(err, ray.exceptions.RayTaskError) and isinstance(cause, BaseException):
        return cause
    return err


def map_ray(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    *,
    workers: int,
    threads: int,
    on_result: Callable[[int, Any], None],
    interrupt: InterruptFlag | None = None,
    poll: float = 0.15,
) -> bool:
    """Run ``fn`` over ``items`` as Ray tasks; returns whether it was interrupted.

    Parameters
    ----------
    fn
        Module-level function of a module the Ray workers can import.
    items
        Picklable arguments, one task each.
    workers
        Most tasks in flight at once.
    threads
        Torch threads and Ray CPUs (``num_cpus``) of every task.
    on_result
        Called in the driver as ``on_result(i, fn(items[i]))`` as results arrive.
    interrupt
        Polled every ``poll`` seconds; once set, nothing more is submitted, the
        tasks in flight are cancelled and ``True`` is returned.
    poll
        Seconds of every ``ray.wait``.

    Returns
    -------
    bool
        ``True`` when interrupted, ``False`` when every item was handed over.

    Raises
    ------
    RayMissingError
        Ray is not installed (an ``ImportError`` and a ``ValueError``).
    Exception
        The first exception a task raised, as raised there (Ray's
        ``RayTaskError`` is its ``__cause__``), after the cleanup.
    """
    if not items:
        return False
    ray = _import_ray()
    started = not ray.is_initialized()
    reaper = _init_ray(ray, threads) if started else None
    pending: dict[Any, int] = {}
    try:
        task = ray.remote(num_cpus=threads, max_retries=0)(call_with_threads)
        fn_ref = ray.put(fn)
        queue = list(enumerate(items))
        queue.reverse()  # pop() from the end submits in item order
        while queue or pending:
            if interrupt is not None and interrupt.is_set():
                return True
            while queue and len(pending) < workers:
                i, item = queue.pop()
                pending[task.remote(fn_ref, item, threads)] = i
            done, _ = ray.wait(list(pending), num_returns=1, timeout=poll)
            for ref in done:
                i = pending.pop(ref)
                try:
                    value = ray.get(ref)
                except ray.exceptions.RayTaskError as err:
                    raise _original_exception(ray, err) from err
                on_result(i, value)
        return False
    finally:
        try:
            for ref in pending:  # in flight: interrupted, or another task failed
                ray.cancel(ref, force=True)
        finally:
            if started:
                _shutdown_ray(ray)
            if reaper is not None:
                reaper.stop()
