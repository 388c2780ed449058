"""Wall time of a seed sweep (target: ``implreg sweep tf-dynamics --seeds 0-9`` <= 180 s here).

Runs ``implreg.seeds.seed_sweep`` into a scratch folder and prints its wall
time beside the reference measured in the same run: the sum of the seeds' own
run times (what one process running them one after another would spend on
training alone), so the ratio is the parallel speed-up of the backend.
Usage: ``python bench/bench_sweep.py [--preset tf-dynamics] [--seeds 0-9]
[--backend local|ray] [--set key=value ...]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from implreg.api import load
from implreg.seeds import parse_seeds, seed_sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tf-dynamics")
    ap.add_argument("--seeds", default="0-9")
    ap.add_argument("--backend", default="local")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    seeds = parse_seeds(args.seeds)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        res = seed_sweep(
            args.preset,
            seeds,
            out=Path(tmp) / "sweep",
            overrides=args.overrides,
            backend=args.backend,
        )
        wall = time.perf_counter() - start
        serial = sum(
            load(res.path / f"seed-{s}").summary["wall_seconds_this_session"] for s in seeds
        )
    print(res.text)
    print(
        f"implreg sweep {args.preset} --seeds {args.seeds} ({args.backend}): {wall:.1f} s wall; "
        f"target <= 180 s: {'MET' if wall <= 180 else 'NOT MET'}"
    )
    print(
        f"reference: the seeds' own run times add up to {serial:.1f} s (ratio {serial / wall:.2f}x)"
    )


if __name__ == "__main__":
    main()
