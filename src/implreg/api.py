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

import csv
import dataclasses
import datetime as _dt
import shutil
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
    CHECKPOINT,
    CONFIG,
    SUMMARY,
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
        return self.experiment.plot(self.path)

    def summary_text(self) -> str:
        s = self.summary
        return self.experiment.summary_text(s) if s is not None else "the run has not finished"


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
        exp = get_experiment(saved["experiment"])
        cfg = from_mapping(exp.Config, saved["config"])
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
    if has_data:
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
    path = Path(run_dir)
    if not (path / CONFIG).is_file():
        raise ConfigError(f"{path} is not a run folder (no {CONFIG})")
    saved = _read_config(path / CONFIG)
    exp = get_experiment(saved["experiment"])
    cfg = from_mapping(exp.Config, saved["config"])
    preset = str(saved.get("preset", exp.name))
    return Run(path, preset, exp, cfg, str(saved.get("device", "cpu")), info=saved)


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
) -> Run:
    """Run a preset (a name, a config dataclass or a ``config.json``) into a run folder.

    ``resume=True`` continues the unfinished run in ``out`` with its saved
    configuration (nothing else may be given).  Signals (SIGINT / SIGTERM) stop
    the run at the next safe point when ``interrupt`` is not given and this is
    the main thread; the returned :class:`Run` then has ``interrupted`` set and
    ``implreg.run_preset(out=..., resume=True)`` continues it.
    """
    from implreg.training import Interrupt

    _check_backend(backend)
    if resume:
        if out is None:
            raise ConfigError("resume needs the run folder (out)")
        if name_or_config is not None or overrides or seed is not None or data_dir is not None:
            raise ConfigError("resume takes only the run folder; its config.json is used as saved")
        run = load(out)
        if run.finished:
            raise ConfigError(f"the run in {out} has already finished")
        _check_device(run.device)
        prepared = _prepare(run.experiment, run.config, run.device)
    else:
        if name_or_config is None:
            raise ConfigError("name a preset to run (see `implreg list`), or resume a run folder")
        _check_device(device)
        preset, exp, cfg = resolve(
            name_or_config, overrides=overrides, seed=seed, data_dir=data_dir
        )
        if device not in exp.devices:
            raise ConfigError(f"{preset} runs on {' or '.join(exp.devices)} only, not {device}")
        if out is not None and str(out) == "":
            raise ConfigError("out must name a folder, got ''")
        prepared = _prepare(exp, cfg, device)  # checks data; raises before any folder exists
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(out) if out is not None else Path("runs") / f"{preset}-{stamp}"
        try:
            create_run_dir(path)
        except FileExistsError as exc:
            raise ConfigError(str(exc)) from None
        except OSError as exc:
            raise ConfigError(f"cannot create the run folder {path}: {exc.strerror}") from None
        info = {
            "preset": preset,
            "experiment": exp.name,
            "config": to_mapping(cfg),
            "seed": cfg.seed,
            "device": device,
            "versions": versions(),
            "created": _dt.datetime.now().isoformat(timespec="seconds"),
        }
        write_json(path / CONFIG, info)
        run = Run(path, preset, exp, cfg, device, info=info)
    ctx = RunContext(
        run.path,
        resume=resume,
        progress=progress,
        log=log,
        backend=backend,
        device=run.device,
    )
    with Interrupt() if interrupt is None else _Given(interrupt) as stop:
        ctx.interrupt = stop
        log(f"run folder: {run.path}")  # signals are handled from here on
        try:
            run.outcome = run.experiment.run(run.config, prepared, ctx)
            run.signum = getattr(stop, "signum", None)
        except BaseException:
            keep = (run.path / CHECKPOINT).exists() or run.experiment.has_finished_work(run.path)
            if not resume and not keep:
                shutil.rmtree(run.path, ignore_errors=True)
            raise
    return run


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
    opts = {k: kwargs.pop(k) for k in list(kwargs) if k in options}
    opts.setdefault("log", lambda *_: None)
    return run_preset(preset, out=out, overrides=kwargs, **opts)
