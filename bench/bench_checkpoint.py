"""Overhead of periodic checkpoints on the ``tf-dynamics`` run (issue 9 target: <= 3%).

The same fixed-length run (Figure 3's problem, ``tol=0`` so every variant does
exactly ``--iterations`` iterations) is timed, interleaved and repeated:

- ``off``: no periodic checkpoint (the reference, measured in the same run);
- ``default``: the default policy (every 60 s), what ``implreg run`` does;
- ``every N``: a checkpoint every N iterations (far more often than the default).

The cost of one checkpoint at the end of the run (the largest state: all
recorded component norms) is timed directly too, and the overhead of the
default interval is that cost over 60 s.

    python bench/bench_checkpoint.py                 # ~2 minutes
    python bench/bench_checkpoint.py --iterations 3000 --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from implreg.api import run_preset
from implreg.runs import CHECKPOINT, load_checkpoint, save_checkpoint


class StopAfter:
    """An interrupt flag raised after ``n`` checks (the loop checks once per iteration)."""

    def __init__(self, n: int):
        self.n = n

    def is_set(self) -> bool:
        self.n -= 1
        return self.n < 0


def timed_run(root: Path, name: str, iterations: int, **ckpt) -> tuple[float, Path]:
    out = root / name
    start = time.perf_counter()
    run_preset(
        "tf-dynamics",
        out=out,
        overrides={"tol": 0.0, "max_iterations": iterations},
        log=lambda *_: None,
        **ckpt,
    )
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=6000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--every", type=int, default=500)
    args = ap.parse_args()
    variants = {
        "off": {"checkpoint_every": 0, "checkpoint_seconds": 0.0},
        "default (60 s)": {},
        f"every {args.every} it": {"checkpoint_every": args.every, "checkpoint_seconds": 0.0},
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for r in range(args.repeats):
            for name, ckpt in variants.items():
                t, _ = timed_run(
                    root, f"{r}-{len(times[name])}-{name[:3]}", args.iterations, **ckpt
                )
                times[name].append(t)
        # One checkpoint of the largest state: a run interrupted at its last iteration.
        probe = root / "probe"
        run_preset(
            "tf-dynamics",
            out=probe,
            overrides={"tol": 0.0, "max_iterations": args.iterations + 1},
            log=lambda *_: None,
            interrupt=StopAfter(args.iterations),
        )
        costs = []
        state = None
        ck = probe / CHECKPOINT
        if ck.exists():
            state = load_checkpoint(probe)
        size = ck.stat().st_size / 2**20 if ck.exists() else 0.0
        if state is not None:
            for _ in range(5):
                start = time.perf_counter()
                save_checkpoint(probe, state)
                costs.append(time.perf_counter() - start)
    ref = statistics.median(times["off"])
    print(f"tf-dynamics, {args.iterations} iterations x 3 inits, {args.repeats} repeats (s):")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"  {name:<16} median {med:6.2f}  range {min(ts):6.2f}-{max(ts):6.2f}  "
            f"overhead vs off {100 * (med / ref - 1):+5.1f}%"
        )
    if costs:
        c = statistics.median(costs)
        print(
            f"one checkpoint of the final state ({size:.1f} MiB): median {1000 * c:.0f} ms "
            f"(range {1000 * min(costs):.0f}-{1000 * max(costs):.0f}); "
            f"default interval overhead {100 * c / 60:.2f}% (target <= 3%)"
        )


if __name__ == "__main__":
    main()
