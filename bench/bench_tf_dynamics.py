"""Wall time of the whole ``tf-dynamics`` preset (three inits, up to 15k iterations each).

Runs the preset exactly as ``implreg run tf-dynamics`` does (one batched pass,
metrics, summary and figures) and compares it with a simple reference
measured in the same run: autograd through the full einsum end tensor with a
masked MSE, one init at a time, timed over a few hundred iterations and
extrapolated to the same number of run-iterations.

    python bench/bench_tf_dynamics.py        # target: <= 60 s
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from implreg.api import run_preset
from implreg.config import with_overrides
from implreg.experiments import cp_dynamics as td
from implreg.experiments import get_preset


def reference_rate(cfg: td.CPDynamicsConfig, iterations: int) -> float:
    from implreg.optim import AdaptiveGD

    prep = td.build_problem(cfg)
    eng = prep.engine
    dims = list(cfg.dims)
    target = torch.zeros(dims).flatten()
    target[eng.lin] = eng.y
    mask = torch.zeros(dims).flatten()
    mask[eng.lin] = 1.0
    target, mask = target.view(dims), mask.view(dims)
    params = [f[-1].clone().requires_grad_() for f in prep.factors]
    opt = AdaptiveGD(cfg.lr, eps=cfg.eps)
    active = torch.ones(1, dtype=torch.bool)
    start = time.perf_counter()
    for _ in range(iterations):
        for p in params:
            p.grad = None
        w = torch.einsum("ir,jr,kr,lr->ijkl", *params)
        ((((w - target) * mask) ** 2).sum() / eng.m).backward()
        with torch.no_grad():
            opt.step(
                [p.unsqueeze(0) for p in params], [p.grad.unsqueeze(0) for p in params], active
            )
    return iterations / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--reference-iterations", type=int, default=300)
    args = ap.parse_args()
    cfg = with_overrides(get_preset("tf-dynamics").config, args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        out = run_preset(cfg, out=Path(tmp) / "run", log=lambda *_: None)
        wall = time.perf_counter() - start
    summary = out.summary
    run_its = sum(r["stopped_at"] for r in summary["runs"])
    ref = reference_rate(cfg, args.reference_iterations)
    ref_wall = run_its / ref
    print(out.summary_text())
    print(
        f"implreg tf-dynamics: {wall:.1f} s wall for {run_its} run-iterations "
        f"({run_its / wall:.0f} run-iterations/s), target <= 60 s: "
        f"{'MET' if wall <= 60 else 'NOT MET'}"
    )
    print(
        f"reference (autograd, full einsum, one init at a time): {ref:.0f} it/s, "
        f"so about {ref_wall:.0f} s for the same iterations; ratio {ref_wall / wall:.1f}x"
    )


if __name__ == "__main__":
    main()
