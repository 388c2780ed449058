"""Completion of a tensor too large to build: order 10, modes of size 10, R = 100, m = 1e5.

10^10 entries are never materialized.  Each variant runs in its own process,
which reports iterations/s and its peak resident memory (ru_maxrss, including
the ~0.3 GB of Python and torch).  The reference is a simple chunked gather
with autograd (each chunk gathers the factor rows, multiplies, sums, and
autograd computes the gradient), measured in the same run.

    python bench/bench_cp_large.py           # targets: >= 10 it/s, peak <= 2 GB
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import torch

DIMS, RANK, M = [10] * 10, 100, 100_000


def _problem():
    from implreg.problems.synthetic import completion_problem, low_cp_rank_tensor

    g = torch.Generator().manual_seed(0)
    truth = low_cp_rank_tensor(DIMS, 5, norm=1.0, generator=g)
    prob = completion_problem(truth, M, generator=g)
    return prob.idx, prob.y.float()


def _worker(kind: str, seconds: float, table_max: int, chunk: int, q) -> None:
    from implreg.factorizations.cp import cp_init
    from implreg.factorizations.cp_engine import GatherCompletion
    from implreg.losses import L2Loss
    from implreg.optim import AdaptiveGD

    idx, y = _problem()
    factors = cp_init(DIMS, RANK, stds=[0.5], mean=0.0, generator=torch.Generator().manual_seed(1))
    opt = AdaptiveGD(0.01)
    active = torch.ones(1, dtype=torch.bool)
    if kind == "implreg":
        eng = GatherCompletion(DIMS, idx, y, table_max=table_max, chunk=chunk)
        loss = L2Loss()

        def step():
            _, grads = eng.loss_and_grad(factors, loss)
            opt.step(factors, grads, active)
    else:
        params = [f[0].clone().requires_grad_() for f in factors]

        def step():
            for p in params:
                p.grad = None
            for s in range(0, M, chunk):
                sub = idx[s : s + chunk]
                prod = params[0][sub[:, 0]]
                for n in range(1, len(params)):
                    prod = prod * params[n][sub[:, n]]
                ((prod.sum(-1) - y[s : s + chunk]) ** 2).sum().div(M).backward()
            with torch.no_grad():
                opt.step(
                    [p.unsqueeze(0) for p in params], [p.grad.unsqueeze(0) for p in params], active
                )

    step()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        n += 1
    rate = n / (time.perf_counter() - start)
    q.put((rate, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2))


def measure(kind: str, seconds: float, table_max: int = 1024, chunk: int = 4096):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_worker, args=(kind, seconds, table_max, chunk, q))
    p.start()
    out = q.get()
    p.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--sweep", action="store_true", help="also sweep table sizes and chunks")
    args = ap.parse_args()
    r_ref, mem_ref = measure("reference", args.seconds)
    print(f"reference (chunked gather + autograd): {r_ref:6.2f} it/s  peak {mem_ref:5.2f} GB")
    configs = [(1024, 4096)]
    if args.sweep:
        configs += [(10, 16384), (100, 16384), (10000, 16384), (1024, 2048), (1024, 16384)]
    for table_max, chunk in configs:
        r, mem = measure("implreg", args.seconds, table_max, chunk)
        ok = "MET" if (r >= 10 and mem <= 2) else "NOT MET"
        print(
            f"implreg gather table_max={table_max:5d} chunk={chunk:5d}: {r:6.2f} it/s  "
            f"peak {mem:5.2f} GB  ratio {r / r_ref:5.1f}x  target (>=10 it/s, <=2 GB): {ok}"
        )


if __name__ == "__main__":
    main()
