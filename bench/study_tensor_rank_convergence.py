"""Convergence study of the Figure 4 fits (Razin, Maman & Cohen, ICML 2021, Figure 4).

For one one-vs-all task (``--cls``) of a dataset and each variant (original, rand
image, rand label) and rank, every method runs for ``--seconds`` of wall time (one
thread) and its train MSE is recorded every 10 iterations.  Methods:

* ``today``: :func:`implreg.factorizations.cp_exp.fit_exp_sum` (dense standardized
  features, L-BFGS with 20 pairs), the fitter of the preset before this study;
* ``sparse-m20``, ``sparse-m100``: :func:`implreg.optim.exp_sum_fit.fit_exp_sum_converged`
  (sparse features, constant features dropped) with 20 / 100 L-BFGS pairs;
* ``restart-s1``, ``restart-s2``: ``sparse-m100`` from two more random starts;
* ``signs``: ``sparse-m100`` with the last term's sign negative (a sign pattern that a
  positive fit cannot reach; ``--no-signs`` leaves it out).

The table gives, per (variant, rank), the best loss over all tries (the estimate of the
minimum), the spread over the restarts, and per method the loss after 500 and 3000
iterations, its final loss and when (iterations, seconds) it got within 1% of the best.
Every curve point goes to the CSV given on the command line.

    python bench/study_tensor_rank_convergence.py OUT.csv [--ranks 5,15] [--seconds 40]
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch

from implreg.factorizations.cp_exp import fit_exp_sum
from implreg.optim.exp_sum_fit import fit_exp_sum_converged
from implreg.problems.images import discretize, load_dataset, rand_image, rand_label

ROOT = Path(__file__).resolve().parents[1]


def variant_data(
    data: dict, variant: str, cls: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Binarized train images and 0/1 labels of one task of a variant (as the preset builds
    them: rand image draws i.i.d. Bernoulli(1/2) pixels, rand label permutes the labels)."""
    images, labels = data["train"].images, data["train"].labels
    x = discretize(images)
    if variant == "rand_image":
        x = rand_image((images.shape[0], images[0].size), levels=2, rng=np.random.default_rng(seed))
    if variant == "rand_label":
        labels = rand_label(labels, rng=np.random.default_rng(seed + 1))
    return torch.from_numpy(x), torch.from_numpy((labels == cls).astype(np.float32))


def run(method: str, x, y, rank: int, seconds: float) -> list[tuple[int, float, float]]:
    """One fit for ``seconds``; its curve ``(iteration, seconds, loss)`` every 10 iterations."""
    curve: list[tuple[int, float, float]] = []
    start = time.perf_counter()

    def record(it, loss):
        elapsed = time.perf_counter() - start
        if it % 10 == 0:
            curve.append((it, elapsed, float(loss[0])))
        return elapsed > seconds

    big = 10**7
    if method == "today":
        fit_exp_sum(x, y, rank, iterations=big, callback=record)
        return curve
    memory = 20 if method == "sparse-m20" else 100
    seed = {"restart-s1": 1, "restart-s2": 2}.get(method, 0)
    signs = None
    if method == "signs":
        signs = torch.ones(1, rank)
        signs[0, -1] = -1.0
    fit_exp_sum_converged(
        x,
        y,
        rank,
        iterations=big,
        memory=memory,
        rel_tol=0.0,
        seed=seed,
        signs=signs,
        callback=record,
    )
    return curve


def at(curve, iteration: int) -> float:
    """The loss at ``iteration`` (nan if the curve stops before)."""
    return next((loss for it, _, loss in curve if it >= iteration), float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", type=Path)
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--variants", default="original,rand_image,rand_label")
    ap.add_argument("--ranks", default="5,15")
    ap.add_argument("--cls", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--methods", default="today,sparse-m100,restart-s1,restart-s2,signs")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random variants")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not (args.data_dir / args.dataset).is_dir():
        print(f"skipped: no {args.dataset} under {args.data_dir} (pass --data-dir)")
        return
    data = load_dataset(args.dataset, args.data_dir)
    methods = args.methods.split(",")
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["dataset", "variant", "rank", "method", "iteration", "seconds", "loss"])
        for variant in args.variants.split(","):
            x, y = variant_data(data, variant, args.cls, args.seed)
            for rank in (int(r) for r in args.ranks.split(",")):
                curves = {}
                for m in methods:
                    curves[m] = run(m, x, y, rank, args.seconds)
                    for it, sec, loss in curves[m]:
                        out.writerow([args.dataset, variant, rank, m, it, f"{sec:.3f}", loss])
                    fh.flush()
                best = min(c[-1][2] for c in curves.values() if c)
                restarts = [
                    curves[m][-1][2]
                    for m in methods
                    if m.startswith(("sparse-m100", "restart")) and curves[m]
                ]
                spread = max(restarts) - min(restarts) if len(restarts) > 1 else float("nan")
                print(
                    f"\n{args.dataset} {variant} class {args.cls} rank {rank}: best {best:.6f}, "
                    f"spread over restarts {spread:.6f} ({args.seconds:.0f} s per method)"
                )
                print(
                    f"  {'method':<12} {'@500':>9} {'@3000':>9} {'final':>9} {'iters':>6}"
                    f"  within 1% of best at"
                )
                for m, c in curves.items():
                    hit = next(((it, sec) for it, sec, loss in c if loss <= 1.01 * best), None)
                    where = f"iteration {hit[0]}, {hit[1]:.1f} s" if hit else "not reached"
                    print(
                        f"  {m:<12} {at(c, 500):9.6f} {at(c, 3000):9.6f} {c[-1][2]:9.6f} "
                        f"{c[-1][0]:6d}  {where}"
                    )


if __name__ == "__main__":
    main()
