"""The grid experiment: independent units run by the sweep engine (:mod:`implreg.sweep`).

:class:`GridExperiment`, re-exported by :mod:`implreg.experiments.base`.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from implreg.experiments.base import Experiment, Outcome, RunContext, assess, write_table
from implreg.runs import SUMMARY, DamagedRunError, write_json


class GridExperiment(Experiment):
    """An experiment made of independent units run by the sweep engine (:mod:`implreg.sweep`).

    Subclasses give ``units(cfg)`` (typed unit specs, each with ``name`` and
    ``execute(should_stop)``), ``summarize(cfg, results)`` (results in unit
    order), optionally ``rows`` (the rows of the run's table), ``summary_text``
    and ``plot``.  ``bulky`` names a result key kept in the unit files but not
    copied into the summary (trajectories).
    """

    bulky: ClassVar[str | None] = None

    @abc.abstractmethod
    def units(self, cfg: Any, device: str = "cpu") -> list: ...

    @abc.abstractmethod
    def summarize(self, cfg: Any, results: list[dict]) -> dict: ...

    def rows(self, results: list[dict], summary: dict) -> list[dict]:
        """The rows of the run's table (``metrics.csv``): by default one per unit."""
        return [self.strip(r) for r in results]

    def describe(self, unit: Any, result: dict) -> str:
        """Shown beside the progress bar when a unit finishes."""
        return unit.name

    def workers(self, cfg: Any) -> int:
        return int(getattr(cfg, "workers", 1))

    def threads(self, grid: Sequence[Any], ctx: RunContext) -> int | None:
        """Torch threads per unit: ``--threads``, else the thread policy where the units'
        work is known (:mod:`implreg.threads`), else None (the backend's default)."""
        return self._unit_threads(grid, ctx.threads)

    @staticmethod
    def _unit_threads(grid: Sequence[Any], requested: int | None) -> int | None:
        from implreg.threads import choose_threads, config_step_flops

        if requested is not None:
            return requested
        work = [f for f in (config_step_flops(u) for u in grid) if f is not None]
        return choose_threads(max(work)) if work else None

    def run_threads(self, cfg: Any, requested: int | None = None) -> int:
        """Threads per unit (as :meth:`threads` and the backend choose them) times the units
        run at once."""
        from implreg.backends import default_threads
        from implreg.threads import available_cores

        grid = self.units(cfg)
        workers = max(1, self.workers(cfg))
        at_once = max(1, min(workers, len(grid)))
        per = self._unit_threads(grid, requested)
        if per is None:  # in process: torch's default; in workers: the backend's share
            per = default_threads(workers) if workers > 1 else available_cores()
        return int(per) * at_once

    def unit_results(self, run_dir: Path) -> tuple[Any, list, dict[str, Any]]:
        """(config, units, finished results by unit name) of a run folder, for plots."""
        from implreg.runs import CONFIG, read_json
        from implreg.sweep import load_results, unit_path

        cfg = self.config_of(run_dir)
        grid = self.units(cfg, read_json(Path(run_dir) / CONFIG).get("device", "cpu"))
        results = load_results(run_dir, grid)
        missing = [u.name for u in grid if u.name not in results]
        if missing:
            raise DamagedRunError(
                f"{unit_path(run_dir, missing[0])} is missing: the figure needs every unit "
                "(resume the run to redo it)"
            )
        return cfg, grid, results

    def strip(self, result: dict) -> dict:
        return {k: v for k, v in result.items() if k != self.bulky}

    def bind(self, grid: list, run_dir: Path) -> list:
        """The units as run in ``run_dir``: a hook for units that keep their own checkpoints
        there (in fields the unit class names ``transient``).  Default: unchanged."""
        return grid

    def run(self, cfg: Any, prepared: Any, ctx: RunContext) -> Outcome:
        from implreg.sweep import load_results, run_grid

        grid = self.bind(self.units(cfg, ctx.device), ctx.run_dir)
        done = load_results(ctx.run_dir, grid)
        bar = ctx.bar(len(grid), len(done), unit="unit")

        def on_done(unit, result) -> None:
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(self.describe(unit, result))

        start = time.perf_counter()
        threads = self.threads(grid, ctx)
        try:
            results, interrupted = run_grid(
                grid,
                ctx.run_dir,
                workers=self.workers(cfg),
                backend=ctx.backend,
                interrupt=ctx.interrupt,
                on_done=on_done,
                threads=threads,
            )
        finally:
            if bar is not None:
                bar.close()
        if interrupted:
            return Outcome(None, 130, True, f"{len(results)} of {len(grid)} units finished")
        ordered = [results[u.name] for u in grid]
        summary = self.summarize(cfg, ordered)
        summary["wall_seconds_this_session"] = time.perf_counter() - start
        summary["threads_per_unit"] = threads
        names = {id(r): u.name for u, r in zip(grid, ordered)}
        summary["problems"] = assess(ordered, lambda r: names.get(id(r), "a unit"))
        write_json(ctx.run_dir / SUMMARY, summary)
        write_table(ctx.run_dir / self.table, self.rows(ordered, summary))
        self.plot(ctx.run_dir)
        return Outcome(summary, 1 if summary["problems"] else 0)
