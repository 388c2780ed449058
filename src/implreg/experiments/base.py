"""The experiment contract: what one module implements to become presets of implreg.

An experiment is an :class:`Experiment` subclass in one module of
:mod:`implreg.experiments`, exposed as the module's ``EXPERIMENT``.  It names

- ``Config``: a frozen dataclass with the paper's defaults, checked
  declaratively (:mod:`implreg.config`);
- ``presets``: the named configurations it reproduces (:class:`Preset`:
  overrides of the defaults, the figure it reproduces, and a ``tiny`` budget
  that runs in seconds for the conformance tests);
- ``prepare(cfg, device)``: check the data and build what a run needs, writing nothing;
- ``run(cfg, prepared, ctx) -> Outcome``: do the work into ``ctx.run_dir``
  (resumable after an interrupt);
- ``summarize``: the summary dict from the finished work;
- ``plot(run_dir)``: figures from the run folder alone;
- ``summary_text(summary)``: what the command line prints at the end.

The run-folder lifecycle (create, ``config.json``, resume, cleanup) belongs to
:func:`implreg.api.run_preset`, not to experiments.  Grids of independent units
derive from :class:`GridExperiment` (one sweep engine, any backend); batched
training runs from :class:`implreg.experiments.dynamics.DynamicsExperiment`.
"""

from __future__ import annotations

import abc
import csv
import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from implreg.backends import InterruptFlag
from implreg.resources import Estimate
from implreg.runs import SUMMARY, DamagedRunError, atomic_path, write_json

COMPARES = ("at_most", "at_least", "within_abs", "within_rel", "equals")
BUDGETS = ("reduced", "full", "both")


@dataclass(frozen=True)
class Claim:
    """One published statement a preset reproduces, with how to measure it and when it holds.

    ``measure`` turns a finished run's ``summary.json`` (a dict) into one number:
    a callable, or a key path like ``"runs.0.n_learned"`` (dots; integers index
    lists).  It is only called in the driver (:mod:`implreg.report`), never
    pickled.  The verdict compares the measured value ``m`` with ``published``
    (``p``):

    - ``at_most``: ``m <= p + tolerance``; ``at_least``: ``m >= p - tolerance``;
      for a qualitative claim (``published`` None) ``tolerance`` is the bound
      itself (``m <= tolerance``, ``m >= tolerance``);
    - ``within_abs`` / ``equals``: ``|m - p| <= tolerance``;
    - ``within_rel``: ``|m - p| <= tolerance * |p|``.

    ``budget`` says at which report budgets the claim is meaningful
    (``"reduced"``, ``"full"`` or ``"both"``); elsewhere its row reads "not run
    at this budget".  Published values come from the papers (see
    ``REFERENCE.md``): Razin, Yadin & Cohen (ICML 2021), Razin, Maman & Cohen
    (ICML 2022), Arora, Cohen, Hu & Luo (NeurIPS 2019), Razin & Cohen (NeurIPS 2020).
    """

    name: str
    statement: str
    source: str
    published: float | None
    measure: Callable[[Mapping[str, Any]], float] | str
    compare: Literal["at_most", "at_least", "within_abs", "within_rel", "equals"]
    tolerance: float
    budget: Literal["reduced", "full", "both"] = "both"

    def __post_init__(self) -> None:
        if self.compare not in COMPARES:
            raise ValueError(f"claim {self.name}: compare must be one of {COMPARES}")
        if self.budget not in BUDGETS:
            raise ValueError(f"claim {self.name}: budget must be one of {BUDGETS}")
        if not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise ValueError(f"claim {self.name}: tolerance must be finite and >= 0")
        if self.compare == "within_rel" and not self.published:
            raise ValueError(f"claim {self.name}: within_rel needs a nonzero published value")

    def runs_at(self, budget: str) -> bool:
        """Whether the claim is meaningful at a report budget (``tiny`` counts as reduced)."""
        budget = "reduced" if budget == "tiny" else budget
        return self.budget == "both" or self.budget == budget

    def value(self, summary: Mapping[str, Any]) -> float:
        """The measured value from a run's summary (a number; NaN when it is missing)."""
        if callable(self.measure):
            out = self.measure(summary)
        else:
            out = summary_path(summary, self.measure)
        if out is None or isinstance(out, bool):
            return float("nan") if out is None else float(out)
        return float(out)

    def holds(self, measured: float) -> bool:
        """The verdict for a measured value (a non-finite one never holds)."""
        if not math.isfinite(measured):
            return False
        p = 0.0 if self.published is None else float(self.published)
        if self.compare == "at_most":
            return measured <= self.bound()
        if self.compare == "at_least":
            return measured >= self.bound()
        if self.compare == "within_rel":
            return abs(measured - p) <= self.tolerance * abs(p)
        return abs(measured - p) <= self.tolerance

    def bound(self) -> float:
        """The bound of an ``at_most`` / ``at_least`` claim (see the class docstring)."""
        if self.published is None:
            return self.tolerance
        sign = 1.0 if self.compare == "at_most" else -1.0
        return float(self.published) + sign * self.tolerance

    def criterion(self) -> str:
        """The pass condition in words, e.g. ``"<= 0.01"`` or ``"within 2% of 70.71"``."""
        p = 0.0 if self.published is None else float(self.published)
        t = self.tolerance
        if self.compare == "at_most":
            return f"<= {self.bound():.4g}"
        if self.compare == "at_least":
            return f">= {self.bound():.4g}"
        if self.compare == "within_rel":
            return f"within {100 * t:.3g}% of {p:.4g}"
        if self.compare == "equals" and t == 0:
            return f"= {p:.4g}"
        return f"within {t:.3g} of {p:.4g}"


def summary_path(summary: Mapping[str, Any], path: str) -> Any:
    """``summary["runs"][0]["n_learned"]`` from ``"runs.0.n_learned"`` (None when absent)."""
    node: Any = summary
    for part in path.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif (
            isinstance(node, list)
            and part.lstrip("-").isdigit()
            and -len(node) <= int(part) < len(node)
        ):
            node = node[int(part)]
        else:
            return None
    return node


def find_entry(entries: Sequence[Mapping[str, Any]], **match: Any) -> Mapping[str, Any]:
    """The first entry of a summary list whose keys equal ``match`` (KeyError if none)."""
    for e in entries:
        if all(e.get(k) == v for k, v in match.items()):
            return e
    raise KeyError(f"no run with {match}")


@dataclass(frozen=True)
class Preset:
    """A named configuration of an experiment and the published figure it reproduces.

    ``claims`` are the published statements it checks (:class:`Claim`);
    ``reduced`` the overrides of the report's reduced budget (``implreg report
    --budget reduced``; an empty mapping runs the full configuration, ``None``
    skips the preset at that budget, saying ``reduced_note`` why).
    """

    name: str
    reproduces: str
    description: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    tiny: Mapping[str, Any] = field(default_factory=dict)
    experiment: Experiment | None = None
    claims: tuple[Claim, ...] = ()
    reduced: Mapping[str, Any] | None = field(default_factory=dict)
    reduced_note: str = ""

    @property
    def config(self) -> Any:
        """The preset's full configuration (the experiment's defaults with its overrides)."""
        assert self.experiment is not None
        return dataclasses.replace(self.experiment.Config(), **self.overrides)


@dataclass
class RunContext:
    """How a run is carried out; nothing here changes its numbers."""

    run_dir: Path
    resume: bool = False
    progress: bool = True
    interrupt: InterruptFlag | None = None
    log: Callable[[str], None] = print
    backend: str = "local"
    device: str = "cpu"
    checkpoint_every: int = 0  # iterations between periodic checkpoints (0: by time only)
    checkpoint_seconds: float = 60.0  # seconds between periodic checkpoints (0: by count only)
    threads: int | None = None  # torch threads (None: the thread policy of implreg.threads)

    def stopped(self) -> bool:
        return self.interrupt is not None and self.interrupt.is_set()

    def bar(self, total: int, initial: int = 0, unit: str = "it", desc: str | None = None):
        """A tqdm progress bar, or ``None`` without progress."""
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True)


@dataclass
class Outcome:
    """What a run ended with.  ``where`` says how far an interrupted run got."""

    summary: dict | None
    exit_code: int = 0
    interrupted: bool = False
    where: str = ""


class Experiment(abc.ABC):
    """The contract of one experiment module (see the module docstring)."""

    name: ClassVar[str]
    Config: ClassVar[type]
    presets: ClassVar[tuple[Preset, ...]]
    aliases: ClassVar[tuple[str, ...]] = ()  # names written by earlier versions
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")  # where it can run
    table: ClassVar[str] = "metrics.csv"  # the run's metrics, one row per record

    def memory_estimate(self, cfg: Any) -> Estimate:
        """Estimated peak memory of a run of ``cfg`` (bytes) and the key that drives it.

        Checked against the free memory before ``prepare`` allocates anything
        (:func:`implreg.resources.check_memory`).  The default is for runs whose
        size does not depend on the config."""
        return Estimate(0.0, "")

    def prepare(self, cfg: Any, device: str = "cpu") -> Any:
        """Check what the config refers to (data, sizes) and build the problem; write nothing."""
        return cfg

    @abc.abstractmethod
    def run(self, cfg: Any, prepared: Any, ctx: RunContext) -> Outcome: ...

    @abc.abstractmethod
    def summary_text(self, summary: dict) -> str: ...

    @abc.abstractmethod
    def plot(self, run_dir: Path) -> list[Path]: ...

    def config_of(self, run_dir: Path) -> Any:
        """The configuration saved in a run folder's ``config.json``."""
        from implreg.config import from_mapping
        from implreg.runs import CONFIG, read_json

        return from_mapping(self.Config, read_json(Path(run_dir) / CONFIG)["config"])

    def has_finished_work(self, run_dir: Path) -> bool:
        """Whether a failed run's folder holds work worth keeping (then it is not removed)."""
        return any((Path(run_dir) / "units").glob("*.json"))


FAILED = ("diverged", "non_finite")  # statuses of runs whose loss stopped being finite
GREW = 10.0  # a final loss this many times the initial one is flagged


def assess(entries: Sequence[Mapping[str, Any]], label: Callable[[Mapping], str]) -> list[str]:
    """What went wrong in a run's entries (units or batched runs), one sentence each.

    An entry failed when its ``status`` says its loss became non-finite, when
    its final loss is not finite, or when the final loss is more than ``GREW``
    times the initial one (a step too large that did not yet overflow).  Any
    problem makes the run exit 1; the sentences go to the summary and the screen.
    """
    out = []
    for e in entries:
        final = e.get("final_train_loss", e.get("final_loss"))
        initial = e.get("initial_train_loss", e.get("initial_loss"))
        if e.get("status") in FAILED or (isinstance(final, float) and not math.isfinite(final)):
            where = f" at iteration {e['stopped_at']}" if e.get("stopped_at") is not None else ""
            out.append(
                f"{label(e)} diverged{where}: its loss is not finite (lower lr or the init scale)"
            )
        elif (
            isinstance(final, float)
            and isinstance(initial, float)
            and initial > 0
            and final > GREW * initial
        ):
            out.append(
                f"{label(e)} ended with loss {final:.3g}, {final / initial:.3g} times its "
                f"initial {initial:.3g} (lower lr)"
            )
    return out


def write_table(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """A CSV of flat rows (the union of their scalar keys, in order of appearance), atomically."""
    keys: dict[str, None] = {}
    for r in rows:
        for k, v in r.items():
            if v is None or isinstance(v, (bool, int, float, str)):
                keys.setdefault(k)
    with atomic_path(Path(path)) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(keys), extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: "" if r.get(k) is None else r.get(k) for k in keys})


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
        from implreg.threads import choose_threads, config_step_flops

        if ctx.threads is not None:
            return ctx.threads
        work = [f for f in (config_step_flops(u) for u in grid) if f is not None]
        return choose_threads(max(work)) if work else None

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
