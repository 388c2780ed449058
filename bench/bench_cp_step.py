"""Training-step speed of the CP core on the paper's Figure 3 configuration.

N = 4, d = 10, R = 1000, m = 2000 (REFERENCE §1).  Prints iterations/s of
implreg's analytic dense step (loss, gradient and the adaptive-step update), of
the same step batched over the three init scales, of a simple reference
measured in the same run (autograd through the full einsum end tensor with a
masked MSE, same optimizer), their ratio, and the fraction of a GEMM-only
bound (the three ``P1 x P2 x R`` matrix products a dense step needs, timed
alone).

    python bench/bench_cp_step.py            # target: >= 1500 it/s (the step auto picks)
"""

from __future__ import annotations

import argparse

import torch
from timing import rate

from implreg.factorizations.cp import cp_init
from implreg.factorizations.cp_engine import DenseCompletion, GatherCompletion, SampledCompletion
from implreg.losses import L2Loss
from implreg.optim import AdaptiveGD
from implreg.problems.synthetic import completion_problem, low_cp_rank_tensor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    dims, rank, m = [10, 10, 10, 10], 1000, 2000
    g = torch.Generator().manual_seed(0)
    truth = low_cp_rank_tensor(dims, 5, norm=1.0, generator=g)
    prob = completion_problem(truth, m, generator=g)
    idx, y = prob.idx, prob.y.float()
    loss = L2Loss()
    active1 = torch.ones(1, dtype=torch.bool)

    def make(stds):
        return cp_init(dims, rank, stds=stds, generator=torch.Generator().manual_seed(1))

    f1 = make([0.005])
    eng = DenseCompletion(dims, idx, y)
    opt = AdaptiveGD(0.01, eps=1e-6)

    def step_dense():
        _, grads = eng.loss_and_grad(f1, loss)
        opt.step(f1, grads, active1)

    f3 = make([0.05, 0.01, 0.005])
    opt3 = AdaptiveGD(0.01, eps=1e-6)
    active3 = torch.ones(3, dtype=torch.bool)

    def step_batched():
        _, grads = eng.loss_and_grad(f3, loss)
        opt3.step(f3, grads, active3)

    sparse = SampledCompletion(dims, idx, y)
    fs = make([0.005])
    opts = AdaptiveGD(0.01, eps=1e-6)

    def step_sparse():
        _, grads = sparse.loss_and_grad(fs, loss)
        opts.step(fs, grads, active1)

    fs3 = make([0.05, 0.01, 0.005])
    opts3 = AdaptiveGD(0.01, eps=1e-6)

    def step_sparse_batched():
        _, grads = sparse.loss_and_grad(fs3, loss)
        opts3.step(fs3, grads, active3)

    gath = GatherCompletion(dims, idx, y)
    fg = make([0.005])
    optg = AdaptiveGD(0.01, eps=1e-6)

    def step_gather():
        _, grads = gath.loss_and_grad(fg, loss)
        optg.step(fg, grads, active1)

    # Reference: autograd through the full einsum end tensor, masked MSE.
    ref = [f[0].clone().requires_grad_() for f in make([0.005])]
    target = torch.zeros(dims).flatten()
    target[eng.lin] = y
    mask = torch.zeros(dims).flatten()
    mask[eng.lin] = 1.0
    target, mask = target.view(dims), mask.view(dims)
    opt_ref = AdaptiveGD(0.01, eps=1e-6)

    def step_ref():
        for p in ref:
            p.grad = None
        w = torch.einsum("ir,jr,kr,lr->ijkl", *ref)
        lv = (((w - target) * mask) ** 2).sum() / m
        lv.backward()
        with torch.no_grad():
            ps = [p.unsqueeze(0) for p in ref]
            opt_ref.step(ps, [p.grad.unsqueeze(0) for p in ref], active1)

    # GEMM-only bound: the three products of a dense step.
    left = torch.randn(1, 100, rank)
    right = torch.randn(1, 100, rank)
    gm = torch.randn(1, 100, 100)

    def gemms():
        torch.matmul(left, right.transpose(1, 2))
        torch.matmul(gm, right)
        torch.matmul(gm.transpose(1, 2), left)

    r_ref = rate(step_ref, args.seconds)
    r_dense = rate(step_dense, args.seconds)
    r_batch = rate(step_batched, args.seconds)
    r_sparse = rate(step_sparse, args.seconds)
    r_sparse3 = rate(step_sparse_batched, args.seconds)
    r_gather = rate(step_gather, args.seconds)
    r_gemm = rate(gemms, args.seconds)
    print(f"threads: {torch.get_num_threads()}  torch {torch.__version__}")
    print(f"reference (autograd, full einsum, masked MSE): {r_ref:9.1f} it/s")
    print(
        f"implreg dense step                           : {r_dense:9.1f} it/s  "
        f"ratio {r_dense / r_ref:6.1f}x"
    )
    print(
        f"implreg dense step, 3 inits batched          : {r_batch:9.1f} steps/s "
        f"= {3 * r_batch:.1f} run-iterations/s"
    )
    print(
        f"implreg sampled step (sampled products)      : {r_sparse:9.1f} it/s  "
        f"ratio {r_sparse / r_ref:6.1f}x, {r_sparse / r_dense:.2f}x the dense step; "
        f"the step auto picks here, target >= 1500 it/s: "
        f"{'MET' if r_sparse >= 1500 else 'NOT MET'}"
    )
    print(
        f"implreg sampled step, 3 inits batched        : {r_sparse3:9.1f} steps/s "
        f"= {3 * r_sparse3:.1f} run-iterations/s"
    )
    print(f"implreg gather step (same problem)           : {r_gather:9.1f} it/s")
    print(
        f"GEMM-only bound (3 GEMMs)                    : {r_gemm:9.1f} it/s  "
        f"dense step reaches {r_dense / r_gemm:.0%} of it, the sampled step "
        f"{r_sparse / r_gemm:.2f}x it"
    )


if __name__ == "__main__":
    main()
