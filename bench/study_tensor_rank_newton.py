"""Does a second-order method reach the Figure 4 minimum faster (Razin, Maman & Cohen, ICML 2021)?

One one-vs-all task (``--cls``, MNIST), one rank (``--rank``), the exp-sum form of the CP
predictor (:mod:`implreg.factorizations.cp_exp`: ``f(x) = sum_r exp(b_r + w_r . std(x))``,
positive terms) in float64.  From the point the preset's fitter reaches after ``--warm``
L-BFGS iterations (:func:`~implreg.factorizations.cp_exp.fit_exp_sum`, seed 0), two
optimizers run for the same wall time, in one process:

* Levenberg-Marquardt on the exact Gauss-Newton matrix ``(2/n) J^T J`` of the mean squared
  error (``--exact`` adds the residual term ``(2/n) sum_i e_i d^2 f_i``, i.e. the full
  Hessian), damped by ``mu * diag``, ``mu`` updated from the ratio of actual to predicted
  decrease (Nielsen's rule).  The matrix is ``R (D+1)`` square, built block by block as
  ``X^T diag(t_r t_s) X`` over all ``n`` samples (no subsampling: rare pixels, whose
  standardized values reach ~250, would get no curvature and the steps blow up);
* the preset's L-BFGS, simply continued from the same point (the reference).

Printed: each LM iteration's loss, ``mu`` and time, and the L-BFGS loss after the same time.

Measured 2026-12-02 with this script (class 6, rank 5, two threads, quiet machine; 5.0 min
and 4.2 min): from the 500-iteration point (loss 0.004843) eight LM iterations on the exact
Gauss-Newton matrix took 131.7 s (~16 s each) and reached 0.004820, ``mu`` falling from 699
to 10 (the quadratic model is trusted only in a small region); the preset's L-BFGS continued
from the same point ran 5678 iterations in the same 131.7 s and reached 0.003551. So the
slow creep of the fit is not a conditioning problem that curvature fixes. Along one long fit
(``--norms --iterations 10000``: more than 10,500 evaluations, float32, the packed engine) the raw
weight norms keep growing while the loss creeps: per-term norms 38-94 at evaluation 500
(loss 0.004976), 66-97 at 3000 (0.003703), 77-146 at 10,500 (0.003495) -- the behaviour of a
loss whose infimum lies at infinity along some directions, where every optimizer's
"converged" value depends on its horizon.

    python bench/study_tensor_rank_newton.py [--warm 500] [--seconds 120] [--exact]
    python bench/study_tensor_rank_newton.py --norms --iterations 10000
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from timing import mnist_one_vs_rest

from implreg.factorizations.cp_exp import fit_exp_sum
from implreg.factorizations.cp_exp_binary import BinaryExpSumObjective

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


def curvature(xt: torch.Tensor, t: torch.Tensor, e: torch.Tensor, exact: bool) -> torch.Tensor:
    """``(2/n) J^T J`` (plus the residual term when ``exact``), ``(R (D+1))^2``, by blocks."""
    n, d1 = xt.shape
    rank = t.shape[1]
    h = torch.empty(rank * d1, rank * d1, dtype=F64)
    for r in range(rank):
        for s in range(r, rank):
            c = t[:, r] * t[:, s]
            if exact and r == s:
                c = c + e * t[:, r]
            blk = (2.0 / n) * (xt.T @ (xt * c[:, None]))
            h[r * d1 : (r + 1) * d1, s * d1 : (s + 1) * d1] = blk
            h[s * d1 : (s + 1) * d1, r * d1 : (r + 1) * d1] = blk.T
    return h


def levenberg_marquardt(xt, y, p, seconds: float, exact: bool) -> list[tuple[float, float]]:
    """LM from ``p`` ``(R, D+1)`` for ``seconds``; its curve ``(seconds, loss)``."""
    n = xt.shape[0]

    def evaluate(q):
        t = torch.exp(xt @ q.T)
        e = t.sum(1) - y
        return t, e, float(e.pow(2).mean())

    t, e, loss = evaluate(p)
    mu, nu = 1e-3, 2.0
    curve, start = [(0.0, loss)], time.perf_counter()
    while time.perf_counter() - start < seconds:
        g = ((2.0 / n) * ((t * e[:, None]).T @ xt)).reshape(-1)
        h = curvature(xt, t, e, exact)
        diag = h.diagonal().clone().clamp_min(1e-12 * float(h.diagonal().max()))
        while True:
            chol, info = torch.linalg.cholesky_ex(h + mu * torch.diag(diag))
            if int(info) != 0:  # not positive definite (the exact Hessian): damp more
                mu, nu = mu * nu, 2 * nu
                continue
            step = -torch.cholesky_solve(g[:, None], chol)[:, 0]
            t2, e2, loss2 = evaluate(p + step.view_as(p))
            predicted = -float(g @ step) - 0.5 * float(step @ (h @ step))
            rho = (loss - loss2) / predicted if predicted > 0 else -1.0
            if rho > 0 and math.isfinite(loss2):
                p, t, e, loss = p + step.view_as(p), t2, e2, loss2
                mu, nu = mu * max(1 / 3, 1 - (2 * rho - 1) ** 3), 2.0
                break
            mu, nu = mu * nu, 2 * nu
            if mu > 1e15:
                return curve
        curve.append((time.perf_counter() - start, loss))
        print(
            f"  LM iteration {len(curve) - 1}: {curve[-1][0]:6.1f} s, loss {loss:.6f}, mu {mu:.3g}"
        )
    return curve


def weight_norms(x, y, rank: int, iterations: int, every: int) -> None:
    """Per-term norms of the raw (0/1-feature) weights along one long fit of the preset's."""
    call = BinaryExpSumObjective.__call__
    count = {"n": 0}
    start = time.perf_counter()

    def spy(self, params, idx):
        if count["n"] % every == 0:
            w = params.view(rank, -1)[:, :-1].to(F64) * self.inv_scale.to(F64)
            loss = float(call(self, params, idx)[0][0])
            norms = ", ".join(f"{v:.1f}" for v in w.norm(dim=1).tolist())
            print(
                f"  evaluation {count['n']:6d} ({time.perf_counter() - start:6.1f} s): "
                f"loss {loss:.6f}, raw weight norms per term {norms}",
                flush=True,
            )
        count["n"] += 1
        return call(self, params, idx)

    BinaryExpSumObjective.__call__ = spy
    try:
        fit_exp_sum(x, y, rank, iterations=iterations, engine="packed")
    finally:
        BinaryExpSumObjective.__call__ = call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--cls", type=int, default=6)
    ap.add_argument("--rank", type=int, default=5)
    ap.add_argument("--warm", type=int, default=500, help="L-BFGS iterations before LM")
    ap.add_argument("--seconds", type=float, default=120.0, help="wall time of each optimizer")
    ap.add_argument("--exact", action="store_true", help="LM on the full Hessian")
    ap.add_argument("--norms", action="store_true", help="weight norms along one long fit")
    ap.add_argument("--iterations", type=int, default=10000, help="with --norms")
    args = ap.parse_args()
    loaded = mnist_one_vs_rest(args.data_dir, args.cls, np.float64)
    if loaded is None:
        return
    x, y = loaded
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.norms:
        weight_norms(x, y, args.rank, args.iterations, every=500)
        return
    warm = fit_exp_sum(x, y, args.rank, iterations=args.warm, dtype=F64, engine="packed")
    pred = warm.predictor
    std = pred.standardization
    live = std.scale > 0
    live &= x.amax(0) != x.amin(0)
    xt = torch.cat([std.apply(x.to(F64))[:, live], torch.ones(x.shape[0], 1, dtype=F64)], 1)
    p = torch.cat([pred.weights[0][:, live], pred.bias[0][:, None]], 1)
    print(f"warm start: {args.warm} L-BFGS iterations, loss {float(warm.train_loss[0]):.6f}")
    curve = levenberg_marquardt(xt, y, p, args.seconds, args.exact)
    spent = curve[-1][0]
    marks: list[tuple[int, float, float]] = []
    start = [0.0]

    def record(it, loss):
        if it == args.warm:
            start[0] = time.perf_counter()
        if it >= args.warm:
            marks.append((it, time.perf_counter() - start[0], float(loss[0])))
        return it > args.warm and time.perf_counter() - start[0] > spent

    fit_exp_sum(x, y, args.rank, iterations=10**6, dtype=F64, engine="packed", callback=record)
    it, sec, loss = marks[-1]
    print(
        f"LM: {len(curve) - 1} iterations in {spent:.1f} s, loss {curve[-1][1]:.6f}; "
        f"L-BFGS from the same point: {it - args.warm} iterations in {sec:.1f} s, loss {loss:.6f}"
    )


if __name__ == "__main__":
    main()
