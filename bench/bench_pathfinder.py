"""Images per second of the Pathfinder generator (one core), LRA32 and paper scale.

Times ``generate(n, length, params, seed)`` a few times per setting, after one
warm-up call (which loads, or on the very first run compiles, the numba loop),
and prints the range over the repeats.

    python bench/bench_pathfinder.py             # target: >= 100 images/s at LRA32, length 14
    python bench/bench_pathfinder.py --n 2000 --repeats 3
"""

from __future__ import annotations

import argparse
import time

from implreg.problems.pathfinder import generate

SETTINGS = (("lra32", 6), ("lra32", 9), ("lra32", 14), ("paper", 3), ("paper", 9))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=500, help="images per timed call")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    start = time.perf_counter()
    generate(1, 6, "lra32", 0)
    print(f"first call (numba load or compile): {time.perf_counter() - start:.2f} s")
    for name, length in SETTINGS:
        generate(5, length, name, 0)
        rates = []
        for rep in range(args.repeats):
            start = time.perf_counter()
            generate(args.n, length, name, 1000 + rep)
            rates.append(args.n / (time.perf_counter() - start))
        target = ""
        if (name, length) == ("lra32", 14):
            target = f"  target >= 100: {'MET' if min(rates) >= 100 else 'NOT MET'}"
        print(
            f"{name:6s} length {length:2d}: {min(rates):7.0f} - {max(rates):7.0f} images/s "
            f"(n={args.n}, {args.repeats} repeats){target}"
        )


if __name__ == "__main__":
    main()
