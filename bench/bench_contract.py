"""Overhead of the experiment contract: ``run_preset`` against the bare training loop.

Runs a dynamics preset (default ``tf-dynamics``) twice in the same process,
alternating, ``--repeat`` times:

- reference: build the problem and call :func:`implreg.training.train` on it
  directly (no run folder, no config.json, no metrics files, no summary, no figures);
- implreg: ``implreg.api.run_preset`` (the whole run-folder lifecycle: checks,
  folder, config.json, training, metrics.csv + trajectories, summary, figures).

Prints both wall times, their ratio and the difference in seconds.  Usage:
``python bench/bench_contract.py [--preset tf-dynamics] [--set key=value ...]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from implreg.api import resolve, run_preset
from implreg.training import train


def bare(exp, cfg) -> float:
    start = time.perf_counter()
    dyn = exp.build(cfg, exp.prepare(cfg, "cpu"))
    train(
        params=dyn.params,
        loss_and_grad=dyn.loss_and_grad,
        optimizer=dyn.optimizer,
        stop=dyn.stop,
        recorder=dyn.recorder,
        evaluate=dyn.evaluate,
    )
    return time.perf_counter() - start


def full(cfg) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run_preset(cfg, out=Path(tmp) / "run", log=lambda *_: None)
        return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tf-dynamics")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    _, exp, cfg = resolve(args.preset, overrides=args.overrides)
    print(f"{args.preset}, torch threads {torch.get_num_threads()}")
    refs, runs = [], []
    for _ in range(args.repeat):
        refs.append(bare(exp, cfg))
        runs.append(full(cfg))
        print(
            f"  reference (bare train loop) {refs[-1]:6.2f} s, implreg run_preset {runs[-1]:6.2f} s"
        )
    ratios = [r / b for r, b in zip(runs, refs)]
    print(
        f"run_preset / bare loop: {min(ratios):.3f}-{max(ratios):.3f} "
        f"(overhead {min(runs) - min(refs):+.2f} s on the best of {args.repeat})"
    )


if __name__ == "__main__":
    main()
