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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from implreg.backends import InterruptFlag
from implreg.experiments.claims import BUDGETS, COMPARES, Claim, find_entry, summary_path
from implreg.resources import Estimate
from implreg.runs import atomic_path


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

    def run_threads(self, cfg: Any, requested: int | None = None) -> int:
        """How many threads a run of ``cfg`` keeps busy at once on this machine.

        ``requested`` is a ``--threads`` value.  ``implreg report --jobs`` starts a preset
        only while the running ones leave it enough cores.  The default is torch's own
        default, every core; experiments that choose their thread count say which.
        """
        from implreg.threads import available_cores

        return int(requested) if requested is not None else available_cores()

    def run_configs(self, cfg: Any) -> list[tuple[str, Any]]:
        """Every run a run of ``cfg`` makes, as ``(experiment name, configuration)`` pairs.

        A run makes itself; an experiment made of sub-runs (``dynamics-mf-tf-htf``) names
        them too, so ``implreg report --jobs`` can hold back a preset whose configuration is
        one of them until that run is finished and can be copied.
        """
        return [(self.name, cfg)]


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


if TYPE_CHECKING:
    from implreg.experiments.grid import GridExperiment

__all__ = [
    "BUDGETS",
    "COMPARES",
    "FAILED",
    "GREW",
    "Claim",
    "Experiment",
    "GridExperiment",
    "Outcome",
    "Preset",
    "RunContext",
    "assess",
    "find_entry",
    "summary_path",
    "write_table",
]


def __getattr__(name: str) -> Any:
    """``GridExperiment`` lives in :mod:`implreg.experiments.grid` (which imports this
    module); it is imported on first use here, so either module can be imported first."""
    if name == "GridExperiment":
        from implreg.experiments.grid import GridExperiment

        return GridExperiment
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
