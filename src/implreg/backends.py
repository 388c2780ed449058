"""Where the units of a grid run: in this process, a local process pool, or a Ray cluster.

A backend maps a module-level function over picklable items and hands every
result back to the driver as it arrives (``on_result(i, value)``); the driver
(:mod:`implreg.sweep`) writes the unit files, so workers need no shared
filesystem.  Every backend

- runs at most ``workers`` items at once, each with ``threads`` torch threads
  (the same on every backend, so the same grid gives the same numbers);
- stops submitting when ``interrupt.is_set()``, cancels what is in flight and
  returns ``True`` (interrupted); finished results have been handed over;
- leaves no worker behind when it returns or raises, and a worker that dies is
  an error, not a hang.

``local`` (the default) needs nothing installed; ``ray`` runs plain Ray remote
tasks (``pip install 'implreg[ray]'``; :mod:`implreg.ray_backend`), ``slurm``
one submitit job array per grid (``pip install 'implreg[slurm]'``;
:mod:`implreg.slurm_backend`), each imported only when asked for.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Sequence
from multiprocessing import connection as mp_connection
from typing import Any, Protocol

BACKENDS = ("local", "ray", "slurm")


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


def _worker_init(parent: int | None = None) -> None:
    """Workers leave Ctrl-C to the driver (which kills them) and die with the driver, even
    when it is killed with SIGKILL (Linux ``PR_SET_PDEATHSIG``).

    ``parent`` is the pid the worker was forked from, where known: a parent that died
    between the fork and the ``prctl`` call sends no signal (man 2 prctl), so a worker
    whose parent is no longer ``parent`` by then exits at once instead of running on.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent(signal.SIGKILL, parent)


def die_with_parent(signum: int, parent: int | None = None) -> None:
    """Have the OS send ``signum`` to this process when its parent dies (Linux ``prctl``).

    ``parent`` is the pid the process was forked from, where known: a parent that died
    before the ``prctl`` call sends nothing (man 2 prctl), so then the process exits at once
    with :data:`ORPHANED`.  Elsewhere than Linux it does nothing.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signum)  # PR_SET_PDEATHSIG = 1
    if parent is not None and os.getppid() != parent:
        os._exit(ORPHANED)


ORPHANED = 3  # exit status of a worker that found its driver gone before it started


def _child(conn, fn: Callable[[Any], Any], item: Any, threads: int, parent: int | None) -> None:
    """One item in a forked worker: send ``("ok", value)`` or ``("error", exception)``."""
    _worker_init(parent)
    try:
        reply = ("ok", call_with_threads(fn, item, threads))
    except BaseException as exc:  # noqa: BLE001 - handed to the driver, which re-raises it
        reply = ("error", exc)
    try:
        conn.send(reply)
    except Exception as exc:  # an unpicklable result or exception
        conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))
    conn.close()


def start_method(threads: int) -> str:
    """How :func:`map_local` starts a worker: ``"fork"`` where that is safe, else ``"forkserver"``.

    A forked child inherits the driver's state but not its threads, and two kinds of
    state do not survive that.  GNU OpenMP's thread pool: a driver that has run a
    two-thread region forks a child whose first region on more than one thread waits
    forever (measured: a 600 x 600 product in a two-thread worker after the driver's
    two-thread products never returned; on one thread it ran), so a worker that gets
    more than one thread starts from a fork server, a fresh process that has computed
    nothing.  And Ray's gRPC threads, which outlive ``ray.shutdown``: a worker forked
    after Ray ran in the driver crashed (SIGSEGV), so then every worker starts from the
    server.  Forking stays the default otherwise: it costs nothing and takes closures.
    """
    after_ray = any(name in sys.modules for name in ("ray", "grpc"))
    return "forkserver" if after_ray or threads > 1 else "fork"


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
    """Local worker processes, one per item (``workers`` at a time; :func:`start_method`).

    A worker that dies (a crash, the out-of-memory killer) is an error naming
    its exit code, never a hang.  On an interrupt or an error the workers in
    flight are killed: their items are lost (redone on resume), finished ones
    have been handed over.
    """
    import torch  # noqa: F401  (forking before torch is imported can crash the children)

    if not items:
        return False
    method = start_method(threads)
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["torch"])
    # a forked worker's parent is this process; a forkserver's child has the server as parent
    parent = os.getpid() if method == "fork" else None
    queue = list(enumerate(items))
    running: dict[Any, tuple[int, Any]] = {}  # connection -> (item index, process)
    try:
        while queue or running:
            if interrupt is not None and interrupt.is_set():
                return True
            while queue and len(running) < workers:
                i, item = queue.pop(0)
                here, there = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=_child, args=(there, fn, item, threads, parent), daemon=True
                )
                proc.start()
                there.close()
                running[here] = (i, proc)
            for conn in mp_connection.wait(list(running), timeout=poll):
                i, proc = running.pop(conn)
                try:
                    kind, value = conn.recv()
                except EOFError:
                    proc.join()
                    raise RuntimeError(
                        f"the worker of unit {i} died (exit code {proc.exitcode})"
                    ) from None
                finally:
                    conn.close()
                proc.join()
                if kind == "error":
                    raise value
                on_result(i, value)
        return False
    finally:
        for conn, (_, proc) in running.items():
            proc.kill()
            proc.join()
            conn.close()


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
        mapper = map_local
    elif backend == "ray":
        from implreg.ray_backend import map_ray as mapper
    elif backend == "slurm":
        from implreg.slurm_backend import map_slurm as mapper
    else:
        raise ValueError(f"unknown backend {backend!r}; use {' or '.join(BACKENDS)}")
    return mapper(
        fn, items, workers=workers, threads=threads, on_result=on_result, interrupt=interrupt
    )
