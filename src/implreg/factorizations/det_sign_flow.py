"""Gradient flow of the 2x2 determinant-sign example, integrated with error control.

Razin & Cohen, "Implicit Regularization in Deep Learning May Not Be Explainable by
Norms" (NeurIPS 2020), Section 3: layers ``W_1 ... W_N`` (2x2), ``W_e = W_N ... W_1``,
loss ``L = 1/2 sum_obs (W_e - y)^2`` over the entries (1,2) = 1, (2,1) = 1, (2,2) = 0
(:data:`~implreg.factorizations.det_sign.OBSERVED`, ``TARGET``), and gradient flow
``dW_j/dt = -dL/dW_j``.  Their corollary (depth ``N >= 2``: ``det(W_e)`` keeps its sign)
rests on the singular-value dynamics of a *balanced* factorization (Arora, Cohen, Hu &
Luo, NeurIPS 2019, Theorem 3; REFERENCE §3 and §5), and from ``det > 0`` the fit then
forces ``|W_11| -> infinity`` along ``|W_11| = (2 loss)^{-1/2}``.

Two exact representations of the same flow, chosen per init by
:func:`choose_representation`:

``end-to-end`` (balanced inits, ``W_{j+1}^T W_{j+1} = W_j W_j^T``)
    Balancedness is conserved by the flow, and the product then moves by
    ``dW_e/dt = -sum_j (W_e W_e^T)^{(j-1)/N} grad (W_e^T W_e)^{(N-j)/N}`` (Arora,
    Cohen & Hazan, ICML 2018, Theorem 1).  With ``W_e = R(phi) diag(s_1, s_2) R(psi)^T``
    (rotations ``R``) and ``G = R(phi)^T grad R(psi)`` this reads, exactly,
    ``d log s_r/dt = -N s_r^{1-2/N} G_rr`` (Theorem 3 of Arora et al. 2019, divided
    by ``s_r``) and, with ``K = sum_j s_1^{2(j-1)/N} s_2^{2(N-j)/N}``,
    ``dphi/dt = -K (s_1 G_21 + s_2 G_12) / (s_1^2 - s_2^2)``,
    ``dpsi/dt = -K (s_1 G_12 + s_2 G_21) / (s_1^2 - s_2^2)``.  The state is
    ``(phi, psi, log s_1, log s_2)``: ``det(W_e) = s_1 s_2 > 0`` is carried as its
    logarithm, with full relative precision however small it gets (every term
    above is a product, so no rate is a difference of nearly equal numbers), and
    it cannot change sign, as the corollary says.
``layers`` (any other init)
    The layer entries themselves, ``dW_j/dt = -W_{j+1:N}^T grad W_{1:j-1}^T``.
    ``det(W_e)`` is recorded as ``prod_j det(W_j)`` (sign and ``log10``) with its
    rounding bound ``sum_j (rtol + eps) ||W_j||_F^2 / |det W_j|`` (relative), so a
    sign change is reported with the margin by which it was resolved.

Why this and not extended precision throughout (measured on this machine,
``bench/bench_det_sign_flow.py``): from the Gaussian ``random`` inits of
:func:`~implreg.factorizations.det_sign.init_layers` the layers are far from
balanced (unbalancedness ``~ s^2`` against ``||W_e|| ~ s^N``), and the exact flow
itself drives one layer's determinant through zero (seed 0: depth 2 at t = 4.59,
loss 0.21; depth 3 at t = 7.0, loss 0.97; depth 4 at t = 1701, loss 2.1e-4; the
first six seeds at depths 2 and 3 all cross, at end_std 1e-6 too), with the
det rounding bound ``1.7e2 ... 5.8e6`` times below the determinant one step
before.  A 30/40-digit mpmath Runge-Kutta integration finds the same crossing
(``test_random_init_crossing_is_the_exact_flow``), so more digits change
nothing there, and mpmath costs 0.24-0.47 ms per vector-field evaluation (about
1.6 h for the evaluations of the whole preset, against 13 s compiled).  Where
the determinant does get tiny, from balanced inits (depth 2: ``det(W_e) =
10^-1099`` at loss 1e-4; float64 layer entries lose it and cross ``det = 0`` by
rounding, as scipy's DOP853 does in the benchmark, ending at loss 1e-4 by t = 291),
the end-to-end representation is exact and needs no extra digits;
double-double arithmetic on the layers would only move that failure to ~1e-32.

The integrator is the Dormand-Prince 5(4) pair (Hairer, Norsett & Wanner,
Solving ODEs I, II.5) with the usual mixed error norm
``|e_i| / (atol + rtol max(|y_i|, |y_new_i|))``, compiled with numba.  Defaults
``rtol = 1e-10``, ``atol = 1e-12``: tightening both 100x changes ``|W_11|`` at
loss 1e-4 by less than 1e-8 relative at depths 2-4 (measured), six orders below
the 2% the rank-one path is checked to.  The stop at ``loss_tol`` and every
sign change of ``det(W_e)`` are located inside the step by bisection on the step
length (|log(loss / loss_tol)| <= 1e-12).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from implreg.factorizations.cp import _check_int, _check_real
from implreg.factorizations.det_sign import OBSERVED, TARGET, loss_and_grads

#: record columns of :func:`integrate_flow`
COLUMNS = (
    "time",
    "loss",
    "w11",
    "w12",
    "w21",
    "w22",
    "det_sign",
    "log10_abs_det",
    "sigma1",
    "log10_sigma2",
    "det_rel_err",
    "steps",
)
REPRESENTATIONS = ("end-to-end", "layers")
STATUS = ("reached_loss_tol", "max_steps", "non_finite", "step_size_underflow")
_EPS = float(np.finfo(np.float64).eps)
_LN10 = math.log(10.0)

# Dormand-Prince 5(4) tableau
_C = np.array([0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0])
_A = np.array(
    [
        [0, 0, 0, 0, 0, 0],
        [1 / 5, 0, 0, 0, 0, 0],
        [3 / 40, 9 / 40, 0, 0, 0, 0],
        [44 / 45, -56 / 15, 32 / 9, 0, 0, 0],
        [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729, 0, 0],
        [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656, 0],
        [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84],
    ]
)
_B5 = np.array([35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0])
_B4 = np.array([5179 / 57600, 0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40])


@njit(cache=True)
def _loss_and_residual(w):
    g = np.empty((2, 2))
    loss = 0.0
    for a in range(2):
        for b in range(2):
            r = (w[a, b] - TARGET[a, b]) * OBSERVED[a, b]
            g[a, b] = r
            loss += 0.5 * r * r
    return loss, g


@njit(cache=True)
def _rot(angle):
    c, s = math.cos(angle), math.sin(angle)
    r = np.empty((2, 2))
    r[0, 0], r[0, 1], r[1, 0], r[1, 1] = c, -s, s, c
    return r


@njit(cache=True)
def _e2e_matrix(y):
    """``W_e = R(phi) diag(s_1, s_2) R(psi)^T`` from ``y = (phi, psi, log s_1, log s_2)``."""
    u, v = _rot(y[0]), _rot(y[1])
    s1, s2 = math.exp(y[2]), math.exp(y[3])
    w = np.empty((2, 2))
    for a in range(2):
        for b in range(2):
            w[a, b] = u[a, 0] * s1 * v[b, 0] + u[a, 1] * s2 * v[b, 1]
    return w


@njit(cache=True)
def _rhs_e2e(y, depth, out):
    """End-to-end flow in ``(phi, psi, log s_1, log s_2)`` (module docstring); returns the loss."""
    w = _e2e_matrix(y)
    loss, g = _loss_and_residual(w)
    u, v = _rot(y[0]), _rot(y[1])
    gt = np.empty((2, 2))  # U^T grad V
    for a in range(2):
        for b in range(2):
            acc = 0.0
            for i in range(2):
                for k in range(2):
                    acc += u[i, a] * g[i, k] * v[k, b]
            gt[a, b] = acc
    n = float(depth)
    l1, l2 = y[2], y[3]
    out[2] = -n * math.exp((1.0 - 2.0 / n) * l1) * gt[0, 0]
    out[3] = -n * math.exp((1.0 - 2.0 / n) * l2) * gt[1, 1]
    # K / s_1^2 and (s_1^2 - s_2^2) / s_1^2 with r = s_2 / s_1, so nothing over- or underflows
    k_over = 0.0
    for j in range(1, depth + 1):
        k_over += math.exp((2.0 * (j - 1) / n - 2.0) * l1 + (2.0 * (depth - j) / n) * l2)
    r = math.exp(l2 - l1)
    s1 = math.exp(l1)
    den = 1.0 - r * r
    out[0] = -k_over * s1 * (gt[1, 0] + r * gt[0, 1]) / den
    out[1] = -k_over * s1 * (gt[0, 1] + r * gt[1, 0]) / den
    return loss


@njit(cache=True)
def _rhs_layers(y, depth, out):
    """Layer flow ``dW_j/dt = -dL/dW_j`` on the flattened layers; returns the loss."""
    loss, grads, _ = loss_and_grads(y.reshape((depth, 2, 2)))
    flat = grads.ravel()
    for i in range(out.size):
        out[i] = -flat[i]
    return loss


@njit(cache=True)
def _rhs(rep, y, depth, out):
    if rep == 0:
        return _rhs_e2e(y, depth, out)
    return _rhs_layers(y, depth, out)


@njit(cache=True)
def _observe(rep, y, depth, rtol):
    """``(W_e, det sign, log10|det|, sigma_1, log10 sigma_2, det relative rounding bound)``."""
    if rep == 0:
        w = _e2e_matrix(y)
        return w, 1.0, (y[2] + y[3]) / _LN10, math.exp(y[2]), y[3] / _LN10, 0.0
    layers = y.reshape((depth, 2, 2))
    w = layers[0].copy()
    sign = 1.0
    logdet = 0.0
    rel = 0.0
    for j in range(depth):
        m = layers[j]
        if j > 0:
            p = np.empty((2, 2))
            p[0, 0] = m[0, 0] * w[0, 0] + m[0, 1] * w[1, 0]
            p[0, 1] = m[0, 0] * w[0, 1] + m[0, 1] * w[1, 1]
            p[1, 0] = m[1, 0] * w[0, 0] + m[1, 1] * w[1, 0]
            p[1, 1] = m[1, 0] * w[0, 1] + m[1, 1] * w[1, 1]
            w = p
        d = m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
        fro2 = (m * m).sum()
        if d == 0.0:
            sign = 0.0
            logdet = -np.inf
            rel = np.inf
        else:
            if d < 0:
                sign = -sign
            logdet += math.log10(abs(d))
            rel += (rtol + _EPS) * fro2 / abs(d)
    fro2 = (w * w).sum()
    absdet = 10.0**logdet if logdet > -300.0 else 0.0
    disc = max(fro2 * fro2 - 4.0 * absdet * absdet, 0.0)
    s1 = math.sqrt(0.5 * (fro2 + math.sqrt(disc)))
    log_s2 = logdet - math.log10(s1) if s1 > 0 else -np.inf
    return w, sign, logdet, s1, log_s2, rel


@njit(cache=True)
def _step(rep, y, f0, h, depth, k, ytmp, y5, err):
    """One Dormand-Prince step from ``y`` (slope ``f0``): fills ``y5`` and ``err``; returns loss."""
    dim = y.size
    for i in range(dim):
        k[0, i] = f0[i]
    loss = 0.0
    for s in range(1, 7):
        for i in range(dim):
            acc = y[i]
            for m in range(s):
                acc += h * _A[s, m] * k[m, i]
            ytmp[i] = acc
        loss = _rhs(rep, ytmp, depth, k[s])
    for i in range(dim):
        acc5 = y[i]
        e = 0.0
        for m in range(7):
            acc5 += h * _B5[m] * k[m, i]
            e += h * (_B5[m] - _B4[m]) * k[m, i]
        y5[i] = acc5
        err[i] = e
    return loss  # the loss at y5 (stage 7 is evaluated there: FSAL)


@njit(cache=True)
def _sign_of(rep, y, depth):
    if rep == 0:
        return 1.0
    return _observe(rep, y, depth, 0.0)[1]


@njit(cache=True)
def _locate(rep, y, f0, h, depth, loss_tol, want_loss, sign0, k, ytmp, y5, err):
    """Bisection on the step length for the loss event or the det sign change; returns it."""
    lo, hi = 0.0, h
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lm = _step(rep, y, f0, mid, depth, k, ytmp, y5, err)
        if want_loss:
            if lm < loss_tol:
                hi = mid
            else:
                lo = mid
            if lm < loss_tol and math.log(loss_tol / lm) <= 1e-12:
                return mid
        else:
            if _sign_of(rep, y5, depth) * sign0 < 0:
                hi = mid
            else:
                lo = mid
        if hi - lo <= 1e-15 * max(abs(hi), 1e-300):
            break
    return hi


@njit(cache=True)
def _record(rec, count, rep, y, depth, t, loss, rtol, steps):
    w, sign, logdet, s1, log_s2, rel = _observe(rep, y, depth, rtol)
    rec[count, 0] = t
    rec[count, 1] = loss
    rec[count, 2] = w[0, 0]
    rec[count, 3] = w[0, 1]
    rec[count, 4] = w[1, 0]
    rec[count, 5] = w[1, 1]
    rec[count, 6] = sign
    rec[count, 7] = logdet
    rec[count, 8] = s1
    rec[count, 9] = log_s2
    rec[count, 10] = rel
    rec[count, 11] = steps


@njit(cache=True)
def _integrate(rep, y, depth, loss_tol, rtol, atol, max_steps, record_ratio, h0):
    """Adaptive Dormand-Prince 5(4) to ``loss <= loss_tol``; ``y`` is updated in place.

    Returns ``(status, steps, records, crossings)``; records as :data:`COLUMNS`, each
    crossing ``(time, loss, margin)`` with ``margin`` the reciprocal of the
    det rounding bound at the last step before it.
    """
    dim = y.size
    cap = 4000
    rec = np.empty((cap, len(COLUMNS)))
    cross = np.empty((64, 3))
    ncross = 0
    k = np.empty((7, dim))
    ytmp = np.empty(dim)
    y5 = np.empty(dim)
    err = np.empty(dim)
    f0 = np.empty(dim)
    loss = _rhs(rep, y, depth, f0)
    t = 0.0
    h = h0
    steps = 0
    count = 0
    _record(rec, count, rep, y, depth, t, loss, rtol, steps)
    count += 1
    last = loss
    if loss <= loss_tol:
        return 0, steps, rec[:count].copy(), cross[:0].copy()
    sign = _sign_of(rep, y, depth)
    status = 1
    while steps < max_steps:
        lnew = _step(rep, y, f0, h, depth, k, ytmp, y5, err)
        acc = 0.0
        for i in range(dim):
            sc = atol + rtol * max(abs(y[i]), abs(y5[i]))
            acc += (err[i] / sc) ** 2
        en = math.sqrt(acc / dim)
        if not math.isfinite(en) or not math.isfinite(lnew):
            h *= 0.2
            if h < 1e-300:
                status = 2
                break
            continue
        if en > 1.0:
            h *= max(0.2, 0.9 * en**-0.2)
            if t + h == t:
                status = 3
                break
            continue
        steps += 1
        nsign = _sign_of(rep, y5, depth)
        if nsign * sign < 0 and ncross < cross.shape[0]:
            margin = 1.0 / _observe(rep, y, depth, rtol)[5]
            hc = _locate(rep, y, f0, h, depth, loss_tol, False, sign, k, ytmp, y5, err)
            lc = _step(rep, y, f0, hc, depth, k, ytmp, y5, err)
            cross[ncross, 0] = t + hc
            cross[ncross, 1] = lc
            cross[ncross, 2] = margin
            ncross += 1
            if count < cap:
                _record(rec, count, rep, y5, depth, t + hc, lc, rtol, steps)
                count += 1
            lnew = _step(rep, y, f0, h, depth, k, ytmp, y5, err)  # the accepted step again
        if lnew <= loss_tol:
            hl = _locate(rep, y, f0, h, depth, loss_tol, True, sign, k, ytmp, y5, err)
            lnew = _step(rep, y, f0, hl, depth, k, ytmp, y5, err)
            t += hl
            y[:] = y5
            _record(rec, min(count, cap - 1), rep, y, depth, t, lnew, rtol, steps)
            count = min(count + 1, cap)
            status = 0
            break
        t += h
        y[:] = y5
        if nsign != 0:
            sign = nsign
        _rhs(rep, y, depth, f0)
        if lnew <= last * record_ratio and count < cap - 1:
            _record(rec, count, rep, y, depth, t, lnew, rtol, steps)
            count += 1
            last = lnew
        h *= min(5.0, max(0.2, 0.9 * en**-0.2)) if en > 0 else 5.0
    if status != 0:
        loss = _rhs(rep, y, depth, f0)
        _record(rec, min(count, cap - 1), rep, y, depth, t, loss, rtol, steps)
        count = min(count + 1, cap)
    return status, steps, rec[:count].copy(), cross[:ncross].copy()


def balancedness(layers: np.ndarray) -> float:
    """``max_j ||W_{j+1}^T W_{j+1} - W_j W_j^T||_F / max_j ||W_j||_F^2`` (0 at depth 1)."""
    layers = np.asarray(layers, dtype=np.float64)
    if layers.shape[0] < 2:
        return 0.0
    scale = max(float((m * m).sum()) for m in layers)
    gaps = [
        float(np.linalg.norm(layers[j + 1].T @ layers[j + 1] - layers[j] @ layers[j].T))
        for j in range(layers.shape[0] - 1)
    ]
    return max(gaps) / scale


def choose_representation(layers: np.ndarray, tol: float = 1e-12) -> str:
    """``end-to-end`` for balanced layers (relative gap ``<= tol``) at depth >= 2 with
    ``det(W_e) > 0`` and distinct singular values, else ``layers``."""
    layers = np.asarray(layers, dtype=np.float64)
    if layers.shape[0] < 2 or balancedness(layers) > tol:
        return "layers"
    w = layers[0]
    for m in layers[1:]:
        w = m @ w
    s = np.linalg.svd(w, compute_uv=False)
    if np.linalg.det(w) <= 0 or s[1] >= s[0] * (1 - 1e-8):
        return "layers"
    return "end-to-end"


def end_to_end_state(layers: np.ndarray) -> np.ndarray:
    """``(phi, psi, log s_1, log s_2)`` of ``W_e = R(phi) diag(s) R(psi)^T`` (needs det > 0)."""
    w = layers[0]
    for m in layers[1:]:
        w = m @ w
    u, s, vt = np.linalg.svd(w)
    if np.linalg.det(u) < 0:  # det(W_e) > 0, so det(vt) < 0 too: flip both
        u[:, 1] *= -1.0
        vt[1] *= -1.0
    return np.array([math.atan2(u[1, 0], u[0, 0]), math.atan2(vt[0, 1], vt[0, 0]), *np.log(s)])


def integrate_flow(
    layers: np.ndarray,
    loss_tol: float,
    *,
    rtol: float = 1e-10,
    atol: float = 1e-12,
    max_steps: int = 50_000_000,
    record_ratio: float = 0.97,
    representation: str = "auto",
) -> dict:
    """Gradient flow from ``layers`` (``(N, 2, 2)``, e.g. from ``det_sign.init_layers``) to
    ``loss <= loss_tol``, with error control ``rtol``/``atol`` (module docstring).

    Records (:data:`COLUMNS`) are taken each time the loss fell by ``record_ratio``,
    at every sign change of ``det(W_e)`` and at the end.  Returns a dict with
    ``status`` (:data:`STATUS`), ``steps`` (accepted), ``representation``,
    ``records`` (array), ``crossings`` (``(time, loss, margin)`` rows) and the
    final state: ``layers`` for the layer representation, ``end_to_end`` otherwise.
    The input is not modified.
    """
    layers = np.array(layers, dtype=np.float64)
    if layers.ndim != 3 or layers.shape[0] < 1 or layers.shape[1:] != (2, 2):
        raise ValueError(f"layers must have shape (N, 2, 2) with N >= 1, got {layers.shape}")
    if not np.isfinite(layers).all():
        raise ValueError("layers must be finite")
    loss_tol = _check_real("loss_tol", loss_tol, positive=True)
    rtol = _check_real("rtol", rtol, positive=True)
    atol = _check_real("atol", atol, positive=True)
    max_steps = _check_int("max_steps", max_steps, minimum=1)
    record_ratio = _check_real("record_ratio", record_ratio, positive=True)
    if record_ratio >= 1:
        raise ValueError(f"record_ratio must lie in (0, 1), got {record_ratio}")
    if representation == "auto":
        representation = choose_representation(layers)
    if representation not in REPRESENTATIONS:
        raise ValueError(
            f"unknown representation {representation!r}; use 'auto', 'end-to-end' or 'layers'"
        )
    depth = layers.shape[0]
    if representation == "end-to-end":
        if depth < 2 or choose_representation(layers) != "end-to-end":
            raise ValueError(
                "the end-to-end representation needs balanced layers at depth >= 2 with det > 0"
            )
        y = end_to_end_state(layers)
        rep = 0
    else:
        y = layers.ravel().copy()
        rep = 1
    status, steps, rec, cross = _integrate(
        rep, y, depth, loss_tol, rtol, atol, max_steps, record_ratio, 1e-3
    )
    out = {
        "status": STATUS[status],
        "steps": int(steps),
        "representation": representation,
        "records": rec,
        "crossings": cross,
    }
    if rep == 0:
        out["end_to_end"] = y
    else:
        out["layers"] = y.reshape(depth, 2, 2)
    return out
