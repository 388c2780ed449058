"""Optimizers over batched parameters, and stop rules.

Parameters are tensors whose first axis indexes ``B`` independent runs; each
run keeps its own optimizer state, and a boolean ``active`` mask of shape
``(B,)`` freezes runs that have converged or diverged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


def _per_run(x: Tensor, like: Tensor) -> Tensor:
    return x.view((-1,) + (1,) * (like.dim() - 1)).to(like.dtype)


def _apply(params: Sequence[Tensor], updates: Sequence[Tensor], active: Tensor) -> None:
    every = bool(active.all())
    for p, u in zip(params, updates):
        if every:
            p.sub_(u)
        else:
            p.sub_(torch.where(_per_run(active, p).bool(), u, torch.zeros_like(u)))


def squared_norms(grads: Sequence[Tensor]) -> Tensor:
    """``||g||^2`` of the concatenation of ``grads`` for each run, in float64, ``(B,)``."""
    out = None
    for g in grads:
        sq = torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1, dtype=torch.float64)
        out = sq * sq if out is None else out + sq * sq
    assert out is not None
    return out


class GD:
    """Plain gradient descent ``theta <- theta - lr * g``."""

    name = "gd"

    def __init__(self, lr: float):
        self.lr = float(lr)

    def step(self, params: Sequence[Tensor], grads: Sequence[Tensor], active: Tensor) -> None:
        _apply(params, [g * self.lr for g in grads], active)

    def compact(self, keep: Sequence[int]) -> None:
        """Keep only the runs at positions ``keep`` (GD has no state)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class AdaptiveGD:
    """Gradient descent with one global adaptive step per run (Razin et al. 2021, App. B.2).

    With ``g`` the concatenation of all gradients of a run:
    ``v_t = beta v_{t-1} + (1 - beta) ||g_t||^2``, ``v_0 = 0``;
    ``v_hat = v_t / (1 - beta^t)``; ``eta_t = lr / (sqrt(v_hat) + eps)`` (eps after the
    square root); ``theta <- theta - eta_t g_t``.  The per-run scalars ``v`` and ``t``
    are Python floats (IEEE double): the bookkeeping costs no tensor operations.
    """

    name = "adaptive"

    def __init__(self, lr: float, *, beta: float = 0.99, eps: float = 1e-6):
        self.lr, self.beta, self.eps = float(lr), float(beta), float(eps)
        self.v: list[float] = []
        self.t: list[int] = []

    def step_sizes(self, grads: Sequence[Tensor], active: Sequence[bool]) -> list[float]:
        """Advance ``v`` and ``t`` of active runs and return ``eta_t`` per run."""
        sq = squared_norms(grads).tolist()
        if not self.v:
            self.v = [0.0] * len(sq)
            self.t = [0] * len(sq)
        eta = []
        for b, s2 in enumerate(sq):
            if active[b]:
                self.t[b] += 1
                self.v[b] = self.beta * self.v[b] + (1.0 - self.beta) * s2
            t = max(self.t[b], 1)
            v_hat = self.v[b] / (1.0 - self.beta**t)
            eta.append(
                self.lr / (math.sqrt(v_hat) + self.eps) if math.isfinite(v_hat) else math.nan
            )
        return eta

    def step(self, params: Sequence[Tensor], grads: Sequence[Tensor], active: Tensor) -> None:
        act = active.tolist()
        eta = self.step_sizes(grads, act)
        if len(act) == 1:
            if act[0]:
                for p, g in zip(params, grads):
                    p.add_(g, alpha=-eta[0])
            return
        steps = torch.tensor([e if a else 0.0 for e, a in zip(eta, act)], dtype=torch.float64)
        if all(act):
            for p, g in zip(params, grads):
                p.addcmul_(g, _per_run(steps, g), value=-1.0)
        else:  # a frozen run may hold a non-finite gradient: never multiply it in
            _apply(params, [g * _per_run(steps, g) for g in grads], active)

    def compact(self, keep: Sequence[int]) -> None:
        """Keep only the state of the runs at positions ``keep``."""
        if self.v:
            self.v = [self.v[i] for i in keep]
            self.t = [self.t[i] for i in keep]

    def state_dict(self) -> dict:
        return {"v": list(self.v), "t": list(self.t)}

    def load_state_dict(self, state: dict) -> None:
        self.v, self.t = list(state["v"]), list(state["t"])


class Adam:
    """Adam (Kingma & Ba 2015), elementwise, with bias correction; one step count per run."""

    name = "adam"

    def __init__(self, lr: float, *, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.lr, self.betas, self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.m: list[Tensor] | None = None
        self.v: list[Tensor] | None = None
        self.t: Tensor | None = None

    def step(self, params: Sequence[Tensor], grads: Sequence[Tensor], active: Tensor) -> None:
        b1, b2 = self.betas
        if self.m is None or self.v is None or self.t is None:
            self.m = [torch.zeros_like(g) for g in grads]
            self.v = [torch.zeros_like(g) for g in grads]
            self.t = torch.zeros(grads[0].shape[0], dtype=torch.float64)
        self.t = self.t + active.to(torch.float64)
        c1 = 1.0 - torch.pow(b1, self.t)
        c2 = 1.0 - torch.pow(b2, self.t)
        updates = []
        every = bool(active.all())
        for i, g in enumerate(grads):
            if every:
                self.m[i].mul_(b1).add_(g, alpha=1.0 - b1)
                self.v[i].mul_(b2).addcmul_(g, g, value=1.0 - b2)
            else:  # frozen runs keep their moments
                keep = _per_run(active, g).bool()
                self.m[i] = torch.where(keep, self.m[i] * b1 + (1.0 - b1) * g, self.m[i])
                self.v[i] = torch.where(keep, self.v[i] * b2 + (1.0 - b2) * g * g, self.v[i])
            m_hat = self.m[i] / _per_run(c1.clamp_min(1e-300), g)
            v_hat = self.v[i] / _per_run(c2.clamp_min(1e-300), g)
            updates.append(self.lr * m_hat / (v_hat.sqrt() + self.eps))
        _apply(params, updates, active)

    def compact(self, keep: Sequence[int]) -> None:
        """Keep only the state of the runs at positions ``keep``."""
        if self.m is not None and self.v is not None and self.t is not None:
            self.m = [x[list(keep)] for x in self.m]
            self.v = [x[list(keep)] for x in self.v]
            self.t = self.t[list(keep)]

    def state_dict(self) -> dict:
        """A snapshot: later steps do not change it."""

        def copy(x):
            return None if x is None else [t.clone() for t in x]

        return {
            "m": copy(self.m),
            "v": copy(self.v),
            "t": None if self.t is None else self.t.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.m = None if state["m"] is None else [t.clone() for t in state["m"]]
        self.v = None if state["v"] is None else [t.clone() for t in state["v"]]
        self.t = None if state["t"] is None else state["t"].clone()


def make_optimizer(name: str, *, lr: float, eps: float | None = None, beta: float = 0.99):
    """Optimizer by name: ``adaptive`` (the papers'), ``gd`` or ``adam``."""
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr}")
    if eps is not None and not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive finite number, got {eps}")
    if not 0 <= beta < 1:
        raise ValueError(f"beta must lie in [0, 1), got {beta}")
    if name == "adaptive":
        return AdaptiveGD(lr, beta=beta, eps=1e-6 if eps is None else eps)
    if name == "gd":
        return GD(lr)
    if name == "adam":
        return Adam(lr, eps=1e-8 if eps is None else eps)
    raise ValueError(f"unknown optimizer {name!r}; use 'adaptive', 'gd' or 'adam'")


@dataclass
class StopRule:
    """Stop a run when its loss stays below ``tol`` for ``patience`` consecutive checks.

    Checks happen every ``check_every`` iterations (Razin et al. 2021, Appendix B: ``1e-8``, 51
    checks, every 25 iterations); ``max_iterations`` caps every run; a
    non-finite loss stops the run at once and records the iteration.
    """

    tol: float
    patience: int
    check_every: int
    max_iterations: int

    def init_state(self, batch: int) -> dict:
        return {
            "streak": [0] * batch,
            "status": ["running"] * batch,
            "stopped_at": [None] * batch,
        }

    def update(self, state: dict, iteration: int, loss: Sequence[float]) -> list[tuple[int, str]]:
        """Update ``state`` after ``iteration`` steps given each run's loss.

        Returns ``(run, message)`` pairs for runs stopped by a non-finite loss.
        """
        msgs = []
        for b, value in enumerate(loss):
            if state["status"][b] != "running":
                continue
            if not math.isfinite(value):
                state["status"][b] = "diverged"
                state["stopped_at"][b] = iteration
                msgs.append((b, f"the loss became {value} at iteration {iteration}; run stopped"))
                continue
            if iteration % self.check_every == 0:
                state["streak"][b] = state["streak"][b] + 1 if value < self.tol else 0
                if state["streak"][b] >= self.patience:
                    state["status"][b] = "converged"
                    state["stopped_at"][b] = iteration
                    continue
            if iteration >= self.max_iterations:
                state["status"][b] = "max_iterations"
                state["stopped_at"][b] = iteration
        return msgs
