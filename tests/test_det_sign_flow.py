"""Gradient flow of the 2x2 det-sign example (Razin & Cohen 2020, REFERENCE §3 and §5)."""

from __future__ import annotations

import dataclasses
import math

import mpmath
import numpy as np
import pytest
import torch
from conftest import run_config
from scipy.integrate import solve_ivp

from implreg.cli import main
from implreg.experiments import PRESETS
from implreg.factorizations.det_sign import OBSERVED, TARGET, init_layers, loss_and_grads
from implreg.factorizations.det_sign_flow import (
    COLUMNS,
    _rhs_e2e,
    _rhs_layers,
    balancedness,
    choose_representation,
    end_to_end_state,
    integrate_flow,
)

COL = {name: i for i, name in enumerate(COLUMNS)}


def _layers(depth, init, end_std, seed):
    return init_layers(depth, init, end_std, np.random.default_rng(seed))


def _autograd_flow(layers):
    """``-dL/dW_j`` by torch autograd, and the induced ``dW_e/dt``."""
    t = torch.tensor(layers, requires_grad=True)
    prods = [t[0]]
    for j in range(1, len(layers)):
        prods.append(t[j] @ prods[-1])
    loss = 0.5 * (((prods[-1] - torch.tensor(TARGET)) * torch.tensor(OBSERVED)) ** 2).sum()
    (g,) = torch.autograd.grad(loss, t)
    dl = -g.numpy()
    n = len(layers)
    dw = np.zeros((2, 2))
    for j in range(n):
        a = np.eye(2)
        for m in layers[j + 1 :]:
            a = m @ a
        b = np.eye(2)
        for m in layers[:j]:
            b = m @ b
        dw += a @ dl[j] @ b
    return loss.item(), dl, dw


def _rot(x):
    return np.array([[math.cos(x), -math.sin(x)], [math.sin(x), math.cos(x)]])


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_vector_fields_match_autograd(depth):
    rng = np.random.default_rng(10 + depth)
    for _ in range(5):
        # any layers: the layer field is -dL/dW_j
        layers = rng.normal(size=(depth, 2, 2))
        loss, dl, _ = _autograd_flow(layers)
        out = np.empty(4 * depth)
        assert _rhs_layers(layers.ravel().copy(), depth, out) == pytest.approx(loss, rel=1e-12)
        np.testing.assert_allclose(out.reshape(depth, 2, 2), dl, rtol=1e-11, atol=1e-13)
        # balanced layers: the end-to-end field reproduces dW_e/dt of the layer flow
        bal = init_layers(depth, "balanced", float(rng.uniform(0.2, 2.0)), rng)
        loss, _, dw = _autograd_flow(bal)
        y = end_to_end_state(bal)
        dy = np.empty(4)
        assert _rhs_e2e(y, depth, dy) == pytest.approx(loss, rel=1e-10)
        u, v, s = _rot(y[0]), _rot(y[1]), np.exp(y[2:])
        jp = np.array([[0.0, -1.0], [1.0, 0.0]])
        du, dv, ds = dy[0] * u @ jp, dy[1] * v @ jp, np.diag(s * dy[2:])
        rebuilt = du @ np.diag(s) @ v.T + u @ ds @ v.T + u @ np.diag(s) @ dv.T
        np.testing.assert_allclose(rebuilt, dw, rtol=1e-9, atol=1e-12 * np.abs(dw).max())


def test_representation_choice_and_bad_arguments():
    assert choose_representation(_layers(3, "balanced", 1e-3, 0)) == "end-to-end"
    assert choose_representation(_layers(3, "random", 1e-3, 0)) == "layers"
    assert choose_representation(_layers(1, "balanced", 1e-3, 0)) == "layers"
    assert balancedness(_layers(4, "balanced", 1e-3, 1)) < 1e-14
    with pytest.raises(ValueError, match="balanced layers"):
        integrate_flow(_layers(2, "random", 1e-3, 0), 1e-2, representation="end-to-end")
    with pytest.raises(ValueError, match="record_ratio"):
        integrate_flow(_layers(2, "random", 1e-3, 0), 1e-2, record_ratio=1.0)
    with pytest.raises(ValueError, match="rtol"):
        integrate_flow(_layers(2, "random", 1e-3, 0), 1e-2, rtol=0.0)


def _scipy_layers(layers, t_end, t_eval=None):
    """The obvious reference: scipy DOP853 on the layer ODE at rtol 1e-12."""
    depth = len(layers)

    def f(_, y):
        return -loss_and_grads(y.reshape(depth, 2, 2))[1].ravel()

    sol = solve_ivp(
        f, (0.0, t_end), layers.ravel(), method="DOP853", rtol=1e-12, atol=1e-15, t_eval=t_eval
    )
    assert sol.status == 0
    return sol


@pytest.mark.parametrize(("init", "depth"), [("balanced", 2), ("balanced", 3), ("random", 3)])
def test_integrator_matches_scipy_on_a_short_horizon(init, depth):
    layers = _layers(depth, init, 0.05, 7)
    out = integrate_flow(layers, 0.3, rtol=1e-11, atol=1e-13)
    assert out["status"] == "reached_loss_tol"
    rec = out["records"]
    last = rec[-1]
    assert last[COL["loss"]] == pytest.approx(0.3, rel=1e-10)  # the stop is located in the step
    sol = _scipy_layers(layers, last[COL["time"]])
    loss, _, w = loss_and_grads(sol.y[:, -1].reshape(depth, 2, 2).copy())
    assert loss == pytest.approx(0.3, rel=1e-7)
    np.testing.assert_allclose(last[COL["w11"] : COL["w22"] + 1], w.ravel(), rtol=1e-7, atol=1e-9)


def test_det_keeps_its_sign_and_log_det_agrees_with_float64_where_that_is_accurate():
    layers = _layers(2, "balanced", 1e-3, 3)
    out = integrate_flow(layers, 1e-2)
    rec = out["records"]
    assert out["representation"] == "end-to-end" and out["status"] == "reached_loss_tol"
    assert (rec[:, COL["det_sign"]] == 1).all() and out["crossings"].size == 0
    # the depth-2 balanced flow drives det(W_e) far below float64's resolution of the layers
    assert rec[-1, COL["log10_abs_det"]] < -18
    times = rec[:, COL["time"]]
    sol = _scipy_layers(layers, times[-1], t_eval=times)
    checked = 0
    for k in range(times.size):
        lay = sol.y[:, k].reshape(2, 2, 2)
        det = np.linalg.det(lay[0]) * np.linalg.det(lay[1])
        # float64 layer entries resolve det to ~ (1e-12 + eps) sum ||W_j||^2 / |det W_j|
        bound = sum(1e-11 * (m * m).sum() / abs(np.linalg.det(m)) for m in lay)
        if bound < 1e-4:
            checked += 1
            assert det > 0
            assert math.log10(det) == pytest.approx(rec[k, COL["log10_abs_det"]], abs=3 * bound)
    assert checked >= 10


def _mp_crossing(layers, h, t_end, dps=30):
    """Classical RK4 in ``dps``-digit arithmetic (mpmath) on the layer ODE: the first time
    ``det(W_e)`` changes sign, interpolated linearly between steps."""
    mpmath.mp.dps = dps
    depth = len(layers)
    y = [mpmath.mpf(float(x)) for x in layers.ravel()]
    tgt = [mpmath.mpf(float(x)) for x in TARGET.ravel()]
    obs = [float(x) for x in OBSERVED.ravel()]

    def mm(a, b):
        return [
            a[0] * b[0] + a[1] * b[2],
            a[0] * b[1] + a[1] * b[3],
            a[2] * b[0] + a[3] * b[2],
            a[2] * b[1] + a[3] * b[3],
        ]

    def tr(a):
        return [a[0], a[2], a[1], a[3]]

    eye = [mpmath.mpf(1), mpmath.mpf(0), mpmath.mpf(0), mpmath.mpf(1)]

    def f(y):
        lay = [y[4 * j : 4 * j + 4] for j in range(depth)]
        pre = [eye]
        for m in lay:
            pre.append(mm(m, pre[-1]))
        g = [(pre[-1][i] - tgt[i]) * obs[i] for i in range(4)]
        out, suf = [None] * depth, eye
        for j in range(depth - 1, -1, -1):
            out[j] = [-x for x in mm(mm(tr(suf), g), tr(pre[j]))]
            suf = mm(suf, lay[j])
        return [x for m in out for x in m]

    def det(y):
        d = mpmath.mpf(1)
        for j in range(depth):
            d *= y[4 * j] * y[4 * j + 3] - y[4 * j + 1] * y[4 * j + 2]
        return d

    h = mpmath.mpf(h)
    t, d0 = mpmath.mpf(0), det(y)
    while t < t_end:
        k1 = f(y)
        k2 = f([a + h / 2 * b for a, b in zip(y, k1)])
        k3 = f([a + h / 2 * b for a, b in zip(y, k2)])
        k4 = f([a + h * b for a, b in zip(y, k3)])
        y = [a + h / 6 * (p + 2 * q + 2 * r + s) for a, p, q, r, s in zip(y, k1, k2, k3, k4)]
        d1 = det(y)
        if d1 * d0 < 0:
            return float(t + h * d0 / (d0 - d1))
        t, d0 = t + h, d1
    return None


def test_random_init_crossing_is_the_exact_flow():
    """From the preset's depth-2 Gaussian init the flow itself crosses det = 0 (at |det| ~1e-8,
    far above float64's resolution): 30-digit arithmetic finds the same crossing."""
    layers = _layers(2, "random", 1e-3, [0, 2, 0])
    out = integrate_flow(layers, 1e-2)
    (cross,) = out["crossings"]
    assert cross[2] > 1e3  # resolved far above the det error bound of the integration
    t_mp = _mp_crossing(layers, 0.02, 5.0)
    # RK4 at h = 0.02 and linear interpolation of det: error ~1e-5 in the crossing time
    assert t_mp == pytest.approx(cross[0], abs=1e-3)


@pytest.mark.parametrize("depth", [2, 3])
def test_balanced_flow_follows_the_rank_one_path(depth):
    out = integrate_flow(_layers(depth, "balanced", 1e-3, [0, depth, 1]), 1e-3)
    rec = out["records"]
    assert out["status"] == "reached_loss_tol" and (rec[:, COL["det_sign"]] == 1).all()
    w11, path = abs(rec[-1, COL["w11"]]), (2 * rec[-1, COL["loss"]]) ** -0.5
    # the rank-one path itself is off by ~2 loss (measured -2.0e-3 here, -2.0e-4 at 1e-4);
    # the integration error is below 1e-7 (tolerances 100x tighter change |W_11| less)
    assert abs(w11 / path - 1) < 3e-3
    again = integrate_flow(_layers(depth, "balanced", 1e-3, [0, depth, 1]), 1e-3)
    np.testing.assert_array_equal(again["records"], rec)  # deterministic


def test_preset_flow_exact_runs_report_deviation_and_sign(tmp_path):
    cfg = dataclasses.replace(
        PRESETS["mf-det-sign"].config,
        depths=(2, 3),
        modes=("gd", "flow-exact"),
        loss_tol=1e-2,
        max_steps_gd=200_000,
        workers=1,
    )
    out = run_config(cfg, tmp_path)
    runs = {(r["depth"], r["mode"], r["init"]): r for r in out.summary["runs"]}
    for d in (2, 3):
        bal = runs[(d, "flow-exact", "balanced")]
        assert bal["representation"] == "end-to-end" and not bal["crossed_det_zero"]
        assert abs(bal["w11_rel_dev"]) < 0.025  # ~2 loss off the asymptotic path at loss 1e-2
        rnd = runs[(d, "flow-exact", "random")]
        assert rnd["representation"] == "layers" and rnd["crossed_det_zero"]
        assert rnd["crossing_margins"][0] > 100
    assert out.summary["flow_runs"] == [n for n in out.summary["flow_runs"] if "flow-exact" in n]
    assert "depth2-gd-balanced" in out.summary["gd_crossed_by_rounding"]
    assert "depth2-gd-random" not in out.summary["gd_crossed_by_rounding"]
    text = out.summary_text()
    assert "GD runs that crossed det = 0 by rounding: depth2-gd-balanced" in text
    assert "exact flow (end-to-end" in text and "det never changed sign" in text
    assert (tmp_path / "figure.png").stat().st_size > 0


def test_bad_flow_keys(tmp_path, capsys):
    for key, msg in [
        ("flow_rtol=0", "flow_rtol must be in (0, 0.001)"),
        ("flow_atol=1", "flow_atol must be in (0, 0.001)"),
        ("max_steps_exact=0", "max_steps_exact must be >= 1"),
        ("modes=gd,exact", "modes must be one of 'gd', 'flow', 'flow-exact'"),
    ]:
        out = tmp_path / key.split("=")[0]
        assert main(["run", "mf-det-sign", "--set", key, "--out", str(out)]) == 2
        assert msg in capsys.readouterr().err
        assert not out.exists()
