"""Training-step speed of deep matrix factorization: 100 x 100, depth 3, 2000 observations.

Prints steps/s of implreg's analytic step (loss, gradient, adaptive-step update)
and of a simple reference measured in the same run (autograd through the
product of the three layers with a masked MSE, same optimizer), and their
ratio.  The authors' code: about 1000-1700 steps/s with one thread (REFERENCE §3).

    python bench/bench_mf_step.py            # target: >= 5000 steps/s
"""

from __future__ import annotations

import argparse

import torch
from timing import rate

from implreg.experiments.mf_fit import problem
from implreg.factorizations.matrix import MatrixCompletion, mf_init
from implreg.losses import L2Loss
from implreg.optim import AdaptiveGD


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--depth", type=int, default=3)
    args = ap.parse_args()
    shape = (100, 100)
    truth, idx = problem(shape, 5, 100.0, 2000, 0)
    rows, cols = idx[:, 0], idx[:, 1]
    y = truth[rows, cols].float()
    layers = mf_init(
        shape,
        args.depth,
        scales=[1e-3],
        generator=torch.Generator().manual_seed(1),
        dtype=torch.float32,
    )
    eng = MatrixCompletion(shape, rows, cols, y)
    opt, loss, active = AdaptiveGD(1e-3, eps=1e-4), L2Loss(), torch.ones(1, dtype=torch.bool)

    def step():
        _, grads = eng.loss_and_grad(layers, loss)
        opt.step(layers, grads, active)

    ref = [p[0].clone().requires_grad_() for p in layers]
    mask = torch.zeros(shape)
    mask[rows, cols] = 1.0
    target = torch.zeros(shape)
    target[rows, cols] = y
    opt_ref = AdaptiveGD(1e-3, eps=1e-4)

    def step_ref():
        for p in ref:
            p.grad = None
        w = ref[0]
        for p in ref[1:]:
            w = p @ w
        ((((w - target) * mask) ** 2).sum() / len(rows)).backward()
        with torch.no_grad():
            opt_ref.step([p.unsqueeze(0) for p in ref], [p.grad.unsqueeze(0) for p in ref], active)

    r_ref = rate(step_ref, args.seconds)
    r = rate(step, args.seconds)
    print(f"threads: {torch.get_num_threads()}  torch {torch.__version__}  depth {args.depth}")
    print(f"reference (autograd, masked MSE): {r_ref:8.0f} steps/s")
    print(
        f"implreg analytic step           : {r:8.0f} steps/s  ratio {r / r_ref:4.1f}x  "
        f"target >= 5000: {'MET' if r >= 5000 else 'NOT MET'}"
    )


if __name__ == "__main__":
    main()
