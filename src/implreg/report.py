"""``implreg report``: every preset at one budget, its published claims checked, on one page.

For each preset of the registry (in registry order) :func:`build_report` runs
the preset at the chosen budget into ``<out>/runs/<preset>`` through the public
API (:func:`implreg.api.run_preset`), or reuses a finished run already there
with the same configuration (so a report can be resumed after Ctrl-C and
re-rendered for free), or copies a finished run of exactly the same configuration made
by an earlier preset of the same report (``htf-dynamics`` is the HTF panel of
``dynamics-mf-tf-htf``); it then runs the theorem checks
(:func:`implreg.checks.run_checks`), evaluates every :class:`Claim` the presets
declare, and writes ``report.html`` (static: no script, no network; figures
referenced by relative path under ``<out>``), its Markdown twin ``report.md``
and ``report.json``, each atomically.

Budgets: ``full`` runs each preset's own configuration (the published setting);
``reduced`` applies each preset's ``reduced`` overrides (``None`` there skips
the preset, saying why); ``tiny`` (for tests) its ``tiny`` overrides.  A claim
declares the budgets at which it is meaningful; elsewhere its row says "not
run", with the reason, which is a verdict too.  Every claim that runs has a
measured value.  A preset that fails (an exception, or a run that exits
non-zero) becomes a row with its error; the report itself goes on.

With ``seeds`` the presets whose configuration has a ``seed`` are also run once
per seed by the sweep engine (:func:`implreg.seeds.seed_sweep`, any backend)
into ``<out>/runs/<preset>-seeds``, and each claim shows the median and the
interquartile range of its measured value over the seeds.

The claims reproduce Razin, Yadin & Cohen (ICML 2021), Razin, Maman & Cohen
(ICML 2022), Arora, Cohen, Hu & Luo (NeurIPS 2019) and Razin & Cohen
(NeurIPS 2020); their published values and tolerances live with the presets
(:mod:`implreg.experiments`), never here.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import html
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from implreg.config import ConfigError, to_mapping
from implreg.experiments.base import Claim, Preset
from implreg.runs import CONFIG, SUMMARY, atomic_path, read_json, versions, write_json

BUDGETS = ("reduced", "full")
HIDDEN_BUDGETS = ("tiny",)  # the tests' budget: each preset's ``tiny`` overrides
PASS, FAIL, NOT_RUN = "pass", "FAIL", "not run"
VERDICTS = (PASS, FAIL, NOT_RUN)


class ReportInterrupted(RuntimeError):
    """Ctrl-C / SIGTERM during a run: the finished runs are kept; the same command resumes."""


@dataclass
class ClaimRow:
    """One claim of one preset as measured in this report."""

    preset: str
    name: str
    statement: str
    source: str
    published: float | None
    criterion: str
    budget: str
    measured: float | None = None
    verdict: str = NOT_RUN
    reason: str = ""
    seeds: dict | None = None  # n, median, q25, q75, values of the measured value over seeds

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PresetRow:
    """One preset: how its run went, where it is, its figures, its claims, its time."""

    name: str
    reproduces: str
    status: str = "not run"  # ok | problems | failed | not run
    note: str = ""
    run_dir: str | None = None
    reused: bool = False
    seconds: float = 0.0
    run_seconds: float | None = None  # as recorded by the run (its own session)
    figures: list[str] = field(default_factory=list)
    seed_dir: str | None = None
    seed_seconds: float = 0.0
    claims: list[ClaimRow] = field(default_factory=list)

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["claims"] = [c.as_dict() for c in self.claims]
        return out


@dataclass
class Report:
    """What :func:`build_report` wrote: the rows, the check table and the paths."""

    out_dir: Path
    budget: str
    presets: list[PresetRow]
    checks: list[dict]
    times: dict[str, float]
    paths: dict[str, Path]
    jobs: int = 1  # presets run side by side

    @property
    def claims(self) -> list[ClaimRow]:
        return [c for p in self.presets for c in p.claims]

    def counts(self) -> dict[str, int]:
        out = {v: 0 for v in VERDICTS}
        for c in self.claims:
            out[c.verdict] += 1
        return out


# ---------------------------------------------------------------------------------------------
# inputs


def check_inputs(
    budget: str,
    presets: Sequence[str] | None,
    out_dir: str | Path,
    data_dir: str | Path | None,
    backend: str,
    seeds: Sequence[int] | None,
    checks: Sequence[str] | None,
    jobs: int = 1,
) -> list[Preset]:
    """Refuse bad input in one sentence (:class:`ConfigError`) before any work starts."""
    from implreg.api import _check_backend, _check_out
    from implreg.checks import CHECKS
    from implreg.experiments import PRESETS

    if budget not in BUDGETS + HIDDEN_BUDGETS:
        raise ConfigError(f"--budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    names = list(PRESETS) if presets is None else list(presets)
    if not names:
        raise ConfigError("--only names no preset")
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise ConfigError(f"unknown preset {unknown[0]!r}; known presets: {', '.join(PRESETS)}")
    if len(set(names)) != len(names):
        raise ConfigError("--only names a preset twice")
    if str(out_dir).strip() == "":
        raise ConfigError("--out must name a folder, got ''")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    _check_out(out)
    if data_dir is not None and not Path(data_dir).is_dir():
        raise ConfigError(f"--data-dir {data_dir} is not a folder")
    _check_backend(backend)
    if seeds is not None and (not seeds or min(seeds) < 0):
        raise ConfigError("--seeds must name at least one seed, none negative")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"--jobs must be a whole number >= 1, got {jobs!r}")
    if checks is not None:
        bad = [c for c in checks if c not in CHECKS]
        if bad:
            raise ConfigError(f"unknown check {bad[0]!r}; the checks are {', '.join(CHECKS)}")
    ordered = [n for n in PRESETS if n in set(names)]  # registry order
    return [PRESETS[n] for n in ordered]


def budget_overrides(preset: Preset, budget: str) -> Mapping[str, Any] | None:
    """The overrides of ``preset`` at ``budget`` (None: the preset does not run there)."""
    if budget == "full":
        return {}
    if budget == "tiny":
        return dict(preset.tiny)
    return None if preset.reduced is None else dict(preset.reduced)


def _reads_data(preset: Preset) -> bool:
    cfg = preset.config
    has = "data_dir" in {f.name for f in dataclasses.fields(cfg)}
    return has and bool(getattr(cfg, "needs_data_dir", lambda: True)())


# ---------------------------------------------------------------------------------------------
# claims


def evaluate_claim(
    preset: str,
    claim: Claim,
    summary: Mapping[str, Any] | None,
    budget: str,
    why_not: str = "",
) -> ClaimRow:
    """A claim's row: measured value and verdict, or "not run" and the reason."""
    row = ClaimRow(
        preset,
        claim.name,
        claim.statement,
        claim.source,
        claim.published,
        claim.criterion(),
        claim.budget,
    )
    if not claim.runs_at(budget):
        row.reason = f"not run at this budget (meaningful at the {claim.budget} budget)"
        return row
    if summary is None:
        row.reason = why_not or "the preset did not run"
        return row
    try:
        value = claim.value(summary)
    except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as exc:
        row.measured = math.nan
        row.verdict = FAIL
        row.reason = f"cannot be measured from the summary ({type(exc).__name__}: {exc})"
        return row
    row.measured = value
    row.verdict = PASS if claim.holds(value) else FAIL
    if not math.isfinite(value):
        row.reason = "the measured value is not finite"
    return row


def seed_statistics(claim: Claim, summaries: Sequence[Mapping[str, Any]]) -> dict:
    """Median and quartiles of a claim's measured value over seed runs (NaN ones dropped)."""
    values = []
    for s in summaries:
        try:
            values.append(claim.value(s))
        except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError):
            values.append(math.nan)
    finite = np.array([v for v in values if math.isfinite(v)], dtype=float)
    out: dict[str, Any] = {"n": int(finite.size), "values": values}
    if finite.size:
        q25, med, q75 = np.percentile(finite, [25, 50, 75])
        out |= {"median": float(med), "q25": float(q25), "q75": float(q75)}
        out["passed"] = int(sum(claim.holds(v) for v in values))
    return out


# ---------------------------------------------------------------------------------------------
# running


def _config_json(cfg: Any) -> Any:
    return json.loads(json.dumps(to_mapping(cfg), default=list))


def _same_config(run_dir: Path, cfg: Any) -> bool:
    try:
        saved = read_json(run_dir / CONFIG)
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and saved.get("config") == _config_json(cfg)


def _equal_finished_run(runs: Path, experiment: str, cfg: Any, skip: Path) -> Path | None:
    """A finished run under ``runs`` (a preset's folder or one level below, e.g. a panel of
    ``dynamics-mf-tf-htf``) of ``experiment`` with exactly the configuration ``cfg``.

    The report runs the same configuration only once: ``htf-dynamics`` at the full budget
    is the HTF panel of ``dynamics-mf-tf-htf`` (28 min here), so the second of the two
    copies the first's folder instead of computing it again.
    """
    want = _config_json(cfg)
    for config_file in sorted(runs.glob(f"*/{CONFIG}")) + sorted(runs.glob(f"*/*/{CONFIG}")):
        found = config_file.parent
        if found == skip or skip in found.parents or not (found / SUMMARY).is_file():
            continue
        try:
            saved = read_json(config_file)
        except (OSError, ValueError):
            continue
        if (
            isinstance(saved, dict)
            and saved.get("experiment") == experiment
            and saved.get("config") == want
        ):
            return found
    return None


def _copy_run(source: Path, target: Path, preset: str) -> None:
    """Copy the finished run folder ``source`` to ``target`` (absent) as a run of ``preset``.

    The copy is made beside ``target`` and renamed into place, so an interruption leaves
    no half-copied run; its ``config.json`` names ``preset`` and where it was copied from.
    """
    import shutil

    tmp = target.with_name(f".{target.name}.copying")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(".lock"))
    info = read_json(tmp / CONFIG)
    info["preset"] = preset
    info["copied_from"] = str(source)
    write_json(tmp / CONFIG, info)
    tmp.rename(target)


def _set_aside(path: Path, log: Callable[[str], None]) -> None:
    """Move a run folder of another configuration out of the way (kept, never deleted)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.replaced-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.replaced-{stamp}-{n}")
        n += 1
    path.rename(target)
    log(f"{path} holds a run of another configuration: moved to {target.name}")


def _as_strings(overrides: Mapping[str, Any]) -> list[str]:
    """``key=value`` strings (the sweep engine's form) from Python override values."""
    out = []
    for k, v in overrides.items():
        if isinstance(v, (tuple, list)):
            text = ",".join(str(x) for x in v)
        elif isinstance(v, bool):
            text = "true" if v else "false"
        else:
            text = str(v)
        out.append(f"{k}={text}")
    return out


def _run_one(
    preset: Preset,
    budget: str,
    runs: Path,
    data_dir: str | Path | None,
    backend: str,
    reuse: bool,
    threads: int | None,
    log: Callable[[str], None],
) -> tuple[PresetRow, dict | None, str]:
    """Run (or reuse) one preset; returns its row, its summary and why it has none."""
    from implreg.api import RunError, resolve, run_preset

    row = PresetRow(preset.name, preset.reproduces)
    overrides = budget_overrides(preset, budget)
    if overrides is None:
        row.note = f"not run at the {budget} budget: {preset.reduced_note or 'none declared'}"
        return row, None, row.note
    if _reads_data(preset) and data_dir is None and not os.environ.get("IMPLREG_DATA_DIR"):
        row.note = "not run: needs --data-dir (the MNIST / Fashion-MNIST files)"
        return row, None, row.note
    if "data_dir" not in {f.name for f in dataclasses.fields(preset.config)}:
        data_dir = None  # the presets that read no data refuse one
    path = runs / preset.name
    row.run_dir = str(path.relative_to(runs.parent))
    start = time.perf_counter()
    try:
        _, _, cfg = resolve(preset.name, overrides=overrides, data_dir=data_dir)
        if path.exists() and (not reuse or not _same_config(path, cfg)):
            _set_aside(path, log)
        donor = None
        if reuse and not path.exists():
            donor = _equal_finished_run(runs, preset.experiment.name, cfg, path)
        if donor is not None:
            _copy_run(donor, path, preset.name)
            run = _load(path)
            row.reused = True
            row.note = f"the same configuration as {donor.relative_to(runs.parent)}: copied"
            log(f"{preset.name}: copying the finished run of the same configuration in {donor}")
        elif (path / SUMMARY).is_file():
            run = _load(path)
            row.reused = True
            log(f"{preset.name}: reusing the finished run in {path}")
        elif (path / CONFIG).is_file():
            log(f"{preset.name}: resuming the unfinished run in {path}")
            run = run_preset(out=path, resume=True, backend=backend, log=log, threads=threads)
        else:
            log(f"{preset.name}: running ({budget} budget) into {path}")
            run = run_preset(
                preset.name,
                out=path,
                overrides=overrides,
                data_dir=data_dir,
                backend=backend,
                log=lambda *_: None,
                threads=threads,
            )
    except (ConfigError, RunError, OSError, RuntimeError, ValueError) as exc:
        row.seconds = time.perf_counter() - start
        row.status = "failed"
        row.note = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        log(f"{preset.name}: FAILED ({row.note})")
        return row, None, f"the run failed ({row.note})"
    row.seconds = time.perf_counter() - start
    if run.interrupted:
        raise ReportInterrupted(f"{preset.name} was interrupted; its run folder {path} is kept")
    summary = run.summary
    if summary is None:
        row.status = "failed"
        row.note = "the run ended without a summary"
        return row, None, row.note
    problems = list(summary.get("problems", []))
    row.status = "problems" if (run.exit_code != 0 or problems) else "ok"
    if row.status == "problems":
        row.note = "; ".join(problems) or f"the run exited with code {run.exit_code}"
    row.run_seconds = summary.get("wall_seconds_this_session")
    row.figures = [str(p.relative_to(runs.parent)) for p in _figures(run.path)]
    return row, summary, ""


def _load(path: Path):
    from implreg.api import load

    return load(path)


def _figures(path: Path) -> list[Path]:
    """The run's figures: its own PNGs, then those of sub-runs (e.g. dynamics-mf-tf-htf)."""
    top = sorted(path.glob("*.png"))
    subs = sorted(p for p in path.glob("*/*.png") if p.parent.name != "units")
    return top + subs


def _run_seeds(
    preset: Preset,
    budget: str,
    runs: Path,
    seeds: Sequence[int],
    data_dir: str | Path | None,
    backend: str,
    reuse: bool,
    log: Callable[[str], None],
) -> tuple[list[dict], str]:
    """The summaries of one run per seed (the sweep engine; finished seeds are reused)."""
    from implreg.seeds import seed_sweep

    overrides = _as_strings(budget_overrides(preset, budget) or {})
    if "data_dir" not in {f.name for f in dataclasses.fields(preset.config)}:
        data_dir = None
    path = runs / f"{preset.name}-seeds"
    if path.exists():
        try:
            saved = read_json(path / "sweep.json")
        except (OSError, ValueError):
            saved = {}
        same = saved.get("overrides") == _sweep_overrides(preset, overrides)
        if not reuse or not same:
            _set_aside(path, log)
    log(f"{preset.name}: seeds {', '.join(map(str, seeds))} into {path}")
    result = seed_sweep(
        preset.name,
        seeds,
        out=path,
        overrides=overrides,
        data_dir=data_dir,
        backend=backend,
    )
    if result.interrupted:
        raise ReportInterrupted(f"the seed sweep of {preset.name} was interrupted; kept in {path}")
    summaries = [read_json(path / f"seed-{s}" / SUMMARY) for s in result.seeds]
    return summaries, str(path.relative_to(runs.parent))


def _sweep_overrides(preset: Preset, overrides: list[str]) -> list[str]:
    """The overrides as :func:`implreg.seeds.seed_sweep` records them in ``sweep.json``."""
    if "workers" in {f.name for f in dataclasses.fields(preset.config)}:
        overrides = [o for o in overrides if o.split("=", 1)[0].strip() != "workers"]
        overrides.append("workers=1")
    return overrides


def _report_preset(
    preset: Preset,
    budget: str,
    runs: Path,
    data: str | None,
    backend: str,
    reuse: bool,
    threads: int | None,
    seeds: Sequence[int] | None,
    log: Callable[[str], None],
) -> tuple[PresetRow, dict[str, float]]:
    """One preset's row of the report: its run, its claims and, with ``seeds``, its sweep."""
    times: dict[str, float] = {}
    row, summary, why = _run_one(preset, budget, runs, data, backend, reuse, threads, log)
    times[f"run {preset.name}"] = row.seconds
    row.claims = [evaluate_claim(preset.name, c, summary, budget, why) for c in preset.claims]
    seeded = "seed" in {f.name for f in dataclasses.fields(preset.config)}
    if seeds and seeded and summary is not None:
        t0 = time.perf_counter()
        try:
            summaries, row.seed_dir = _run_seeds(
                preset, budget, runs, seeds, data, backend, reuse, log
            )
        except (ConfigError, OSError, RuntimeError, ValueError) as exc:
            if isinstance(exc, ReportInterrupted):
                raise
            row.note = (row.note + "; " if row.note else "") + (
                f"the seed sweep failed ({type(exc).__name__}: {' '.join(str(exc).split())})"
            )
            summaries = []
        row.seed_seconds = time.perf_counter() - t0
        times[f"seeds {preset.name}"] = row.seed_seconds
        for c, claim in zip(row.claims, preset.claims):
            if summaries and c.verdict != NOT_RUN:
                c.seeds = seed_statistics(claim, summaries)
    counts = {v: sum(c.verdict == v for c in row.claims) for v in VERDICTS}
    log(
        f"{preset.name}: {row.status}, {row.seconds:.1f} s; claims "
        + ", ".join(f"{n} {v}" for v, n in counts.items())
    )
    return row, times


def _run_keys(preset: Preset, budget: str, data: str | None) -> tuple[str | None, set[str]]:
    """The key of the run ``preset`` makes at ``budget`` and the keys of every run it makes.

    A key is the experiment's name with the configuration (as ``config.json`` holds it), the
    identity :func:`_equal_finished_run` copies by.  A preset that does not run at
    ``budget``, or whose configuration does not resolve, has none (its job says why).
    """
    cfg = _budget_config(preset, budget, data)
    if cfg is None:
        return None, set()
    try:
        made = preset.experiment.run_configs(cfg)
    except (ConfigError, OSError, RuntimeError, ValueError):
        return None, set()

    def key(name: str, c: Any) -> str:
        return json.dumps([name, _config_json(c)], sort_keys=True)

    return key(preset.experiment.name, cfg), {key(n, c) for n, c in made}


def _budget_config(preset: Preset, budget: str, data: str | None) -> Any | None:
    """The configuration ``preset`` runs at ``budget``; None if it does not run there or its
    configuration does not resolve (its job then says why)."""
    from implreg.api import resolve

    overrides = budget_overrides(preset, budget)
    if overrides is None:
        return None
    if "data_dir" not in {f.name for f in dataclasses.fields(preset.config)}:
        data = None
    try:
        return resolve(preset.name, overrides=overrides, data_dir=data)[2]
    except (ConfigError, OSError, RuntimeError, ValueError):
        return None


def _run_threads(preset: Preset, budget: str, data: str | None, threads: int | None) -> int:
    """Threads the run of ``preset`` at ``budget`` keeps busy (:meth:`Experiment.run_threads`);
    one where that is unknown (a run that does not start)."""
    cfg = _budget_config(preset, budget, data)
    if cfg is None:
        return 1
    try:
        return max(1, int(preset.experiment.run_threads(cfg, threads)))
    except (ConfigError, OSError, RuntimeError, ValueError):
        return 1


FULL_MINUTES = {
    # About how long each preset runs at the full budget on the project's 2-core machine, in
    # minutes; --jobs starts the longest first.  Only the start order depends on them, never a
    # number.  From the README's measurements (implreg report --budget full, 2026-12-02/03).
    "tensor-rank-complexity": 40.0,
    "dynamics-mf-tf-htf": 34.0,
    "htf-sensing": 34.0,
    "htf-dynamics": 33.0,  # the trio's HTF panel: copied once the trio has finished
    "htf-tree": 33.0,
    "locality-pathfinder": 17.4,
    "locality-is-same-class": 11.5,
    "mf-depth-vs-nuclear": 4.0,
    "tf-sensing": 3.7,
    "htf-more-entries": 2.7,
    "tf-flow": 2.4,
    "tf-huber": 1.9,
    "htf-large": 1.2,
    "mf-dynamics": 1.0,
    "mf-det-sign": 0.6,
    "tf-dynamics": 0.5,
    "tf-order": 0.4,
}

JOB_START = "spawn"
"""How a job process starts: a fresh interpreter, as ``implreg run`` would be.

Not ``fork``: a process that has run a two-thread OpenMP region (libgomp, torch's CPU
threads) and forks gives a child whose first parallel region waits forever for the pool's
threads, which did not survive the fork (seen: a report job idle in the HTF gather after
the tests had run two-thread steps).  The tests that patch the registry fork (``fork``
here); a forked job then runs on one thread unless its run asks for more."""


def _job(conn, name: str, args: tuple, parent: int, forked: bool) -> None:
    """One preset of ``implreg report --jobs`` in its own process; replies on ``conn``.

    Log lines go to the report as ``("log", line)``; the end is ``("done", row, times)``,
    ``("interrupted", why)`` or ``("error", sentence)``.  A report killed outright
    (``kill -9``) sends this process SIGTERM: the run checkpoints and stops, losing at most
    one checkpoint interval, as a run of its own would.
    """
    import signal

    from implreg.backends import die_with_parent
    from implreg.experiments import PRESETS

    # SIGTERM stops the job (the report passes every signal on as SIGTERM); the run installs
    # its own handlers of SIGINT and SIGTERM while it runs.  Not the report's handlers,
    # inherited through a fork (they would signal the other jobs).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent(signal.SIGTERM, parent)
    if forked:
        import torch

        torch.set_num_threads(1)  # see JOB_START

    def log(line: str) -> None:
        try:
            conn.send(("log", line))
        except (OSError, ValueError):  # the report is gone; the run goes on to its checkpoint
            pass

    try:
        row, times = _report_preset(PRESETS[name], *args, log=log)
        reply: tuple = ("done", row, times)
    except (ReportInterrupted, KeyboardInterrupt) as exc:
        reply = ("interrupted", str(exc) or f"{name} was interrupted")
    except BaseException as exc:  # noqa: BLE001 - one sentence to the report, which goes on
        reply = ("error", f"{type(exc).__name__}: {' '.join(str(exc).split())}")
    try:
        conn.send(reply)
    except (OSError, ValueError):
        pass
    except Exception as exc:  # noqa: BLE001 - a reply that does not pickle
        conn.send(("error", f"{type(exc).__name__}: {' '.join(str(exc).split())}"))
    conn.close()


def _report_jobs(
    chosen: Sequence[Preset],
    jobs: int,
    args: tuple,
    budget: str,
    data: str | None,
    log: Callable[[str], None],
    poll: float = 0.2,
) -> tuple[list[PresetRow], dict[str, float]]:
    """Run the presets ``jobs`` at a time, each in its own process, rows in registry order.

    Presets start the longest first (:data:`FULL_MINUTES`) once a job is free, except one whose
    run an unfinished preset also makes (``htf-dynamics`` is the HTF panel of
    ``dynamics-mf-tf-htf``): it waits for that run and copies it, as the serial report does.
    Each run keeps its own thread policy (``--threads`` or the policy), so its numbers are
    those of the serial report, and a preset starts only while the threads of the running
    ones and its own (:meth:`Experiment.run_threads`) fit in the cores (or in ``jobs``
    threads, if more): a two-thread run waits until it can have both cores, and one-thread
    runs fill the jobs meanwhile; with nothing running the first goes anyway.  SIGINT or
    SIGTERM stops starting presets and passes SIGTERM on (a run interrupted by itself stops
    the others too); the runs checkpoint and
    :class:`ReportInterrupted` follows (a second signal kills them: each loses at most one
    checkpoint interval).  A job that dies is a failed row naming its exit code; the report
    goes on.
    """
    import multiprocessing
    import signal
    from multiprocessing import connection as mp_connection

    from implreg.threads import available_cores

    ctx = multiprocessing.get_context(JOB_START)
    forked = JOB_START == "fork"
    keys = {p.name: _run_keys(p, budget, data) for p in chosen}
    need = {p.name: _run_threads(p, budget, data, args[5]) for p in chosen}
    # the runs side by side keep at most this many threads busy: a two-thread run beside a
    # one-thread run on two cores ran 3.2x slower than alone (the Figure 4 grid beside the
    # HTF panel, 2026-12-03), while two one-thread runs each kept their own speed
    cores = max(available_cores(), jobs)
    done: dict[str, tuple[PresetRow, dict[str, float]]] = {}
    # the longest first (rows stay in registry order): a long preset started last would run
    # alone at the end while the other jobs idle
    queue = sorted(chosen, key=lambda p: -FULL_MINUTES.get(p.name, 1.0))
    running: dict[Any, tuple[Preset, Any, float]] = {}  # connection -> (preset, process, start)
    interrupted: list[str] = []
    signals: list[int] = []

    stopping: list[str] = []  # why no preset starts any more

    def stop(why: str, signum: int = signal.SIGTERM) -> None:
        stopping.append(why)
        for _, proc, _ in running.values():
            if proc.is_alive():
                os.kill(proc.pid, signum)

    def on_signal(signum, frame) -> None:  # noqa: ARG001
        signals.append(signum)
        # SIGTERM, not the signal itself: a job still starting (importing) then ends silently,
        # a running one checkpoints; a second signal kills them
        stop(f"signal {signum}", signal.SIGTERM if len(signals) == 1 else signal.SIGKILL)

    def waits_for(p: Preset, q: Preset) -> bool:
        """Whether ``p`` waits for ``q``: ``q`` also makes ``p``'s run (the trio makes
        htf-dynamics'), or is the same run and comes first in registry order."""
        want = keys[p.name][0]
        if q is p or want is None or want not in keys[q.name][1]:
            return False
        return keys[q.name][0] != want or chosen.index(q) < chosen.index(p)

    def blocked(p: Preset) -> bool:
        return any(q.name not in done and waits_for(p, q) for q in chosen)

    def fits(p: Preset) -> bool:
        return sum(need[q.name] for q, _, _ in running.values()) + need[p.name] <= cores

    def finish(p: Preset, row: PresetRow | None, times: dict[str, float], start: float) -> None:
        if row is None:
            row = PresetRow(p.name, p.reproduces, status="failed", note=times.pop("why", ""))
            row.seconds = time.perf_counter() - start
            row.claims = [
                evaluate_claim(p.name, c, None, budget, f"the run failed ({row.note})")
                for c in p.claims
            ]
            times = {f"run {p.name}": row.seconds}
            log(f"{p.name}: FAILED ({row.note})")
        done[p.name] = (row, times)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while queue or running:
            while not stopping and queue and len(running) < jobs:
                # with nothing running the first goes, so no wait can be without end
                fallback = None if running else queue[0]
                ready = next((p for p in queue if not blocked(p) and fits(p)), fallback)
                if ready is None:
                    break
                queue.remove(ready)
                here, there = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_job, args=(there, ready.name, args, os.getpid(), forked))
                # the job starts with SIGINT ignored (kept across exec): a Ctrl-C while it
                # imports would end it with a traceback; the report passes SIGTERM on instead
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                try:
                    proc.start()
                finally:
                    signal.signal(signal.SIGINT, on_signal)
                there.close()
                running[here] = (ready, proc, time.perf_counter())
                log(f"{ready.name}: started ({len(running)} of {jobs} jobs running)")
            if stopping and not running:
                break
            for conn in mp_connection.wait(list(running), timeout=poll):
                p, proc, start = running[conn]
                try:
                    msg = conn.recv()
                except EOFError:
                    running.pop(conn)
                    conn.close()
                    proc.join()
                    if stopping:
                        interrupted.append(p.name)
                    else:
                        why = f"its job process died (exit code {proc.exitcode})"
                        finish(p, None, {"why": why}, start)
                    continue
                if msg[0] == "log":
                    log(msg[1])
                    continue
                running.pop(conn)
                conn.close()
                proc.join()
                if msg[0] == "done":
                    finish(p, msg[1], msg[2], start)
                elif msg[0] == "interrupted":  # a Ctrl-C reached the run itself, say
                    interrupted.append(p.name)
                    if not stopping:
                        stop(f"{p.name} was interrupted")
                else:
                    finish(p, None, {"why": msg[1]}, start)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for conn, (_, proc, _) in running.items():
            proc.kill()
            proc.join()
            conn.close()
    if stopping or interrupted:
        which = ", ".join(interrupted) or "no run was in progress"
        raise ReportInterrupted(f"stopped ({which}); the finished runs are kept in {args[1]}")
    rows = [done[p.name][0] for p in chosen]
    times = {k: v for p in chosen for k, v in done[p.name][1].items()}
    return rows, times


def build_report(
    out_dir: str | Path,
    budget: str,
    presets: Sequence[str] | None = None,
    data_dir: str | Path | None = None,
    backend: str = "local",
    reuse: bool = True,
    log: Callable[[str], None] = print,
    *,
    seeds: Sequence[int] | None = None,
    checks: Sequence[str] | None = None,
    threads: int | None = None,
    jobs: int = 1,
) -> Report:
    """Run (or reuse) every preset at ``budget`` and write the report into ``out_dir``.

    ``presets``: names (default: all, in registry order); ``data_dir``: the
    MNIST / Fashion-MNIST folder (presets that read it are "not run" without
    it); ``reuse=False`` sets earlier runs aside (renamed, never deleted) and
    runs again; ``seeds``: also run each seeded preset once per seed (median
    and IQR per claim); ``checks``: the theorem checks to run (default: all);
    ``threads``: torch threads of each run (default: the thread policy);
    ``jobs``: presets run side by side, each in its own process (default one
    at a time, in this process; see :func:`_report_jobs`).
    Returns the :class:`Report`; raises :class:`ConfigError` on bad input
    before any work and :class:`ReportInterrupted` after Ctrl-C.
    """
    from implreg.checks import run_checks

    chosen = check_inputs(budget, presets, out_dir, data_dir, backend, seeds, checks, jobs)
    out = Path(out_dir)
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    data = str(Path(data_dir).resolve()) if data_dir is not None else None
    start = time.perf_counter()
    args = (budget, runs, data, backend, reuse, threads, seeds)
    if jobs > 1 and len(chosen) > 1:
        rows, times = _report_jobs(chosen, jobs, args, budget, data, log)
    else:
        rows, times = [], {}
        for preset in chosen:
            row, t = _report_preset(preset, *args, log=log)
            rows.append(row)
            times.update(t)
    t0 = time.perf_counter()
    log("theorem checks ...")
    results = run_checks(checks, seed=0, log=log)
    times["theorem checks"] = time.perf_counter() - t0
    check_rows = [r.as_dict() | {"passed": r.passed} for r in results]
    t0 = time.perf_counter()
    report = Report(out, budget, rows, check_rows, times, {}, jobs)
    times["total"] = time.perf_counter() - start  # up to the rendering, which is timed below
    report.paths = write_report(report, times_render_start=t0)
    return report


# ---------------------------------------------------------------------------------------------
# rendering


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return "n/a"
    if float(x).is_integer() and abs(x) < 1e6:
        return str(int(x))
    return f"{x:.4g}"


def _seed_text(s: dict | None) -> str:
    if not s:
        return "-"
    if not s.get("n"):
        return "no finite value"
    return (
        f"median {_num(s['median'])} (IQR {_num(s['q25'])}-{_num(s['q75'])}), "
        f"{s['passed']}/{len(s['values'])} seeds pass"
    )


CLAIM_HEADS = (
    "preset",
    "claim",
    "statement",
    "source",
    "published",
    "pass if",
    "budget",
    "measured",
    "over seeds",
    "verdict",
    "note",
)
CHECK_HEADS = ("check", "statement", "source", "measured", "tolerance", "samples", "s", "verdict")
PRESET_HEADS = ("preset", "status", "run folder", "run time (s)", "seeds time (s)", "note")


def _claim_cells(c: ClaimRow) -> list[str]:
    return [
        c.preset,
        c.name,
        c.statement,
        c.source,
        _num(c.published),
        c.criterion,
        c.budget,
        _num(c.measured),
        _seed_text(c.seeds),
        c.verdict,
        c.reason,
    ]


def _check_cells(r: dict) -> list[str]:
    return [
        r["name"],
        r["statement"],
        r["source"],
        f"{r['measured']:.3g}",
        f"{r['tolerance']:.3g}",
        str(r["samples"]),
        f"{r['seconds']:.1f}",
        PASS if r["passed"] else FAIL,
    ]


def _preset_cells(p: PresetRow) -> list[str]:
    run_time = f"{p.seconds:.1f}"
    if p.reused:
        recorded = f"{p.run_seconds:.1f} when run" if p.run_seconds is not None else "earlier"
        run_time = f"reused ({recorded})"
    return [
        p.name,
        p.status,
        p.run_dir or "-",
        run_time,
        f"{p.seed_seconds:.1f}" if p.seed_dir else "-",
        p.note,
    ]


def _header(report: Report, times: dict[str, float]) -> dict[str, str]:
    counts = report.counts()
    checks_ok = sum(r["passed"] for r in report.checks)
    return {
        "budget": report.budget,
        "written": _dt.datetime.now().isoformat(timespec="seconds"),
        "claims": f"{counts[PASS]} pass, {counts[FAIL]} FAIL, {counts[NOT_RUN]} not run",
        "theorem checks": f"{checks_ok} of {len(report.checks)} pass",
        "total time": f"{times['total']:.1f} s"
        + (f" ({report.jobs} presets side by side)" if report.jobs > 1 else ""),
        "versions": ", ".join(f"{k} {v}" for k, v in versions().items()),
    }


def render_markdown(report: Report, times: dict[str, float]) -> str:
    """The Markdown twin of the HTML page (same tables, figures as image links)."""

    def cell(text: str) -> str:
        return " ".join(str(text).split()).replace("|", "\\|")

    def table(heads: Sequence[str], rows: list[list[str]]) -> list[str]:
        out = ["| " + " | ".join(heads) + " |", "|" + " --- |" * len(heads)]
        out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
        return out

    lines = [f"# implreg report ({report.budget} budget)", ""]
    lines += [f"- {k}: {cell(v)}" for k, v in _header(report, times).items()]
    lines += ["", "## Published vs measured", ""]
    lines += table(CLAIM_HEADS, [_claim_cells(c) for c in report.claims])
    lines += ["", "## Theorem checks", ""]
    lines += table(CHECK_HEADS, [_check_cells(r) for r in report.checks])
    lines += ["", "## Presets", ""]
    lines += table(PRESET_HEADS, [_preset_cells(p) for p in report.presets])
    lines += ["", "## Time of each part", ""]
    lines += table(("part", "seconds"), [[k, f"{v:.1f}"] for k, v in times.items()])
    lines += ["", "## Figures", ""]
    for p in report.presets:
        if p.figures:
            lines += [f"### {p.name}", "", f"{cell(p.reproduces)}", ""]
            lines += [f"![{p.name}: {Path(f).name}]({f})" for f in p.figures] + [""]
    return "\n".join(lines).rstrip() + "\n"


_CSS = (
    "body{font-family:sans-serif;margin:2em;max-width:110em}"
    "table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #bbb;padding:.25em .5em;vertical-align:top;font-size:.9em}"
    "th{background:#eee}.pass{background:#dfd}.FAIL{background:#fdd}"
    ".not-run{background:#eee;color:#555}img{max-width:100%;border:1px solid #ddd}"
)


def render_html(report: Report, times: dict[str, float]) -> str:
    """One static page: no script, no external resource; images by relative path."""
    e = html.escape

    def table(heads: Sequence[str], rows: list[list[str]], cls: str, verdict_col: int | None):
        out = [f'<table class="{cls}">', "<tr>" + "".join(f"<th>{e(h)}</th>" for h in heads)]
        for r in rows:
            cells = []
            for i, c in enumerate(r):
                css = f' class="{c.replace(" ", "-")}"' if i == verdict_col else ""
                cells.append(f"<td{css}>{e(c)}</td>")
            out.append("<tr>" + "".join(cells) + "</tr>")
        return out + ["</table>"]

    title = f"implreg report ({report.budget} budget)"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        "<ul>",
        *(f"<li>{e(k)}: {e(v)}</li>" for k, v in _header(report, times).items()),
        "</ul>",
        "<h2>Published vs measured</h2>",
        *table(CLAIM_HEADS, [_claim_cells(c) for c in report.claims], "claims", 9),
        "<h2>Theorem checks</h2>",
        *table(CHECK_HEADS, [_check_cells(r) for r in report.checks], "checks", 7),
        "<h2>Presets</h2>",
        *table(PRESET_HEADS, [_preset_cells(p) for p in report.presets], "presets", None),
        "<h2>Time of each part</h2>",
        *table(("part", "seconds"), [[k, f"{v:.1f}"] for k, v in times.items()], "times", None),
        "<h2>Figures</h2>",
    ]
    for p in report.presets:
        if p.figures:
            parts += [f'<h3 id="{e(p.name)}">{e(p.name)}</h3>', f"<p>{e(p.reproduces)}</p>"]
            parts += [
                f'<p><img src="{e(f)}" alt="{e(p.name)}: {e(Path(f).name)}"></p>' for f in p.figures
            ]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(report: Report, times_render_start: float | None = None) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``report.html`` into the report folder, each
    atomically (a reader sees the old file or the new one)."""
    times = report.times
    if times_render_start is not None:
        times["render"] = time.perf_counter() - times_render_start
    out = report.out_dir
    paths = {k: out / f"report.{k}" for k in ("json", "md", "html")}
    counts = report.counts()
    write_json(
        paths["json"],
        {
            "budget": report.budget,
            "counts": counts,
            "presets": [p.as_dict() for p in report.presets],
            "checks": report.checks,
            "times": times,
            "versions": versions(),
        },
    )
    for kind, text in (
        ("md", render_markdown(report, times)),
        ("html", render_html(report, times)),
    ):
        with atomic_path(paths[kind]) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return paths
