"""Wall time of the gradient-flow part of ``mf-det-sign`` (``flow-exact``: depths 2 / 3 / 4,
random and balanced inits, to loss 1e-4), against simple references measured in the same run.

References: scipy ``solve_ivp`` (DOP853, float64, the same rtol/atol) on the layer ODE of
each run, capped at ``--cap`` seconds per run (how far it gets, whether it keeps det's
sign, and its time extrapolated by flow time); and mpmath at 40 digits, its cost per
vector-field evaluation times the evaluations the compiled integrator needed.

    python bench/bench_det_sign_flow.py      # target: <= 600 s for the flow-exact part
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import mpmath
import numpy as np
from scipy.integrate import solve_ivp

from implreg.api import run_preset
from implreg.config import with_overrides
from implreg.experiments import get_preset
from implreg.factorizations.det_sign import init_layers, loss_and_grads


class _Cap(Exception):
    pass


def scipy_reference(layers, loss_tol, flow_time, rtol, atol, cap):
    """(wall s, flow time reached, loss reached, det changed sign) of scipy DOP853 in float64."""
    depth = len(layers)
    start = time.perf_counter()
    state = {"t": 0.0, "y": layers.ravel().copy()}

    def f(t, y):
        if time.perf_counter() - start > cap:
            raise _Cap
        state["t"], state["y"] = t, y
        return -loss_and_grads(y.reshape(depth, 2, 2))[1].ravel()

    def stop(_, y):
        return np.log(loss_and_grads(y.reshape(depth, 2, 2))[0] / loss_tol)

    def det(_, y):
        return np.linalg.det(loss_and_grads(y.reshape(depth, 2, 2))[2])

    stop.terminal = True
    crossed = False
    try:
        sol = solve_ivp(
            f, (0, 10 * flow_time), layers.ravel(), "DOP853", rtol=rtol, atol=atol,
            events=[stop, det],
        )  # fmt: skip
        state["t"], state["y"] = sol.t[-1], sol.y[:, -1]
        crossed = bool(len(sol.t_events[1]))
    except _Cap:
        pass
    loss, _, w = loss_and_grads(state["y"].reshape(depth, 2, 2))
    crossed = crossed or np.linalg.det(w) * np.linalg.det(np.linalg.multi_dot(layers[::-1])) < 0
    return time.perf_counter() - start, state["t"], loss, crossed


def mpmath_seconds_per_eval(depth: int, evals: int = 200) -> float:
    mpmath.mp.dps = 40
    rng = np.random.default_rng(0)
    lay = [mpmath.matrix(rng.normal(size=(2, 2)).tolist()) for _ in range(depth)]
    tgt, obs = mpmath.matrix([[0, 1], [1, 0]]), [[0, 1], [1, 1]]
    start = time.perf_counter()
    for _ in range(evals):
        pre = [mpmath.eye(2)]
        for m in lay:
            pre.append(m * pre[-1])
        g = mpmath.matrix(2, 2)
        for a in range(2):
            for b in range(2):
                g[a, b] = (pre[-1][a, b] - tgt[a, b]) * obs[a][b]
        suf = mpmath.eye(2)
        for j in range(depth - 1, -1, -1):
            _ = -(suf.T * g * pre[j].T)
            suf = suf * lay[j]
    return (time.perf_counter() - start) / evals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--cap", type=float, default=10.0, help="seconds per scipy reference run")
    args = ap.parse_args()
    cfg = with_overrides(get_preset("mf-det-sign").config, ["modes=flow-exact", *args.overrides])
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        out = run_preset(cfg, out=Path(tmp) / "run", log=lambda *_: None)
        wall = time.perf_counter() - start
    runs = out.summary["runs"]
    print(out.summary_text())
    steps = sum(r["steps"] for r in runs)
    print(
        f"implreg mf-det-sign flow-exact: {wall:.1f} s wall ({sum(r['seconds'] for r in runs):.1f}"
        f" s integrating, {steps} accepted Dormand-Prince steps over {len(runs)} runs); "
        f"target <= 600 s: {'MET' if wall <= 600 else 'NOT MET'}"
    )
    ref_total = 0.0
    for r in runs:
        seed = (cfg.seed, r["depth"], ["random", "balanced"].index(r["init"]))
        layers = init_layers(r["depth"], r["init"], cfg.end_std, np.random.default_rng(seed))
        s, t, loss, crossed = scipy_reference(
            layers, cfg.loss_tol, r["flow_time"], cfg.flow_rtol, cfg.flow_atol, args.cap
        )
        est = s * r["flow_time"] / max(t, 1e-12)
        ref_total += est
        print(
            f"  scipy DOP853 float64, depth {r['depth']} {r['init']}: {s:.1f} s to t = {t:.4g} of "
            f"{r['flow_time']:.4g} (loss {loss:.3g}), det changed sign: {crossed}; "
            f"~{est:.0f} s for the whole run (implreg {r['seconds']:.2f} s)"
        )
    print(f"scipy reference, extrapolated: {ref_total:.0f} s; ratio {ref_total / wall:.1f}x")
    per = {d: mpmath_seconds_per_eval(d) for d in sorted({r["depth"] for r in runs})}
    mp_total = sum(6 * r["steps"] * per[r["depth"]] for r in runs)
    print(
        "mpmath (40 digits) vector field: "
        + ", ".join(f"depth {d} {1e3 * v:.2f} ms" for d, v in per.items())
        + f" per evaluation, so ~{mp_total / 3600:.1f} h for the same evaluations; "
        f"ratio {mp_total / wall:.0f}x"
    )


if __name__ == "__main__":
    main()
