"""Start-up overhead of the ``ray`` backend: a local Ray started and shut down per grid.

Maps a trivial function over 16 items with :func:`implreg.ray_backend.map_ray`
(which starts a local Ray and shuts it down again) and with the local process
pool, :func:`implreg.backends.map_local`, in the same run; the overhead is the
difference of the two wall times (both include importing torch in the workers).
Repeated ``--repeats`` times.

    python bench/bench_ray.py           # target: overhead <= 10 s
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

# The driver imports torch before any Ray start-up, as implreg's drivers do: a
# process that started and shut down Ray a few times and then forks children
# that import torch for the first time sees them crash (SIGSEGV), and the
# local pool then waits forever for their lost items.
import torch  # noqa: F401

from implreg.backends import default_threads, map_local
from implreg.ray_backend import _import_ray, map_ray


def trivial(x: int) -> int:
    return x


def wall(mapper: Callable[..., bool], items: list[int], workers: int) -> float:
    """Seconds of one ``mapper`` call over ``items`` (all results received)."""
    got: dict[int, int] = {}
    start = time.perf_counter()
    mapper(
        trivial,
        items,
        workers=workers,
        threads=default_threads(workers),
        on_result=got.__setitem__,
    )
    seconds = time.perf_counter() - start
    assert got == {i: x for i, x in enumerate(items)}
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ray = _import_ray()
    items = list(range(args.items))
    overheads, ratios = [], []
    for k in range(args.repeats):
        local = wall(map_local, items, args.workers)
        remote = wall(map_ray, items, args.workers)
        assert not ray.is_initialized()
        overheads.append(remote - local)
        ratios.append(remote / local)
        print(
            f"repeat {k + 1}: ray {remote:.2f} s, local pool {local:.2f} s, "
            f"overhead {remote - local:.2f} s, ratio {remote / local:.1f}x",
            flush=True,
        )
    worst = max(overheads)
    print(
        f"ray {ray.__version__}, {args.items} trivial items, {args.workers} workers: "
        f"start-up overhead {min(overheads):.2f}-{worst:.2f} s, "
        f"ratio {min(ratios):.1f}-{max(ratios):.1f}x; target <= 10 s: "
        f"{'MET' if worst <= 10 else 'NOT MET'}"
    )


if __name__ == "__main__":
    main()
