"""L-BFGS over a batch of independent problems, each with its own history and step.

``torch.optim.LBFGS`` minimizes one scalar: used on a sum of independent
problems (the ten one-vs-all tasks of Figure 4) it shares one step length and
one curvature history among them, and its strong-Wolfe line search can step
into overflow.  Here every problem ``b`` of the batch keeps its own memory
``(s_i, y_i)``, its own two-loop direction and its own backtracking (Armijo)
step; a trial value that is not finite is simply rejected.  All arithmetic is
vectorized over the batch, so one evaluation of ``fun`` (one matrix product
for all problems) serves every problem at each trial.

Reference: Nocedal & Wright, *Numerical Optimization* (2006), Algorithms 7.4
(two-loop recursion) and 3.1 (backtracking).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from implreg.factorizations.cp import _check_int, _check_real

Tensor = torch.Tensor
GradientOf = Callable[[Tensor], Tensor]
Objective = Callable[[Tensor, Tensor], tuple[Tensor, GradientOf]]


@dataclass
class LBFGSResult:
    """Final point ``x`` ``(B, P)``, its losses ``(B,)`` and the iteration and evaluation counts.

    ``grad_norm`` ``(B,)`` is each problem's final gradient norm; ``converged`` ``(B,)`` marks
    the problems stopped by the ``rel_tol`` rule or unable to step even along steepest descent
    (converged to rounding); ``rel_change`` ``(B,)`` is each problem's relative loss decrease
    over its last ``window`` iterations (or its last iteration when ``window`` is 0).
    """

    x: Tensor
    loss: Tensor
    iterations: int
    evaluations: int
    history: list[Tensor]
    grad_norm: Tensor | None = None
    converged: Tensor | None = None
    rel_change: Tensor | None = None


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1)


def minimize(
    fun: Objective,
    x0: Tensor,
    *,
    max_iter: int = 500,
    memory: int = 20,
    c1: float = 1e-4,
    max_backtracks: int = 30,
    rel_tol: float = 0.0,
    window: int = 0,
    record_every: int = 0,
    callback: Callable[[int, Tensor], bool | None] | None = None,
) -> LBFGSResult:
    """Minimize ``B`` independent objectives from ``x0`` ``(B, P)``.

    ``fun(x, idx)`` evaluates the problems ``idx`` (a long tensor) at ``x``
    ``(len(idx), P)``: it returns their losses and a function that, given
    positions ``sel`` into ``idx``, returns the gradients ``(len(sel), P)`` of
    those problems.  Gradients are thus computed only where a step is accepted,
    and a backtracking trial re-evaluates only the problems still pending.
    Each iteration takes the L-BFGS direction of every problem and backtracks
    (halving) until the Armijo condition holds for each; problems whose step
    cannot be accepted keep their point and restart from steepest descent.
    ``rel_tol > 0`` freezes a problem once one iteration improves its loss by
    less than ``rel_tol`` (relative) three times in a row; with ``window > 0`` instead once
    its loss has fallen by less than ``rel_tol`` (relative) over its last ``window``
    iterations (a slow creep passes the three-in-a-row rule long before it has converged).
    ``history`` holds the losses every ``record_every`` iterations (if > 0).
    ``callback(iteration, losses)`` is called after every iteration; returning
    True stops the minimization there.
    """
    if not callable(fun):
        raise TypeError(f"fun must be callable, got {type(fun).__name__}")
    if not isinstance(x0, Tensor) or not x0.is_floating_point():
        raise TypeError(
            "x0 must be a floating-point tensor (batch, parameters), got "
            + (f"dtype {x0.dtype}" if isinstance(x0, Tensor) else type(x0).__name__)
        )
    if x0.dim() != 2:
        raise ValueError(f"x0 must be (batch, parameters), got shape {tuple(x0.shape)}")
    max_iter = _check_int("max_iter", max_iter, minimum=0)
    memory = _check_int("memory", memory, minimum=1)
    c1 = _check_real("c1", c1)
    if not 0 < c1 < 1:
        raise ValueError(f"c1 (the Armijo constant) must lie in (0, 1), got {c1}")
    max_backtracks = _check_int("max_backtracks", max_backtracks, minimum=1)
    rel_tol = _check_real("rel_tol", rel_tol, nonnegative=True)
    window = _check_int("window", window, minimum=0)
    record_every = _check_int("record_every", record_every, minimum=0)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    x = x0.detach().clone()
    batch = x.shape[0]
    dev = x.device
    loss, grad_of = fun(x, torch.arange(batch, device=dev))
    grad = grad_of(torch.arange(batch, device=dev))
    if not bool(torch.isfinite(loss).all()):
        raise ValueError("the objective is not finite at the starting point")
    evaluations = 1
    params = x.shape[1]
    # Per-problem ring buffers of the last ``memory`` pairs: slot ``(pos - 1 - k) % memory``
    # holds a problem's k-th newest pair, valid for ``k < count``.
    s_mem = torch.zeros(batch, memory, params, dtype=x.dtype, device=dev)
    y_mem = torch.zeros(batch, memory, params, dtype=x.dtype, device=dev)
    rho_mem = torch.zeros(batch, memory, dtype=x.dtype, device=dev)
    count = torch.zeros(batch, dtype=torch.long, device=dev)
    pos = torch.zeros(batch, dtype=torch.long, device=dev)
    rows = torch.arange(batch, device=dev)
    active = torch.ones(batch, dtype=torch.bool, device=dev)
    slow = torch.zeros(batch, dtype=torch.long, device=dev)
    scale = torch.ones(batch, dtype=x.dtype, device=dev)
    stalled = torch.zeros(batch, dtype=torch.bool, device=dev)
    # Losses of the last ``window + 1`` iterations, oldest first (ring: row ``it % (window+1)``).
    past = loss.to(torch.float64).repeat(window + 1, 1)
    last_change = torch.zeros(batch, dtype=torch.float64, device=dev)
    history: list[Tensor] = []
    it = 0
    for it in range(1, max_iter + 1):
        if not bool(active.any()):
            it -= 1
            break
        # Two-loop recursion, batched over the problems' own buffers.
        depth = int(count.max())
        q = grad.clone()
        alphas = []
        for k in range(depth):
            slot = (pos - 1 - k) % memory
            valid = (k < count).to(x.dtype)
            s_k, y_k = s_mem[rows, slot], y_mem[rows, slot]
            a = valid * rho_mem[rows, slot] * _dot(s_k, q)
            q -= a[:, None] * y_k
            alphas.append((a, s_k, y_k, valid * rho_mem[rows, slot]))
        # Initial Hessian scale: s.y / y.y of the problem's latest pair, or 1/|g| without memory.
        gamma = torch.where(count > 0, scale, 1.0 / grad.norm(dim=1).clamp_min(1e-12))
        r = q * gamma[:, None]
        for a, s_k, y_k, rho_k in reversed(alphas):
            b = rho_k * _dot(y_k, r)
            r += (a - b)[:, None] * s_k
        direction = -r
        slope = _dot(grad, direction)
        bad = ~(slope < 0) | ~torch.isfinite(slope)
        if bool(bad.any()):
            steep = -grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-12)
            direction = torch.where(bad[:, None], steep, direction)
            slope = _dot(grad, direction)
        step = torch.ones(batch, dtype=x.dtype, device=dev)
        pending = active.clone()
        new_x, new_loss, new_grad = x.clone(), loss.clone(), grad.clone()
        for _ in range(max_backtracks):
            idx = pending.nonzero().squeeze(1)
            trial = x[idx] + step[idx, None] * direction[idx]
            t_loss, t_grad_of = fun(trial, idx)
            evaluations += 1
            # Armijo, and a strict decrease: at rounding level the Armijo margin
            # vanishes and an unchanged loss must count as no progress.
            ok = torch.isfinite(t_loss) & (t_loss <= loss[idx] + c1 * step[idx] * slope[idx])
            ok &= t_loss < loss[idx]
            if bool(ok.any()):
                sel = ok.nonzero().squeeze(1)
                acc = idx[sel]
                new_x[acc] = trial[sel]
                new_loss[acc] = t_loss[sel]
                new_grad[acc] = t_grad_of(sel)
                pending[acc] = False
            if not bool(pending.any()):
                break
            step = torch.where(pending, step * 0.5, step)
        failed = pending
        s_new = new_x - x
        y_new = new_grad - grad
        sy = _dot(s_new, y_new)
        good = (~failed) & active & (sy > 1e-10 * s_new.norm(dim=1) * y_new.norm(dim=1))
        if bool(good.any()):
            g_idx = good.nonzero().squeeze(1)
            slot = pos[g_idx]
            s_mem[g_idx, slot] = s_new[g_idx]
            y_mem[g_idx, slot] = y_new[g_idx]
            rho_mem[g_idx, slot] = 1.0 / sy[g_idx]
            scale[g_idx] = sy[g_idx] / _dot(y_new[g_idx], y_new[g_idx])
            pos[g_idx] = (slot + 1) % memory
            count[g_idx] = (count[g_idx] + 1).clamp(max=memory)
        if bool(failed.any()):
            # A problem that cannot step even along steepest descent has converged
            # to rounding; otherwise forget its memory and retry steepest descent.
            stuck = failed & (count == 0) & active
            stalled |= stuck
            active &= ~stuck
            count[failed] = 0
        new64 = new_loss.to(torch.float64)
        if window > 0:
            oldest = past[it % (window + 1)]  # the loss ``window`` iterations ago (or the start)
            last_change = torch.where(
                active, (oldest - new64) / oldest.abs().clamp_min(1e-300), last_change
            )
            past[it % (window + 1)] = new64
            if rel_tol > 0 and it >= window:
                done = active & (oldest - new64 <= rel_tol * oldest.abs())
                stalled |= done
                active &= ~done
        else:
            old64 = loss.to(torch.float64)
            last_change = torch.where(
                active, (old64 - new64) / old64.abs().clamp_min(1e-300), last_change
            )
            if rel_tol > 0:
                small = (loss - new_loss) <= rel_tol * loss.abs()
                slow = torch.where(small & active, slow + 1, torch.zeros_like(slow))
                done = active & (slow >= 3)
                stalled |= done
                active &= ~done
        x, loss, grad = new_x, new_loss, new_grad
        if record_every and it % record_every == 0:
            history.append(loss.clone())
        if callback is not None and callback(it, loss):
            break
    return LBFGSResult(
        x=x,
        loss=loss,
        iterations=it,
        evaluations=evaluations,
        history=history,
        grad_norm=grad.norm(dim=1),
        converged=stalled,
        rel_change=last_change,
    )
