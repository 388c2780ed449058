"""Which basin a Figure 4 fit ends in (Razin, Maman & Cohen, ICML 2021, Figure 4).

One one-vs-all task (``--cls``, MNIST), one rank (``--rank``): the objective of
:class:`implreg.factorizations.cp_exp_binary.BinaryExpSumObjective` (float64 one-hot
features, constant pixels dropped, positive terms) minimized by scipy's L-BFGS-B
(``--memory`` pairs, its strong-Wolfe line search, no stopping tolerance) from the
starting draws of :func:`implreg.optim.exp_sum_fit.fit_exp_sum_converged` with seeds
``--seeds``.  Prints each start's train MSE every ``--every`` iterations and the time
taken, one thread.

Measured 2026-12-02 (class 6, rank 5, 3000 iterations, 79-114 s per start): seeds 0-4
end at 0.00310, 0.00381, 0.00392, 0.00373, 0.00341, after being within 5% of each other
at 500 iterations (0.00454-0.00476); seed 0 goes on to 0.00288 after 10,400 iterations.

    python bench/study_tensor_rank_basins.py [--seeds 0-4] [--iterations 3000]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize

from implreg.factorizations.cp_exp import Standardization, one_hot_features
from implreg.factorizations.cp_exp_binary import BinaryExpSumObjective
from implreg.problems.images import discretize, load_dataset
from implreg.seeds import parse_seeds

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_tensor_rank_convergence import variant_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def start(d_all: int, live: torch.Tensor, rank: int, mean_y: float, seed: int) -> np.ndarray:
    """The starting point of ``fit_exp_sum_converged`` (same generator draws, init 0.05)."""
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(1, rank, d_all, generator=gen, dtype=torch.float64) * (0.05 / d_all**0.5)
    b0 = torch.full((rank, 1), math.log(mean_y / rank), dtype=torch.float64)
    return torch.cat([w0[0][:, live], b0], dim=1).reshape(-1).numpy().copy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--cls", type=int, default=6)
    ap.add_argument("--rank", type=int, default=5)
    ap.add_argument("--seeds", default="0-4")
    ap.add_argument("--iterations", type=int, default=3000)
    ap.add_argument("--memory", type=int, default=20)
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument(
        "--variant", default="original", choices=("original", "rand_image", "rand_label")
    )
    ap.add_argument("--variant-seed", type=int, default=0, help="seed of a random variant")
    args = ap.parse_args()
    if not (args.data_dir / "mnist").is_dir():
        print(f"skipped: no MNIST under {args.data_dir} (pass --data-dir)")
        return
    torch.set_num_threads(1)
    data = load_dataset("mnist", args.data_dir)
    if args.variant == "original":
        x = torch.from_numpy(discretize(data["train"].images))
        y = torch.from_numpy((data["train"].labels == args.cls).astype(np.float64))
    else:
        x, y = variant_data(data, args.variant, args.cls, args.variant_seed)
        y = y.to(torch.float64)
    onehot = one_hot_features(x, 2, torch.float64)
    std = Standardization.of(onehot)
    live = (onehot.amax(0) > onehot.amin(0)).nonzero().squeeze(1)
    obj = BinaryExpSumObjective(
        onehot[:, live].contiguous(),
        std.mean[live],
        std.scale[live],
        y[:, None],
        torch.ones(1, args.rank, dtype=torch.float64),
    )
    task = torch.tensor([0])

    def loss_and_grad(p: np.ndarray) -> tuple[float, np.ndarray]:
        loss, grad_of = obj(torch.from_numpy(p).view(1, -1), task)
        return float(loss[0]), grad_of(task).reshape(-1).numpy()

    print(
        f"MNIST class {args.cls} ({args.variant}), rank {args.rank}, scipy L-BFGS-B, "
        f"{args.memory} pairs"
    )
    for seed in parse_seeds(args.seeds):
        x0 = start(onehot.shape[1], live, args.rank, float(y.mean()), seed)
        marks, final, its, took = fit(loss_and_grad, x0, args.iterations, args.memory, args.every)
        print(f"seed {seed}: {'; '.join(marks)}; final {final:.6f} ({its} its, {took:.0f} s)")


def fit(loss_and_grad, x0: np.ndarray, iterations: int, memory: int, every: int):
    """One L-BFGS-B run; the losses every ``every`` iterations, final loss, iterations, s."""
    marks: list[str] = []
    count = 0
    begin = time.perf_counter()

    def record(p: np.ndarray) -> None:
        nonlocal count
        count += 1
        if count % every == 0:
            marks.append(f"{count}: {loss_and_grad(p)[0]:.6f}")

    res = minimize(
        loss_and_grad,
        x0,
        jac=True,
        method="L-BFGS-B",
        callback=record,
        options={
            "maxiter": iterations,
            "maxcor": memory,
            "ftol": 0.0,
            "gtol": 0.0,
            "maxfun": 3 * iterations,
        },
    )
    return marks, float(res.fun), int(res.nit), time.perf_counter() - begin


if __name__ == "__main__":
    main()
