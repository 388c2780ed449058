"""Command line: ``implreg list | run | plot``.

Bad input (unknown preset or key, wrong type, impossible sizes, non-finite
values) is reported in one sentence with exit code 2 before any folder is
created.  Ctrl-C or SIGTERM during a run writes a checkpoint; ``implreg run
--resume RUN_DIR`` continues it bit-identically.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import shutil
import signal
import sys
from pathlib import Path

from implreg.experiments import EXPERIMENTS, PRESETS, get_preset
from implreg.experiments.config import ConfigError, from_mapping, to_mapping, with_overrides
from implreg.runs import (
    CHECKPOINT,
    CONFIG,
    SUMMARY,
    create_run_dir,
    read_json,
    versions,
    write_json,
)
from implreg.training import Interrupt


class UsageError(Exception):
    """Bad input: printed as one sentence, exit code 2."""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="implreg",
        description="Implicit regularization in tensor and matrix factorization: "
        "the published experiments, fast.",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the presets and the figures they reproduce")
    run = sub.add_parser("run", help="run a preset (or resume / redo a run folder)")
    run.add_argument("preset", nargs="?", help="preset name (see `implreg list`)")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a configuration value (repeatable)",
    )
    run.add_argument("--out", type=Path, help="run folder (default runs/PRESET-TIMESTAMP)")
    run.add_argument("--seed", type=int, help="random seed (problem and initialization)")
    run.add_argument(
        "--data-dir",
        type=Path,
        help="folder holding mnist/ and fashion-mnist/ IDX files (default: $IMPLREG_DATA_DIR)",
    )
    run.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run")
    run.add_argument(
        "--config",
        type=Path,
        metavar="CONFIG_JSON",
        help="redo the run described by a run folder's config.json",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    plot = sub.add_parser("plot", help="redraw the figures of a run folder")
    plot.add_argument("run_dir", type=Path)
    return ap


def _cmd_list() -> int:
    width = max(len(n) for n in PRESETS)
    for name, p in PRESETS.items():
        print(f"{name:<{width}}  {p.reproduces}\n{'':<{width}}  {p.description}")
    return 0


def _resolve(args) -> tuple[str, str, object]:
    """(preset name, experiment name, validated config) from the arguments."""
    if args.config is not None:
        if args.preset:
            raise UsageError("give either a preset or --config, not both")
        if not args.config.is_file():
            raise UsageError(f"no config file at {args.config}")
        saved = read_json(args.config)
        module = EXPERIMENTS.get(saved.get("experiment", ""))
        if module is None:
            raise UsageError(f"{args.config} names no known experiment")
        cfg = from_mapping(module.Config, saved["config"])
        preset_name = saved.get("preset", saved["experiment"])
        experiment = saved["experiment"]
    else:
        if not args.preset:
            raise UsageError(
                "name a preset to run (see `implreg list`), or use --resume / --config"
            )
        preset = get_preset(args.preset)
        cfg = preset.config
        preset_name, experiment = preset.name, preset.experiment
    cfg = with_overrides(cfg, args.overrides)
    if args.seed is not None:
        cfg = with_overrides(cfg, [f"seed={args.seed}"])
    if args.data_dir is not None:
        if "data_dir" not in {f.name for f in dataclasses.fields(cfg)}:
            raise UsageError(f"{preset_name} reads no data; --data-dir does not apply")
        cfg = dataclasses.replace(cfg, data_dir=str(args.data_dir.resolve()))
    return preset_name, experiment, cfg


def _cmd_run(args) -> int:
    if args.resume is not None:
        if (
            args.preset
            or args.overrides
            or args.config
            or args.seed is not None
            or args.data_dir is not None
        ):
            raise UsageError("--resume takes only the run folder; its config.json is used as saved")
        run_dir = args.resume
        if not (run_dir / CONFIG).is_file():
            raise UsageError(f"{run_dir} is not a run folder (no {CONFIG})")
        if (run_dir / SUMMARY).is_file():
            raise UsageError(f"the run in {run_dir} has already finished")
        saved = read_json(run_dir / CONFIG)
        experiment = saved["experiment"]
        module = EXPERIMENTS[experiment]
        cfg = from_mapping(module.Config, saved["config"])
        try:
            prepared = module.prepare(cfg)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        resume = True
    else:
        preset_name, experiment, cfg = _resolve(args)
        module = EXPERIMENTS[experiment]
        try:
            prepared = module.prepare(cfg)  # validates; raises before any folder exists
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = args.out if args.out is not None else Path("runs") / f"{preset_name}-{stamp}"
        try:
            create_run_dir(run_dir)
        except FileExistsError as exc:
            raise UsageError(str(exc)) from None
        write_json(
            run_dir / CONFIG,
            {
                "preset": preset_name,
                "experiment": experiment,
                "config": to_mapping(cfg),
                "seed": cfg.seed,
                "versions": versions(),
                "created": _dt.datetime.now().isoformat(timespec="seconds"),
            },
        )
        resume = False
    with Interrupt() as stop:
        print(f"run folder: {run_dir}", flush=True)  # signals are handled from here on
        try:
            result = module.run(
                cfg,
                run_dir,
                prepared=prepared,
                resume=resume,
                progress=not args.no_progress,
                interrupt=stop,
            )
        except BaseException:
            finished_units = any((run_dir / "units").glob("*.json"))
            if not resume and not (run_dir / CHECKPOINT).exists() and not finished_units:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
    if result["interrupted"]:
        print(
            f"interrupted at iteration {result['iteration']}; checkpoint written. "
            f"Resume with: implreg run --resume {run_dir}",
            file=sys.stderr,
        )
        return 128 + (stop.signum or signal.SIGINT)
    print(module.summary_text(result["summary"]))
    print(f"figures and metrics in {run_dir}")
    return result["exit_code"]


def _cmd_plot(args) -> int:
    run_dir = args.run_dir
    if not (run_dir / CONFIG).is_file():
        raise UsageError(f"{run_dir} is not a run folder (no {CONFIG})")
    saved = read_json(run_dir / CONFIG)
    module = EXPERIMENTS.get(saved.get("experiment", ""))
    if module is None:
        raise UsageError(f"{run_dir} names no known experiment")
    for p in module.plot(run_dir):
        print(p)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            return _cmd_list()
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "plot":
            return _cmd_plot(args)
    except (UsageError, ConfigError) as exc:
        print(f"implreg: error: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
