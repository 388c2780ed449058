"""Why CP at order 4 with 256 components learns one component: the adaptive step.

The blog figure's CP panel (Razin 2022; REFERENCE §4: modes of 16, CP rank 5, ||W*|| = 64,
256 components, init 1e-3, 2048 observed entries) is order 3 in ``dynamics-mf-tf-htf``
(256 = 16 x 16, the component-count rule of Figure 3), where five components are learned.
This study runs the order-4 reading of it (16^4 entries, the panel's setting until
2026-12-02), trained with the adaptive step of Razin et al. 2021, App. B.2 (one global
``eta_t = lr / (sqrt(v_hat_t) + eps)``), which learns one component and stalls.
Every ``--every`` iterations this prints the train loss, ||g||, the step ``eta_t``, the
elapsed gradient-flow time ``sum_t eta_t`` and the two largest component norms; at the
end, the largest eigenvalue of the loss Hessian (power iteration on Hessian-vector
products, float64) beside ``2 / eta``: after the first escape the normalized step sits at
the edge of stability of the learned component, so the flow time of the components still
at zero advances by ``eta ~ 2 / lambda_max`` per iteration instead of ``lr / eps``.

    python bench/study_adaptive_step.py [--iterations 20000] [--set key=value ...]
"""

from __future__ import annotations

import argparse

import torch

from implreg.api import resolve
from implreg.factorizations.cp import cp_component_norms, cp_values

ORDER4 = "dims=16,16,16,16;gt_rank=5;gt_norm=64;rank=256;num_observations=2048;init_stds=1e-3"


def top_hessian_eigenvalue(factors, idx, y, iterations: int = 60) -> float:
    """Largest eigenvalue of the Hessian of ``mean (W[idx] - y)^2`` at one run's factors."""
    params = [f.detach().double()[0].clone().requires_grad_(True) for f in factors]
    loss = ((cp_values([p.unsqueeze(0) for p in params], idx)[0] - y.double()) ** 2).mean()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    v = [torch.randn_like(p) for p in params]
    lam = 0.0
    for _ in range(iterations):
        norm = torch.sqrt(sum((x * x).sum() for x in v))
        v = [x / norm for x in v]
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        lam = float(sum((a * b).sum() for a, b in zip(hv, v)))
        v = list(hv)
    return lam


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=20000)
    ap.add_argument("--every", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    torch.set_num_threads(1)
    _, exp, cfg = resolve(
        "tf-dynamics", overrides=ORDER4.split(";") + args.overrides, seed=args.seed
    )
    if len(cfg.init_stds) != 1 or cfg.optimizer != "adaptive" or cfg.task != "completion":
        raise SystemExit("this study takes one init std, optimizer=adaptive, task=completion")
    prep = exp.prepare(cfg)
    dyn = exp.build(cfg, prep)
    factors, opt, active = dyn.params, dyn.optimizer, torch.ones(1, dtype=torch.bool)
    for it in range(args.iterations + 1):
        loss, grads = dyn.loss_and_grad(factors)
        if it % args.every == 0:
            norms = torch.sort(cp_component_norms(factors)[0], descending=True).values
            gnorm = float(torch.sqrt(sum((g * g).sum() for g in grads)))
            eta = opt.last_eta[0] if opt.last_eta else float("nan")
            time = opt.time[0] if opt.time else 0.0
            print(
                f"iteration {it:6d}: loss {float(loss[0]):.4e}, ||g|| {gnorm:.2e}, "
                f"eta {eta:.4g}, flow time {time:.4g}, component norms "
                f"{float(norms[0]):.4g}, {float(norms[1]):.3e}",
                flush=True,
            )
        if it < args.iterations:
            opt.step(factors, grads, active)
    engine = prep.engine
    idx = torch.stack(torch.unravel_index(engine.lin, tuple(cfg.dims)), 1)
    lam = top_hessian_eigenvalue(factors, idx, engine.y)
    print(
        f"largest Hessian eigenvalue {lam:.5g}: 2 / lambda = {2 / lam:.5g}, "
        f"last step eta = {opt.last_eta[0]:.5g}, lr / eps = {cfg.lr / cfg.eps:.3g}"
    )


if __name__ == "__main__":
    main()
