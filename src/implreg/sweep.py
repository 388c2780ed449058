"""One sweep engine: grids of typed units, resumable, interruptible, on any backend.

A unit is a frozen dataclass (picklable, JSON-able through the config
helpers) with a file-safe ``name`` and a method ``execute(should_stop=None)``
returning a JSON-able result (or ``None`` when ``should_stop()`` became true
before it finished).  :func:`run_grid` runs the units whose files are missing
and the driver writes each result atomically to ``units/<name>.json`` together
with the unit's own fields, so

- a finished unit is never recomputed (an interrupted grid resumes where it
  stopped), and a unit file computed with other settings is refused;
- workers need no shared filesystem (a Ray cluster), see :mod:`implreg.backends`;
  a unit that produces files returns them under the key ``FILES`` and the
  driver writes them to ``<run_dir>/<unit name>/`` before the unit file.

With ``workers == 1`` on the local backend units run in this process and can
stop in the middle (``should_stop``); otherwise the backend runs them and an
interrupt cancels the ones in flight.  Data that several units of a worker
share (a dataset, k-means centroids) go through :func:`worker_cache`, which
lives as long as the worker process (in this process: as long as one grid).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any, Protocol

from implreg.backends import InterruptFlag, map_items
from implreg.config import ConfigError, to_mapping
from implreg.runs import atomic_path, write_json
from implreg.threads import use_threads

UNITS = "units"
FILES = "_files"  # a result key: {relative path: bytes} the driver writes under <run>/<unit name>/


class Unit(Protocol):
    """A typed unit of a grid: a frozen dataclass with a name and an ``execute`` method."""

    @property
    def name(self) -> str: ...

    def execute(self, should_stop: Callable[[], bool] | None = None) -> Any: ...


_CACHE: OrderedDict[Hashable, Any] = OrderedDict()
_CACHE_SIZE = 4


def worker_cache(key: Hashable, build: Callable[[], Any]) -> Any:
    """The value of ``build()`` for ``key``, built once per worker process (last 4 kept)."""
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    value = build()
    _CACHE[key] = value
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return value


def clear_worker_cache() -> None:
    _CACHE.clear()


def unit_path(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / UNITS / f"{name}.json"


def _spec(unit: Any) -> dict:
    """A unit's settings as saved beside its result, without its ``transient`` fields (where
    it works, such as a checkpoint folder: moving a run folder does not invalidate it)."""
    skip = set(getattr(type(unit), "transient", ()))
    fields = {k: v for k, v in to_mapping(unit).items() if k not in skip}
    return json.loads(json.dumps({"type": type(unit).__name__, **fields}))


def load_results(run_dir: Path, units: Sequence[Any]) -> dict[str, Any]:
    """Results of the finished units among ``units``, checked against the units' fields."""
    out = {}
    folder = Path(run_dir) / UNITS
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder; the run's unit files cannot be read")
    for u in units:
        p = unit_path(run_dir, u.name)
        if not p.exists():
            continue
        try:
            data = json.loads(p.read_text())
        except (ValueError, OSError):
            raise ConfigError(
                f"{p} is not a readable unit file; delete it to redo the unit"
            ) from None
        if not isinstance(data, dict) or "unit" not in data or "result" not in data:
            raise ConfigError(f"{p} holds no unit settings (written by an earlier implreg?)")
        if not isinstance(data["result"], dict):
            raise ConfigError(f"{p} holds no result; delete it to redo the unit")
        if data["unit"] != _spec(u):
            raise ConfigError(
                f"{p} was computed with other settings than this configuration asks for"
            )
        out[u.name] = data["result"]
    return out


def execute(unit: Any) -> Any:
    """The module-level task every backend runs: ``unit.execute()``."""
    return unit.execute()


def run_grid(
    units: Sequence[Any],
    run_dir: Path,
    *,
    workers: int = 1,
    backend: str = "local",
    interrupt: InterruptFlag | None = None,
    on_done: Callable[[Any, Any], None] | None = None,
    threads: int | None = None,
) -> tuple[dict[str, Any], bool]:
    """Run the unfinished ``units``; returns all finished results and whether interrupted.

    ``threads``: torch threads of every unit (default: the cores shared between
    the workers; in this process, torch's own count)."""
    names = [u.name for u in units]
    if len(set(names)) != len(names):
        raise ValueError("unit names repeat within the grid")
    for u in units:
        if not dataclasses.is_dataclass(u):
            raise TypeError(f"unit {u.name!r} is not a dataclass")
    (Path(run_dir) / UNITS).mkdir(parents=True, exist_ok=True)
    results = load_results(run_dir, units)
    todo = [u for u in units if u.name not in results]

    def finish(u: Any, res: Any) -> None:
        files = res.pop(FILES, None) if isinstance(res, dict) else None
        for rel, data in (files or {}).items():
            target = Path(run_dir) / u.name / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp:
                tmp.write_bytes(data)
        write_json(unit_path(run_dir, u.name), {"unit": _spec(u), "result": res})
        results[u.name] = res
        if on_done is not None:
            on_done(u, res)

    if not todo:
        return results, False
    if backend == "local" and workers <= 1:
        should_stop = interrupt.is_set if interrupt is not None else None
        scope = use_threads(threads) if threads is not None else contextlib.nullcontext()
        try:
            with scope:
                for u in todo:
                    if should_stop is not None and should_stop():
                        return results, True
                    res = u.execute(should_stop)
                    if res is None:
                        return results, True
                    finish(u, res)
        finally:
            clear_worker_cache()
        return results, False
    interrupted = map_items(
        execute,
        todo,
        backend=backend,
        workers=max(1, workers),
        threads=threads,
        on_result=lambda i, res: finish(todo[i], res),
        interrupt=interrupt,
    )
    return results, interrupted
