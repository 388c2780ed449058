"""The Python run API: everything the command line does, as functions.

>>> import implreg
>>> run = implreg.run("tf-dynamics", rank=200, out="runs/mine")   # doctest: +SKIP
>>> run.summary["runs"][0]["n_learned"], run.figures                # doctest: +SKIP
>>> again = implreg.load("runs/mine")                               # doctest: +SKIP

:func:`run_preset` owns the run-folder lifecycle: it validates the
configuration and builds the problem before any folder exists, creates the
folder, writes ``config.json`` (the fully resolved configuration with an
absolute ``data_dir``, the seed, the device, the versions), runs the
experiment (resumable after Ctrl-C / SIGTERM), and on a failure removes the
folder only when it holds no finished work.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as _dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from implreg.backends import BACKENDS, InterruptFlag
from implreg.config import ConfigError, check, from_mapping, to_mapping, with_overrides
from implreg.experiments import (
    Experiment,
    experiment_of,
    get_experiment,
    get_preset,
)
from implreg.experiments.base import Outcome, RunContext
from implreg.runs import (
    CONFIG,
    SUMMARY,
    DamagedRunError,
    RunLock,
    create_run_dir,
    read_json,
    versions,
    write_json,
)

DEVICES = ("cpu", "cuda")


@dataclass
class Run:
    """A run folder and what it holds: configuration, summary, metrics, figures."""

    path: Path
    preset: str
    experiment: Experiment
    config: Any
    device: str = "cpu"
    outcome: Outcome | None = None
    info: dict = field(default_factory=dict)
    signum: int | None = None  # the signal that interrupted the run, if any

    @property
    def finished(self) -> bool:
        return (self.path / SUMMARY).is_file()

    @property
    def summary(self) -> dict | None:
        if self.outcome is not None and self.outcome.summary is not None:
            return self.outcome.summary
        return read_json(self.path / SUMMARY) if self.finished else None

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def figures(self) -> list[Path]:
        return sorted(self.path.glob("*.png"))

    @property
    def interrupted(self) -> bool:
        return self.outcome is not None and self.outcome.interrupted

    @property
    def exit_code(self) -> int:
        return self.outcome.exit_code if self.outcome is not None else 0

    def metrics(self) -> dict[str, list]:
        """The run's table (``metrics.csv`` or its experiment's table) as columns.

        Numbers are parsed (int, then float); ready for ``pandas.DataFrame(run.metrics())``.
        """
        path = self.path / self.experiment.table
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: the run has not finished")
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        cols: dict[str, list] = {k: [] for k in (rows[0] if rows else {})}
        for r in rows:
            for k, v in r.items():
                cols[k].append(_number(v))
        return cols

    def plot(self) -> list[Path]:
        """Redraw the figures from the folder; a damaged file is a one-sentence error."""
        try:
            return self.experiment.plot(self.path)
        except ConfigError:
            raise
        except OSError as exc:
            where = exc.filename or self.path
            raise RunError(f"cannot write {where}: {_reason(exc)}") from None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise DamagedRunError(
                f"the figures of {self.path} cannot be drawn: a file of the run is damaged "
                f"({type(exc).__name__}: {exc})"
            ) from None

    def summary_text(self) -> str:
        s = self.summary
        if s is None:
            return "the run has not finished"
        text = self.experiment.summary_text(s)
        return "\n".join([text, *(f"PROBLEM: {p}" for p in s.get("problems", []))])


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return None if text == "" else text


def resolve(
    name_or_config: str | Path | Any,
    *,
    overrides: Iterable[str] | Mapping[str, Any] = (),
    seed: int | None = None,
    data_dir: str | Path | None = None,
) -> tuple[str, Experiment, Any]:
    """(preset name, experiment, checked config) from a preset name, a config or a config.json."""
    if isinstance(name_or_config, Path) or (
        isinstance(name_or_config, str) and name_or_config.endswith(".json")
    ):
        path = Path(name_or_config)
        if not path.is_file():
            raise ConfigError(f"no config file at {path}")
        saved = _read_config(path)
        exp = _experiment_named(saved["experiment"], path)
        try:
            cfg = from_mapping(exp.Config, saved["config"])
            check(cfg)
        except ConfigError as exc:
            raise ConfigError(f"{path} holds an invalid config: {exc}") from None
        preset = str(saved.get("preset", exp.name))
    elif isinstance(name_or_config, str):
        p = get_preset(name_or_config)
        assert p.experiment is not None
        exp, cfg, preset = p.experiment, p.config, p.name
    elif dataclasses.is_dataclass(name_or_config):
        exp = experiment_of(name_or_config)
        cfg, preset = name_or_config, exp.name
    else:
        raise ConfigError(f"cannot run {name_or_config!r}: give a preset name, a config or a path")
    cfg = with_overrides(cfg, overrides)
    if seed is not None:
        cfg = with_overrides(cfg, {"seed": seed})
    has_data = "data_dir" in {f.name for f in dataclasses.fields(cfg)}
    if data_dir is not None:
        if not has_data:
            raise ConfigError(f"{preset} reads no data; data_dir does not apply")
        cfg = dataclasses.replace(cfg, data_dir=str(data_dir))
    if has_data and hasattr(cfg, "resolve_paths"):  # paths it reads, made absolute
        cfg = cfg.resolve_paths()
    if has_data and getattr(cfg, "needs_data_dir", lambda: True)():
        from implreg.problems.images import resolve_data_dir

        try:
            root = resolve_data_dir(cfg.data_dir).resolve()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        cfg = dataclasses.replace(cfg, data_dir=str(root))
    check(cfg)
    return preset, exp, cfg


def _read_config(path: Path) -> dict:
    try:
        saved = read_json(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{path} is not a readable config.json ({exc.__class__.__name__})"
        ) from None
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise ConfigError(f"{path} is not an implreg config.json (no 'config' object)")
    if not isinstance(saved.get("experiment"), str):
        raise ConfigError(f"{path} names no experiment")
    return saved


def _experiment_named(name: str, path: Path) -> Experiment:
    try:
        return get_experiment(name)
    except ConfigError as exc:
        raise ConfigError(f"{path} names {exc}") from None


def _check_device(device: str) -> str:
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("device cuda was asked for but torch sees no CUDA device")
    return device


def _check_backend(backend: str) -> None:
    import importlib.util

    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError("the ray backend needs Ray: pip install 'implreg[ray]'")
    if backend == "slurm" and importlib.util.find_spec("submitit") is None:
        raise ConfigError("the slurm backend needs submitit: pip install 'implreg[slurm]'")


def _prepare(exp: Experiment, cfg: Any, device: str) -> Any:
    """``exp.prepare``; a ValueError there (bad data, scales) is a configuration problem."""
    try:
        return exp.prepare(cfg, device)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def load(run_dir: str | Path) -> Run:
    """The run in ``run_dir`` (finished or not), from its ``config.json``."""
    if not isinstance(run_dir, (str, Path)) or str(run_dir).strip() == "":
        raise ConfigError(f"run_dir must name a run folder, got {run_dir!r}")
    path = Path(run_dir)
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a folder"
        raise ConfigError(f"{path} {what}; give a run folder")
    if not (path / CONFIG).is_file():
        raise ConfigError(f"{path} is not a run folder (no {CONFIG})")
    saved = _read_config(path / CONFIG)
    exp = _experiment_named(saved["experiment"], path / CONFIG)
    try:
        cfg = from_mapping(exp.Config, saved["config"])
        check(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{path / CONFIG} holds an invalid config: {exc}") from None
    device = saved.get("device", "cpu")
    if device not in DEVICES:
        raise ConfigError(f"{path / CONFIG} names an unknown device {device!r}")
    preset = str(saved.get("preset", exp.name))
    return Run(path, preset, exp, cfg, device, info=saved)


def run_preset(
    name_or_config: str | Path | Any | None = None,
    *,
    out: str | Path | None = None,
    seed: int | None = None,
    overrides: Iterable[str] | Mapping[str, Any] = (),
    resume: bool = False,
    data_dir: str | Path | None = None,
    device: str = "cpu",
    backend: str = "local",
    progress: bool = False,
    interrupt: InterruptFlag | None = None,
    log=print,
    checkpoint_every: int = 0,
    checkpoint_seconds: float = 60.0,
    max_memory: int | str | None = None,
    threads: int | None = None,
) -> Run:
    """Run a preset (a name, a config dataclass or a ``config.json``) into a run folder.

    ``resume=True`` continues the unfinished run in ``out`` with its saved
    configuration (nothing else may be given).  Signals (SIGINT / SIGTERM) stop
    the run at the next safe point when ``interrupt`` is not given and this is
    the main thread; the returned :class:`Run` then has ``interrupted`` set and
    ``implreg.run_preset(out=..., resume=True)`` continues it.

    Crash safety: long runs write ``checkpoint.pt`` every ``checkpoint_every``
    iterations and every ``checkpoint_seconds`` seconds (atomically, fsynced),
    so a kill -9 loses at most one interval; grids keep every finished unit.
    One process at a time holds a run folder (a ``.lock``); a second is refused.
    A failure never deletes finished work: a fresh folder is removed only while
    it holds nothing but its ``config.json``.  ``max_memory`` (bytes, or "4G")
    replaces the free memory as the limit of the up-front memory check;
    ``threads`` overrides the thread policy (:mod:`implreg.threads`).
    """
    from implreg.resources import check_memory, parse_size
    from implreg.training import Interrupt

    _check_backend(backend)
    _check_int("checkpoint_every", checkpoint_every, 0)
    if not (isinstance(checkpoint_seconds, (int, float)) and checkpoint_seconds >= 0):
        raise ConfigError(f"checkpoint_seconds must be a number >= 0, got {checkpoint_seconds!r}")
    if threads is not None:
        _check_int("threads", threads, 1)
    limit = parse_size(max_memory) if max_memory is not None else None
    lock = None
    if resume:
        if out is None:
            raise ConfigError("resume needs the run folder (out)")
        if name_or_config is not None or overrides or seed is not None or data_dir is not None:
            raise ConfigError("resume takes only the run folder; its config.json is used as saved")
        run = load(out)
        if run.finished:
            raise ConfigError(f"the run in {out} has already finished")
        _check_device(run.device)
        check_memory(
            run.experiment.memory_estimate(run.config),
            device=run.device,
            max_memory=limit,
            name=f"{run.preset} in {run.path}",
        )
        lock = RunLock(run.path).acquire()
        for stale in run.path.glob(".*.tmp"):  # left by a process killed mid-write
            stale.unlink(missing_ok=True)
        try:
            prepared = _prepare(run.experiment, run.config, run.device)
        except BaseException:
            lock.release()
            raise
    else:
        if name_or_config is None:
            raise ConfigError("name a preset to run (see `implreg list`), or resume a run folder")
        _check_device(device)
        preset, exp, cfg = resolve(
            name_or_config, overrides=overrides, seed=seed, data_dir=data_dir
        )
        if device not in exp.devices:
            raise ConfigError(f"{preset} runs on {' or '.join(exp.devices)} only, not {device}")
        if out is not None and str(out).strip() == "":
            raise ConfigError("out must name a folder, got ''")
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(out) if out is not None else Path("runs") / f"{preset}-{stamp}"
        _check_out(path)
        from_file = isinstance(name_or_config, (str, Path)) and str(name_or_config).endswith(
            ".json"
        )
        check_memory(
            exp.memory_estimate(cfg),
            device=device,
            max_memory=limit,
            name=f"{preset} of {name_or_config}" if from_file else preset,
        )
        prepared = _prepare(exp, cfg, device)  # checks data; raises before any folder exists
        fresh = not path.exists()
        try:
            path, lock = create_run_dir(path)
        except FileExistsError as exc:
            raise ConfigError(str(exc)) from None
        except OSError as exc:
            if fresh and path.is_dir():
                _remove_new_folder(path, None, fresh)
            raise ConfigError(f"cannot create the run folder {path}: {_reason(exc)}") from None
        info = {
            "preset": preset,
            "experiment": exp.name,
            "config": to_mapping(cfg),
            "seed": cfg.seed,
            "device": device,
            "versions": versions(),
            "created": _dt.datetime.now().isoformat(timespec="seconds"),
        }
        try:
            write_json(path / CONFIG, info)
        except OSError as exc:
            _remove_new_folder(path, lock, fresh)
            raise RunError(f"cannot write {path / CONFIG}: {_reason(exc)}") from None
        run = Run(path, preset, exp, cfg, device, info=info)
    ctx = RunContext(
        run.path,
        resume=resume,
        progress=progress,
        log=log,
        backend=backend,
        device=run.device,
        checkpoint_every=checkpoint_every,
        checkpoint_seconds=float(checkpoint_seconds),
        threads=threads,
    )
    try:
        with Interrupt() if interrupt is None else _Given(interrupt) as stop:
            ctx.interrupt = stop
            log(f"run folder: {run.path}")  # signals are handled from here on
            try:
                run.outcome = run.experiment.run(run.config, prepared, ctx)
                run.signum = getattr(stop, "signum", None)
            except Exception as exc:  # not KeyboardInterrupt/SystemExit: the folder stays
                removed = not resume and _holds_nothing(run.path)
                if removed:
                    _remove_new_folder(run.path, lock, fresh)
                    lock = None
                if isinstance(exc, OSError):
                    kept = (
                        "nothing was finished"
                        if removed
                        else f"what the run finished is kept in {run.path}"
                    )
                    raise RunError(
                        f"cannot write {exc.filename or run.path}: {_reason(exc)}; {kept}"
                    ) from None
                raise
    finally:
        if lock is not None:
            lock.release()
    return run


class RunError(RuntimeError):
    """A run that could not complete (out of space, no permission), in one sentence; exit 1."""


def _reason(exc: OSError) -> str:
    import errno

    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied" if exc.errno != errno.EROFS else "read-only file system"
    return (exc.strerror or str(exc)).rstrip(".").lower() or type(exc).__name__


def _holds_nothing(path: Path) -> bool:
    """Whether a run folder holds nothing but its ``config.json`` and lock (nothing to lose)."""
    try:
        return all(_disposable(p) for p in path.iterdir())
    except OSError:
        return False


def _disposable(p: Path) -> bool:
    return p.name in (CONFIG, RunLock.NAME) or p.name.endswith(".tmp")


def _remove_new_folder(path: Path, lock, fresh: bool) -> None:
    """Undo :func:`create_run_dir` for a run that wrote nothing of value."""
    for p in list(path.iterdir()) if path.is_dir() else []:
        if _disposable(p):
            p.unlink(missing_ok=True)
    if lock is not None:
        lock.release()
    if fresh:
        with contextlib.suppress(OSError):
            path.rmdir()


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_out(path: Path) -> None:
    """Refuse an --out that cannot become a run folder (under a file, in /proc), before any work."""
    for parent in [path, *path.parents]:
        if parent.exists():
            if parent != path and not parent.is_dir():
                raise ConfigError(f"cannot create the run folder {path}: {parent} is a file")
            break
    real = path.resolve()
    if real.parts[:2] in (("/", "proc"), ("/", "sys"), ("/", "dev")):
        raise ConfigError(f"cannot create the run folder {path}: {real.parts[1]} is not for files")


class _Given:
    """A caller's interrupt flag used as the context manager :class:`Interrupt` is."""

    def __init__(self, flag: InterruptFlag):
        self.flag = flag
        self.signum = getattr(flag, "signum", None)

    def __enter__(self):
        return self.flag

    def __exit__(self, *exc) -> None:
        return None


def run(preset: str | Path | Any, *, out: str | Path | None = None, **kwargs: Any) -> Run:
    """``implreg.run("tf-dynamics", rank=200, out="runs/x")``: keywords that are not options
    of :func:`run_preset` (seed, data_dir, device, backend, progress, resume) are config keys."""
    options = {"seed", "data_dir", "device", "backend", "progress", "resume", "interrupt", "log"}
    options |= {"checkpoint_every", "checkpoint_seconds", "max_memory", "threads"}
    opts = {k: kwargs.pop(k) for k in list(kwargs) if k in options}
    opts.setdefault("log", lambda *_: None)
    return run_preset(preset, out=out, overrides=kwargs, **opts)
