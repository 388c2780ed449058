"""Command line: ``implreg list | show | run | sweep | plot | check | report``, a thin layer
over :mod:`implreg.api` (and :mod:`implreg.checks`, :mod:`implreg.report`).

Bad input (unknown preset or key, wrong type, impossible sizes, non-finite
values) is reported in one sentence with exit code 2 before any folder is
created.  Ctrl-C or SIGTERM during a run stops it at a safe point;
``implreg run --resume RUN_DIR`` continues it bit-identically.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from implreg.backends import BACKENDS
from implreg.config import ConfigError, describe


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="implreg",
        description="Implicit regularization in tensor and matrix factorization: "
        "the published experiments, fast.",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the presets and the figures they reproduce")
    show = sub.add_parser("show", help="every key of a preset: type, default, allowed values")
    show.add_argument("preset")
    run = sub.add_parser("run", help="run a preset (or resume / redo a run folder)")
    run.add_argument("preset", nargs="?", help="preset name (see `implreg list`)")
    run.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run")
    run.add_argument(
        "--config",
        type=Path,
        metavar="CONFIG_JSON",
        help="redo the run described by a run folder's config.json",
    )
    sweep = sub.add_parser("sweep", help="run a preset over seeds and aggregate")
    sweep.add_argument("preset", help="preset name (see `implreg list`)")
    sweep.add_argument("--seeds", required=True, help="seeds: 0-9, or 1,4,7, or 0-4,10")
    for p in (run, sweep):
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a configuration value (repeatable)",
        )
        p.add_argument("--out", help="run folder (default runs/PRESET-TIMESTAMP)")
        p.add_argument(
            "--data-dir",
            type=Path,
            help="folder holding mnist/ and fashion-mnist/ IDX files (default: $IMPLREG_DATA_DIR)",
        )
        p.add_argument("--backend", default="local", help=f"{' | '.join(BACKENDS)} (default local)")
        p.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="refuse runs estimated to need more (e.g. 4G; default: the free memory)",
    )
    run.add_argument(
        "--threads", type=int, metavar="N", help="torch threads (default: the thread policy)"
    )
    run.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="ITER",
        help="also write a checkpoint every ITER iterations (default: by time only)",
    )
    run.add_argument(
        "--checkpoint-seconds",
        type=float,
        default=60.0,
        metavar="SEC",
        help="write a checkpoint every SEC seconds (default 60; kill -9 loses at most this)",
    )
    run.add_argument("--seed", type=int, help="random seed (problem and initialization)")
    plot = sub.add_parser("plot", help="redraw the figures of a run folder")
    plot.add_argument("run_dir", type=Path)
    check = sub.add_parser(
        "check", help="check the papers' lemmas and theorems along gradient-flow trajectories"
    )
    check.add_argument(
        "--only", metavar="NAMES", help="comma-separated checks (default: all; see --list)"
    )
    check.add_argument("--list", action="store_true", help="list the checks and exit")
    check.add_argument("--seed", type=int, default=0, help="random instance (default 0)")
    check.add_argument(
        "--out", type=Path, help="also write checks.json and checks.md into this folder"
    )
    report = sub.add_parser(
        "report",
        help="run every preset at a budget; one HTML page (and Markdown) of published vs measured",
    )
    report.add_argument(
        "--budget", required=True, help="reduced (minutes) | full (the published settings)"
    )
    report.add_argument("--out", type=Path, default=Path("report"), help="folder (default report)")
    report.add_argument(
        "--data-dir",
        type=Path,
        help="folder holding mnist/ and fashion-mnist/ (presets that read it are skipped without)",
    )
    report.add_argument("--only", metavar="PRESETS", help="comma-separated presets (default all)")
    report.add_argument(
        "--backend", default="local", help=f"{' | '.join(BACKENDS)} (default local)"
    )
    report.add_argument(
        "--seeds", help="also run seeded presets over these seeds (0-2): median and IQR per claim"
    )
    report.add_argument(
        "--threads", type=int, metavar="N", help="torch threads per run (default: the policy)"
    )
    report.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="presets run side by side, each in its own process (default 1)",
    )
    report.add_argument(
        "--rerun", action="store_true", help="set earlier runs in --out aside and run again"
    )
    return ap


def _cmd_list() -> int:
    from implreg.experiments import PRESETS

    width = max(len(n) for n in PRESETS)
    for name, p in PRESETS.items():
        print(f"{name:<{width}}  {p.reproduces}\n{'':<{width}}  {p.description}")
    return 0


def _cmd_show(args) -> int:
    from implreg.experiments import get_preset

    preset = get_preset(args.preset)
    assert preset.experiment is not None
    print(f"{preset.name}: {preset.reproduces}\n{preset.description}")
    print(f"experiment: {preset.experiment.name}\n")
    rows = describe(preset.config)
    heads = {"key": "key", "type": "type", "value": "default", "allowed": "allowed / bounds"}
    for r in rows:
        r["allowed"] = r["allowed"] or r["bounds"]
    widths = {k: max(len(h), *(min(len(r[k]), 40) for r in rows)) for k, h in heads.items()}
    print("  ".join(f"{h:<{widths[k]}}" for k, h in heads.items()) + "  meaning")
    for r in rows:
        cells = [f"{r[k]:<{widths[k]}}" for k in heads]
        print("  ".join(cells) + f"  {r['doc']}")
    return 0


def _cmd_run(args) -> int:
    from implreg.api import run_preset

    if args.resume is not None:
        given = args.preset or args.overrides or args.config or args.seed is not None
        given = given or args.out is not None
        if given or args.data_dir is not None:
            raise ConfigError(
                "--resume takes only the run folder; its config.json is used as saved"
            )
        target = None
    elif args.config is not None:
        if args.preset:
            raise ConfigError("give either a preset or --config, not both")
        target = args.config
    else:
        target = args.preset
    run = run_preset(
        target,
        out=args.resume if args.resume is not None else args.out,
        seed=args.seed,
        overrides=args.overrides,
        resume=args.resume is not None,
        data_dir=args.data_dir.resolve() if args.data_dir is not None else None,
        device=args.device,
        backend=args.backend,
        progress=not args.no_progress,
        log=lambda msg: print(msg, flush=True),
        checkpoint_every=args.checkpoint_every,
        checkpoint_seconds=args.checkpoint_seconds,
        max_memory=args.max_memory,
        threads=args.threads,
    )
    outcome = run.outcome
    assert outcome is not None
    if outcome.interrupted:
        print(
            f"interrupted ({outcome.where}). Resume with: implreg run --resume {run.path}",
            file=sys.stderr,
        )
        return 128 + (run.signum or signal.SIGINT)
    print(run.summary_text())
    print(f"figures and metrics in {run.path}")
    return outcome.exit_code


def _cmd_sweep(args) -> int:
    from implreg.seeds import parse_seeds, seed_sweep

    result = seed_sweep(
        args.preset,
        parse_seeds(args.seeds),
        out=args.out,
        overrides=args.overrides,
        data_dir=args.data_dir.resolve() if args.data_dir is not None else None,
        backend=args.backend,
        device=args.device,
        progress=not args.no_progress,
    )
    if result.interrupted:
        print(f"interrupted; resume with the same command and --out {result.path}", file=sys.stderr)
        return 130
    print(result.text)
    print(f"aggregate and figure in {result.path}")
    return 0


def _cmd_check(args) -> int:
    from implreg.checks import CHECKS, markdown_table, run_checks
    from implreg.runs import atomic_path, write_json

    if args.list:
        for name, fn in CHECKS.items():
            print(f"{name:20s} {(fn.__doc__ or '').strip().splitlines()[0]}")
        return 0
    names = None
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in CHECKS]
        if unknown or not names:
            raise ConfigError(
                f"--only: unknown check {unknown[0] if unknown else args.only!r}; "
                f"the checks are {', '.join(CHECKS)}"
            )
    if args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {args.seed}")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} exists and is not a folder")
    results = run_checks(names, seed=args.seed, log=print)
    failed = [r.name for r in results if not r.passed]
    print(
        f"{len(results) - len(failed)} of {len(results)} checks pass"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "checks.json", {"checks": [r.as_dict() for r in results]})
        with atomic_path(args.out / "checks.md") as tmp:
            tmp.write_text(markdown_table(results) + "\n")
        print(f"tables in {args.out}")
    return 1 if failed else 0


def _cmd_report(args) -> int:
    from implreg.report import ReportInterrupted, build_report, check_inputs
    from implreg.runs import RunLock
    from implreg.seeds import parse_seeds

    names = None
    if args.only is not None:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    check_inputs(args.budget, names, args.out, args.data_dir, args.backend, seeds, None, args.jobs)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create --out {args.out}: {exc.strerror or exc}") from None
    try:
        with RunLock(args.out):
            report = build_report(
                args.out,
                args.budget,
                presets=names,
                data_dir=args.data_dir,
                backend=args.backend,
                reuse=not args.rerun,
                log=lambda msg: print(msg, flush=True),
                seeds=seeds,
                threads=args.threads,
                jobs=args.jobs,
            )
    except ReportInterrupted as exc:
        print(f"implreg: interrupted: {exc}; the same command resumes", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"implreg: error: the report could not be written: {exc}", file=sys.stderr)
        return 1
    c = report.counts()
    print(f"claims: {c['pass']} pass, {c['FAIL']} FAIL, {c['not run']} not run")
    print(f"report: {report.paths['html']} and {report.paths['md']}")
    return 0


def _cmd_plot(args) -> int:
    from implreg.api import load

    run = load(args.run_dir)
    if not run.finished:
        raise ConfigError(f"the run in {args.run_dir} has not finished; nothing to plot")
    for p in run.plot():
        print(p)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-sentence errors (``implreg: error: ...``, exit 2) and no usage dump."""

    def error(self, message: str):  # type: ignore[override]
        print(f"implreg: error: {message} (see implreg {self._sub_name()}--help)", file=sys.stderr)
        raise SystemExit(2)

    def _sub_name(self) -> str:
        words = self.prog.split()[1:]
        return " ".join(words) + " " if words else ""


def main(argv: list[str] | None = None) -> int:
    """The command line; exit 0 done, 1 failed (a run diverged, a file could not be
    written), 2 refused input, 130 / 143 interrupted.  Never a traceback for these."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C outside a run (imports, data loading, plotting)
        print("implreg: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    from implreg.allocator import env_error
    from implreg.api import RunError

    try:
        bad_env = env_error()
        if bad_env is not None:
            raise ConfigError(bad_env)
        if args.command == "list":
            return _cmd_list()
        if args.command == "show":
            return _cmd_show(args)
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "sweep":
            return _cmd_sweep(args)
        if args.command == "plot":
            return _cmd_plot(args)
        if args.command == "check":
            return _cmd_check(args)
        if args.command == "report":
            return _cmd_report(args)
    except ConfigError as exc:
        print(f"implreg: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except RunError as exc:
        print(f"implreg: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    return 2


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


if __name__ == "__main__":
    sys.exit(main())
