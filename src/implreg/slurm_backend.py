"""The ``slurm`` backend of :func:`implreg.backends.map_items`: one submitit job array per grid.

Every item becomes one task of a SLURM job array submitted with submitit
(``pip install 'implreg[slurm]'``), each task running
:func:`implreg.backends.call_with_threads` with ``cpus_per_task=threads``; the
array runs at most ``workers`` tasks at once (``slurm_array_parallelism``).
The driver polls the jobs and hands every result to ``on_result`` as it
arrives (the driver writes the unit files).  submitit itself exchanges the
pickled tasks and results through a folder, so the cluster's nodes must see
it: ``$IMPLREG_SLURM_FOLDER`` (default ``implreg-submitit`` in the current
folder; the job logs are there too).

Cluster settings (partition, time limit, memory, account ...) come from
``$IMPLREG_SLURM`` as a JSON object of submitit executor parameters, e.g.
``{"slurm_partition": "cpu", "timeout_min": 600, "mem_gb": 16}``.
``$IMPLREG_SLURM_CLUSTER`` chooses submitit's executor (``slurm``, or ``local``
to run the same jobs as local processes: how the tests exercise this backend
on machines without SLURM).  An interrupt cancels every job not yet finished
(``scancel``); a failed job is an error naming its log.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from implreg.backends import InterruptFlag, call_with_threads

SUBMITIT_MISSING = "the slurm backend needs submitit: pip install 'implreg[slurm]'"


def _executor(workers: int, threads: int):
    try:
        import submitit
    except ImportError as err:
        raise ValueError(SUBMITIT_MISSING) from err
    folder = Path(os.environ.get("IMPLREG_SLURM_FOLDER") or "implreg-submitit")
    cluster = os.environ.get("IMPLREG_SLURM_CLUSTER") or None
    try:
        extra = json.loads(os.environ.get("IMPLREG_SLURM") or "{}")
    except ValueError:
        raise ValueError("$IMPLREG_SLURM must be a JSON object of submitit parameters") from None
    if not isinstance(extra, dict):
        raise ValueError("$IMPLREG_SLURM must be a JSON object of submitit parameters")
    ex = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster)
    ex.update_parameters(
        cpus_per_task=threads, slurm_array_parallelism=workers, name="implreg", **extra
    )
    return ex


def map_slurm(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    *,
    workers: int,
    threads: int,
    on_result: Callable[[int, Any], None],
    interrupt: InterruptFlag | None = None,
    poll: float = 1.0,
) -> bool:
    """Run ``fn`` over ``items`` as one job array; returns whether it was interrupted."""
    if not items:
        return False
    ex = _executor(workers, threads)
    n = len(items)
    jobs = ex.map_array(call_with_threads, [fn] * n, list(items), [threads] * n)
    pending = dict(enumerate(jobs))
    try:
        while pending:
            if interrupt is not None and interrupt.is_set():
                return True
            finished = [i for i, job in pending.items() if job.done()]
            for i in finished:
                job = pending.pop(i)
                try:
                    value = job.result()
                except Exception as exc:
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc)
                    raise RuntimeError(
                        f"slurm job {job.job_id} (unit {i}) failed: {first}; "
                        f"its log is {job.paths.stderr}"
                    ) from exc
                on_result(i, value)
            if pending and not finished:
                time.sleep(poll)
        return False
    finally:
        _cancel(list(pending.values()))


def _cancel(jobs: list, wait: float = 10.0) -> None:
    """Cancel ``jobs`` and wait (at most ``wait`` seconds) until the scheduler says they ended."""
    for job in jobs:
        try:
            job.cancel(check=False)
        except Exception:  # noqa: BLE001 - best effort: the job may have just ended
            pass
    deadline = time.monotonic() + wait
    while jobs and time.monotonic() < deadline:
        jobs = [job for job in jobs if not job.done()]
        if jobs:
            time.sleep(0.1)
