"""The gradient-flow run of Figure 3 (`implreg run tf-flow`: init std 0.005, loss 1e-8).

Issue target: <= 5 minutes here.  Reference measured in the same run: the same
number of bare gradient evaluations of the same problem (float64, one thread),
the floor any explicit integrator needs; the ratio is the solver's overhead
(Runge-Kutta stages' vector arithmetic, error norms, records, events).

    python bench/bench_flow.py            # the whole preset
    python bench/bench_flow.py --quick    # to t = 4.4e7 only (the first escape)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import rate  # noqa: E402

import implreg  # noqa: E402
from implreg.experiments import PRESETS  # noqa: E402
from implreg.experiments.cp_dynamics import build_problem  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="stop at t = 4.4e7")
    args = ap.parse_args()
    torch.set_num_threads(1)
    overrides = {"flow_t_max": 4.4e7} if args.quick else {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run = implreg.run("tf-flow", out=Path(tmp) / "run", progress=False, threads=1, **overrides)
        wall = time.perf_counter() - start
    flow = run.summary["flow"]
    evals = flow["gradient_evaluations"]
    cfg = dataclasses.replace(PRESETS["tf-flow"].config, **overrides)
    prob = build_problem(cfg)

    def step():
        prob.engine.loss_and_grad(prob.factors, prob.loss)

    per_second = rate(step, 5.0)
    floor = evals / per_second
    r = run.summary["runs"][0]
    print(
        f"tf-flow{' (to t = 4.4e7)' if args.quick else ''}: {wall:.1f} s wall, {evals} gradient "
        f"evaluations, status {r['status']} at t = {flow['time']:.4g}, "
        f"{r['n_learned']} components learned, reconstruction error "
        f"{r['final_reconstruction_error']:.3g}"
    )
    print(
        f"reference: {per_second:.0f} bare gradient evaluations/s -> {floor:.1f} s for the same "
        f"count; ratio {wall / floor:.2f} (target for the whole preset: <= 300 s)"
    )


if __name__ == "__main__":
    main()
