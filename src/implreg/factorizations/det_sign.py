"""A compiled float64 gradient-descent loop for the 2x2 determinant-sign example.

Razin & Cohen, "Implicit Regularization in Deep Learning May Not Be Explainable by
Norms" (NeurIPS 2020), Section 3: a depth-N factorization
``W_e = W_N ... W_1`` of 2x2 matrices fits the entries (1,2) = 1, (2,1) = 1,
(2,2) = 0 with the loss ``1/2 sum (pred - y)^2``.  Every solution has
``det = -1``; gradient flow cannot change the sign of ``det(W_e)``, so from an
init with ``det > 0`` the fit forces ``|W_11| -> infinity`` along the rank-one
path ``|W_11| = (2 loss)^{-1/2}``.

Reaching loss 1e-4 takes millions of steps at depth 3-4, so the step loop is
compiled with numba; one step of a depth-4 run costs tens of nanoseconds.

Two step rules:

``gd``
    plain gradient descent with a fixed step ``lr`` (the published setting);
``flow``
    a flow-faithful discretization with step control: a step is accepted only
    if the loss does not rise, ``det(W_e)`` keeps its sign, and both
    ``det(W_e)`` and ``W_e`` change by at most a fraction ``c`` (relative);
    otherwise the step is halved and retried.  After an accepted step it grows
    by 10%.  Gradient flow from a balanced factorization never changes the sign
    of ``det(W_e)`` (Razin & Cohen 2020, Section 3); from unbalanced inits it can
    (measured: :mod:`implreg.factorizations.det_sign_flow`).  These iterates stay
    within ``O(c)`` of the flow and refuse a step that flips the sign.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from implreg.factorizations.cp import _check_int, _check_real

OBSERVED = np.array([[0.0, 1.0], [1.0, 1.0]])
TARGET = np.array([[0.0, 1.0], [1.0, 0.0]])


@njit(cache=True)
def _mm(a, b):
    out = np.empty((2, 2))
    out[0, 0] = a[0, 0] * b[0, 0] + a[0, 1] * b[1, 0]
    out[0, 1] = a[0, 0] * b[0, 1] + a[0, 1] * b[1, 1]
    out[1, 0] = a[1, 0] * b[0, 0] + a[1, 1] * b[1, 0]
    out[1, 1] = a[1, 0] * b[0, 1] + a[1, 1] * b[1, 1]
    return out


@njit(cache=True)
def _mtm(a, b):  # a^T b
    out = np.empty((2, 2))
    out[0, 0] = a[0, 0] * b[0, 0] + a[1, 0] * b[1, 0]
    out[0, 1] = a[0, 0] * b[0, 1] + a[1, 0] * b[1, 1]
    out[1, 0] = a[0, 1] * b[0, 0] + a[1, 1] * b[1, 0]
    out[1, 1] = a[0, 1] * b[0, 1] + a[1, 1] * b[1, 1]
    return out


@njit(cache=True)
def _mmt(a, b):  # a b^T
    out = np.empty((2, 2))
    out[0, 0] = a[0, 0] * b[0, 0] + a[0, 1] * b[0, 1]
    out[0, 1] = a[0, 0] * b[1, 0] + a[0, 1] * b[1, 1]
    out[1, 0] = a[1, 0] * b[0, 0] + a[1, 1] * b[0, 1]
    out[1, 1] = a[1, 0] * b[1, 0] + a[1, 1] * b[1, 1]
    return out


@njit(cache=True)
def loss_and_grads(layers):
    """Loss ``1/2 sum_obs (W_e - y)^2`` and its gradient for each layer ``(N, 2, 2)``."""
    n = layers.shape[0]
    prefix = np.empty((n + 1, 2, 2))  # prefix[j] = W_{j-1} ... W_0 (identity for j = 0)
    prefix[0] = np.eye(2)
    for j in range(n):
        prefix[j + 1] = _mm(layers[j], prefix[j])
    w = prefix[n]
    g = np.empty((2, 2))
    loss = 0.0
    for a in range(2):
        for b in range(2):
            r = (w[a, b] - TARGET[a, b]) * OBSERVED[a, b]
            g[a, b] = r
            loss += 0.5 * r * r
    grads = np.empty_like(layers)
    suffix = np.eye(2)  # W_{n-1} ... W_{j+1}
    for j in range(n - 1, -1, -1):
        grads[j] = _mmt(_mtm(suffix, g), prefix[j])
        suffix = _mm(suffix, layers[j])
    return loss, grads, w


@njit(cache=True)
def _forward(layers):
    w = layers[0].copy()
    for j in range(1, layers.shape[0]):
        w = _mm(layers[j], w)
    loss = 0.0
    for a in range(2):
        for b in range(2):
            r = (w[a, b] - TARGET[a, b]) * OBSERVED[a, b]
            loss += 0.5 * r * r
    return loss, w


def run_gd(layers, lr, flow_c, loss_tol, max_steps, record_ratio):
    """Run GD in place on ``layers`` (``(N, 2, 2)`` float64) until ``loss < loss_tol``.

    Checks the arguments, then runs the compiled loop (:func:`_run_gd`, whose
    docstring describes the step rules, the records and the returned status).
    ``lr`` and ``record_ratio`` (in ``(0, 1]``) must be positive, ``flow_c`` finite
    (``<= 0`` selects plain GD), ``loss_tol >= 0`` and ``max_steps`` a non-negative
    integer; ``layers`` a writable C-contiguous float64 array ``(N, 2, 2)``.
    """
    if not isinstance(layers, np.ndarray):
        raise TypeError(f"layers must be a numpy array (N, 2, 2), got {type(layers).__name__}")
    if layers.dtype != np.float64:
        raise TypeError(f"layers must be float64, got dtype {layers.dtype}")
    if layers.ndim != 3 or layers.shape[0] < 1 or layers.shape[1:] != (2, 2):
        raise ValueError(f"layers must have shape (N, 2, 2) with N >= 1, got {layers.shape}")
    if not (layers.flags.c_contiguous and layers.flags.writeable):
        raise ValueError("layers must be a writable C-contiguous array (it is updated in place)")
    if not np.isfinite(layers).all():
        raise ValueError("layers must be finite")
    lr = _check_real("lr", lr, positive=True)
    flow_c = _check_real("flow_c", flow_c)
    loss_tol = _check_real("loss_tol", loss_tol, nonnegative=True)
    max_steps = _check_int("max_steps", max_steps, minimum=0)
    record_ratio = _check_real("record_ratio", record_ratio, positive=True)
    if record_ratio > 1:
        raise ValueError(f"record_ratio must lie in (0, 1], got {record_ratio}")
    return _run_gd(layers, lr, flow_c, loss_tol, max_steps, record_ratio)


@njit(cache=True)
def _run_gd(layers, lr, flow_c, loss_tol, max_steps, record_ratio):
    """Run GD in place on ``layers`` (``(N, 2, 2)`` float64) until ``loss < loss_tol``.

    ``flow_c <= 0`` selects plain GD with step ``lr``; ``flow_c > 0`` the
    flow-faithful step control (module docstring) starting from ``lr``.  A
    record ``(step, loss, W_11, W_12, W_21, W_22, det, time)`` each time the loss has
    fallen by the factor ``record_ratio`` since the last record, and at every
    sign change of ``det(W_e)``; ``time`` is the sum of the steps taken.
    Returns ``(status, steps, records)`` with status 0 = reached ``loss_tol``,
    1 = ``max_steps``, 2 = non-finite loss, 3 = step control failed.
    """
    cap = 20000
    records = np.empty((cap, 8))
    count = 0
    last_loss = np.inf
    last_sign = 0.0
    time = 0.0
    status = 1
    step = 0
    eta = lr
    trial = np.empty_like(layers)
    while step <= max_steps:
        loss, grads, w = loss_and_grads(layers)
        det = w[0, 0] * w[1, 1] - w[0, 1] * w[1, 0]
        sign = 1.0 if det > 0 else (-1.0 if det < 0 else 0.0)
        if not np.isfinite(loss):
            status = 2
            break
        changed = sign != 0.0 and last_sign != 0.0 and sign != last_sign
        done = loss < loss_tol
        if (loss <= last_loss * record_ratio or changed or step == 0 or done) and count < cap:
            records[count, 0] = step
            records[count, 1] = loss
            records[count, 2] = w[0, 0]
            records[count, 3] = w[0, 1]
            records[count, 4] = w[1, 0]
            records[count, 5] = w[1, 1]
            records[count, 6] = det
            records[count, 7] = time
            count += 1
            last_loss = loss
        if sign != 0.0:
            last_sign = sign
        if done:
            status = 0
            break
        if step == max_steps:
            break
        if flow_c <= 0.0:
            layers -= lr * grads
            time += lr
        else:
            wn = np.sqrt((w * w).sum())
            accepted = False
            for _ in range(200):
                trial[:] = layers - eta * grads
                tloss, tw = _forward(trial)
                tdet = tw[0, 0] * tw[1, 1] - tw[0, 1] * tw[1, 0]
                dw = np.sqrt(((tw - w) * (tw - w)).sum())
                if (
                    tloss <= loss
                    and tdet * det > 0.0
                    and abs(tdet - det) <= flow_c * abs(det)
                    and dw <= flow_c * wn
                ):
                    accepted = True
                    break
                eta *= 0.5
            if not accepted:
                status = 3
                break
            layers[:] = trial
            time += eta
            eta *= 1.1
        step += 1
    return status, step, records[:count].copy()


def init_layers(depth: int, init: str, end_std: float, rng: np.random.Generator) -> np.ndarray:
    """Layers ``(depth, 2, 2)`` with ``det(W_e) > 0``.

    ``random``: i.i.d. N(0, s^2) entries with ``s^depth 2^{(depth-1)/2} = end_std`` (the
    entry std of the product), the first row of ``W_1`` negated if ``det < 0``.
    ``balanced``: a random ``M`` with entry std ``end_std`` and ``det M > 0``,
    ``M = U S V^T``, ``W_1 = S^{1/N} V^T``, ``W_j = S^{1/N}``, ``W_N = U S^{1/N}`` so that
    ``W_{j+1}^T W_{j+1} = W_j W_j^T``.
    """
    depth = _check_int("depth", depth, minimum=1)
    end_std = _check_real("end_std", end_std, positive=True)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if init == "random":
        s = (end_std / 2 ** ((depth - 1) / 2)) ** (1.0 / depth)
        layers = rng.normal(0.0, s, size=(depth, 2, 2))
        if np.linalg.det(product(layers)) < 0:
            layers[0, 0] *= -1.0
        return layers
    if init == "balanced":
        m = rng.normal(0.0, end_std, size=(2, 2))
        if np.linalg.det(m) < 0:
            m[:, 0] *= -1.0
        u, sv, vt = np.linalg.svd(m)
        if np.linalg.det(u) < 0:  # then det(vt) < 0 too: flip both, the product is unchanged
            u[:, 1] *= -1.0
            vt[1] *= -1.0
        root = np.diag(sv ** (1.0 / depth))
        if depth == 1:
            return (u @ np.diag(sv) @ vt)[None]
        mids = [root.copy() for _ in range(depth - 2)]
        return np.stack([root @ vt, *mids, u @ root])
    raise ValueError(f"unknown init {init!r}; use 'random' or 'balanced'")


def product(layers: np.ndarray) -> np.ndarray:
    """End matrix ``W_N ... W_1`` of layers ``(N, 2, 2)``."""
    layers = np.asarray(layers)
    if layers.ndim != 3 or layers.shape[0] < 1 or layers.shape[1:] != (2, 2):
        raise ValueError(f"layers must have shape (N, 2, 2) with N >= 1, got {layers.shape}")
    w = layers[0]
    for layer in layers[1:]:
        w = layer @ w
    return w
