"""Grids of independent runs ("units"): a local process pool, resumable, interruptible.

Each unit is a name and a JSON-able parameter dict; a worker function turns
it into a JSON-able result, written atomically to ``units/<name>.json`` in
the run folder.  A unit whose file exists is never recomputed, so an
interrupted grid resumes where it stopped.  Workers ignore SIGINT / SIGTERM:
the main process stops submitting, lets running units finish, and returns.
A cluster backend (Ray) can implement the same ``run_units`` contract.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from implreg.runs import write_json

UNITS = "units"


@dataclass(frozen=True)
class Unit:
    """One run of a grid: a file-safe ``name`` and its parameters."""

    name: str
    params: dict[str, Any]


def _quiet_worker(threads: int) -> None:
    """Pool initializer: signals are the main process's; share the cores between workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import torch

    torch.set_num_threads(threads)


def unit_path(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / UNITS / f"{name}.json"


def load_results(run_dir: Path, units: Sequence[Unit]) -> dict[str, Any]:
    """Results of the finished units among ``units``."""
    out = {}
    for u in units:
        p = unit_path(run_dir, u.name)
        if p.exists():
            out[u.name] = json.loads(p.read_text())
    return out


def run_units(
    units: Sequence[Unit],
    worker: Callable[[dict[str, Any]], Any],
    run_dir: Path,
    *,
    workers: int | None = None,
    interrupt=None,
    on_done: Callable[[Unit, Any], None] | None = None,
) -> tuple[dict[str, Any], bool]:
    """Run the unfinished ``units`` with ``worker`` over a local process pool.

    ``worker`` must be a module-level function (it is pickled).  Returns the
    results of all finished units and whether the grid was interrupted.
    ``workers=1`` runs in-process (no pool).
    """
    (Path(run_dir) / UNITS).mkdir(parents=True, exist_ok=True)
    results = load_results(run_dir, units)
    todo = [u for u in units if u.name not in results]
    workers = workers if workers is not None else min(len(todo), os.cpu_count() or 1)

    def finish(u: Unit, res: Any) -> None:
        write_json(unit_path(run_dir, u.name), res)
        results[u.name] = res
        if on_done is not None:
            on_done(u, res)

    if not todo:
        return results, False
    if workers <= 1:
        for u in todo:
            if interrupt is not None and interrupt.is_set():
                return results, True
            finish(u, worker(u.params))
        return results, False
    interrupted = False
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(
        max_workers=workers, initializer=_quiet_worker, initargs=(threads,)
    ) as pool:
        pending = {}
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < workers and not interrupted:
                u = queue.pop(0)
                pending[pool.submit(worker, u.params)] = u
            if not pending:
                break
            done, _ = wait(list(pending), timeout=0.2, return_when=FIRST_COMPLETED)
            for fut in done:
                finish(pending.pop(fut), fut.result())
            if interrupt is not None and interrupt.is_set() and not interrupted:
                interrupted = True
                queue.clear()
    return results, interrupted


def grid_outcome(
    run_dir: Path,
    grid: Sequence[Unit],
    results: dict[str, Any],
    interrupted: bool,
    *,
    started: float,
    bulky: str,
    plot: Callable[[Path], object],
) -> dict:
    """The outcome of a one-grid experiment: summary (without each unit's ``bulky`` key), figure.

    Returns ``{"interrupted", "summary", "exit_code"[, "iteration"]}`` as the CLI expects.
    """
    import time

    from implreg.runs import SUMMARY

    if interrupted:
        return {"interrupted": True, "summary": None, "exit_code": 130, "iteration": len(results)}
    summary = {
        "wall_seconds_this_session": time.perf_counter() - started,
        "runs": [{k: v for k, v in results[u.name].items() if k != bulky} for u in grid],
    }
    write_json(Path(run_dir) / SUMMARY, summary)
    plot(Path(run_dir))
    return {"interrupted": False, "summary": summary, "exit_code": 0}
