"""The Figure 4 fit's two products by table look-up against torch's GEMM, same run.

Razin, Maman & Cohen (ICML 2021), Figure 4: every L-BFGS evaluation of the tensor-rank
fit takes ``Z = X W`` (log-terms) and ``X^T G`` (gradient) with the MNIST training
features ``X`` (60000 x 676 live binary pixels) and ``K`` = tasks x rank columns.  The
reference is what the dense engine does (``engine="dense"`` of
:func:`implreg.factorizations.cp_exp.fit_exp_sum`): float32 GEMMs with the standardized
features, ``feats @ W.T`` and ``G.T @ feats``.  The packed engine
(:class:`implreg.factorizations.binary_products.PackedBinary`) computes the same products
on the 0/1 bits.  For each ``K`` of the preset (one task at rank 5 as in the one-fit
benchmark; ten tasks at ranks 5 and 15; twenty at rank 15, the original and rand-label
variants fitted together) and each thread count, the script prints the median time of
each product, the ratio dense / packed, and the dense GEMM's rate against the machine's
float32 GEMM bound (a 2048^3 product timed in the same run).  ``--busy`` starts one
busy process beside the measurement (the shared-machine case the thread policy is
about).

    python bench/bench_binary_products.py [--data-dir ../shared/data] [--repeats 7] [--busy]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import torch

from implreg.factorizations.binary_products import PackedBinary
from implreg.problems.images import discretize, load_dataset

ROOT = Path(__file__).resolve().parents[1]
CASES = [
    ("1 task, rank 5", 5),
    ("10 tasks, rank 5", 50),
    ("10 tasks, rank 15", 150),
    ("20 tasks, rank 15", 300),
]


def _median_ms(repeats: int, fn, *args) -> float:
    fn(*args)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def _spin(stop) -> None:  # pragma: no cover - a busy neighbour
    x = 0
    while not stop.is_set():
        x += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--busy", action="store_true", help="one busy process beside the run")
    args = ap.parse_args()
    if not (args.data_dir / "mnist").is_dir():
        print(f"skipped: no MNIST under {args.data_dir} (pass --data-dir)")
        return
    images = load_dataset("mnist", args.data_dir)["train"].images
    x = discretize(images)
    x = x[:, x.min(0) != x.max(0)]
    n, d = x.shape
    raw = torch.from_numpy(x).to(torch.float32)
    feats = (raw - raw.mean(0)) / raw.std(0, unbiased=False)
    packed = PackedBinary(x)
    print(
        f"MNIST train: {n} x {d} live binary features, {x.mean():.3f} ones; "
        f"torch {torch.__version__}"
    )
    stop = mp.Event()
    busy = mp.Process(target=_spin, args=(stop,), daemon=True) if args.busy else None
    if busy is not None:
        busy.start()
        print("one busy process running beside the measurement")
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            a = torch.randn(2048, 2048)
            bound = 2 * 2048**3 / (_median_ms(3, torch.mm, a, a) * 1e-3) / 1e9
            print(f"\n{threads} thread(s): float32 GEMM bound {bound:.0f} GFLOP/s (2048^3)")
            print(
                "case                 K  | X W: dense ms packed ms ratio | "
                "X^T G: dense ms packed ms ratio | dense GEMM rate / bound"
            )
            gen = torch.Generator().manual_seed(0)
            for name, k in CASES:
                w = torch.randn(k, d, generator=gen) * 0.05  # (K, D) as the dense engine holds it
                g = torch.randn(n, k, generator=gen)
                wt = w.T.contiguous()
                fd = _median_ms(args.repeats, torch.mm, feats, w.T)
                fp = _median_ms(args.repeats, packed.matmul, wt)
                bd = _median_ms(args.repeats, torch.mm, g.T, feats)
                bp = _median_ms(args.repeats, packed.rmatmul, g)
                rate = 2 * 2 * n * d * k / ((fd + bd) * 1e-3) / 1e9
                print(
                    f"{name:18s} {k:4d} | {fd:8.1f} {fp:9.1f} {fd / fp:5.2f} | "
                    f"{bd:8.1f} {bp:9.1f} {bd / bp:5.2f} | {rate:5.0f} GFLOP/s = {rate / bound:.0%}"
                )
    finally:
        if busy is not None:
            stop.set()
            busy.join()


if __name__ == "__main__":
    main()
