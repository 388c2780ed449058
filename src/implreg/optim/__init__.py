"""Optimizers over batched parameters, and stop rules.

Parameters are tensors whose first axis indexes ``B`` independent runs; each
run keeps its own optimizer state, and a boolean ``active`` mask of shape
``(B,)`` freezes runs that have converged or diverged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numba import njit

from implreg.factorizations.cp import _check_int, _check_real

Tensor = torch.Tensor


def _check_rate(name: str, value) -> float:
    return _check_real(name, value, positive=True)


def _check_beta(name: str, value) -> float:
    out = _check_real(name, value)
    if not 0 <= out < 1:
        raise ValueError(f"{name} must lie in [0, 1), got {out}")
    return out


def _step_error(params, grads, active) -> Exception:
    """Why ``(params, grads, active)`` do not fit a step (the slow path of the cheap check)."""
    for name, seq in (("params", params), ("grads", grads)):
        if isinstance(seq, Tensor) or not isinstance(seq, Sequence):
            return TypeError(f"{name} must be a sequence of tensors, got {type(seq).__name__}")
        for i, x in enumerate(seq):
            if not isinstance(x, Tensor):
                return TypeError(f"{name}[{i}] must be a tensor, got {type(x).__name__}")
            if x.dim() < 1:
                return ValueError(f"{name}[{i}] must have a leading batch axis, got a 0-d tensor")
    if len(params) < 1:
        return ValueError("params must hold at least one tensor, got none")
    if len(grads) != len(params):
        return ValueError(
            f"grads must hold one tensor per parameter ({len(params)}), got {len(grads)}"
        )
    batch = params[0].shape[0]
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.shape[0] != batch:
            return ValueError(
                f"params[{i}] has {p.shape[0]} runs on its first axis but params[0] has {batch}"
            )
        if g.shape != p.shape:
            return ValueError(
                f"grads[{i}] must have the shape {tuple(p.shape)} of params[{i}], "
                f"got {tuple(g.shape)}"
            )
    if not isinstance(active, Tensor):
        return TypeError(f"active must be a bool tensor ({batch},), got {type(active).__name__}")
    if active.dtype != torch.bool:
        return TypeError(f"active must be a bool tensor, got dtype {active.dtype}")
    return ValueError(
        f"active must have shape ({batch},) (one flag per run), got {tuple(active.shape)}"
    )


def _check_step(params: Sequence[Tensor], grads: Sequence[Tensor], active: Tensor) -> None:
    """Per-step check of a step's arguments: shape and dtype compares only (no sync)."""
    try:
        if len(params) == len(grads) and active.dtype == torch.bool:
            batch = params[0].shape[0]
            if active.shape == (batch,):
                for p, g in zip(params, grads):
                    shape = p.shape
                    if shape != g.shape or shape[0] != batch:
                        break
                else:
                    return
    except (AttributeError, TypeError, IndexError):
        pass
    raise _step_error(params, grads, active)


def _check_keep(keep, size: int | None) -> list[int]:
    """Positions of the runs to keep: distinct integers in ``[0, size)``."""
    if isinstance(keep, (str, bytes, Tensor)) or not isinstance(keep, Sequence):
        raise TypeError(f"keep must be a sequence of run positions, got {type(keep).__name__}")
    out = [_check_int(f"keep[{i}]", k, minimum=0) for i, k in enumerate(keep)]
    if size is not None and any(k >= size for k in out):
        raise ValueError(f"keep must hold positions in [0, {size}), got {out}")
    if len(set(out)) != len(out):
        raise ValueError(f"keep must not repeat a position, got {out}")
    return out


def _per_run(x: Tensor, like: Tensor) -> Tensor:
    return x.view((-1,) + (1,) * (like.dim() - 1)).to(like.dtype)


def _apply(params: Sequence[Tensor], updates: Sequence[Tensor], active: Tensor) -> None:
    every = bool(active.all())
    for p, u in zip(params, updates):
        if every:
            p.sub_(u)
        else:
            p.sub_(torch.where(_per_run(active, p).bool(), u, torch.zeros_like(u)))


@njit(cache=True, fastmath=True)
def _add_squares(x, out):  # pragma: no cover - numba-compiled
    for b in range(x.shape[0]):
        acc = 0.0
        for i in range(x.shape[1]):
            v = np.float64(x[b, i])
            acc += v * v
        out[b] += acc


def squared_norms(grads: Sequence[Tensor]) -> Tensor:
    """``||g||^2`` of the concatenation of ``grads`` for each run, in float64, ``(B,)``.

    CPU tensors are summed by one compiled pass each (float64 accumulation, no
    float64 copies: about a quarter of the time of the torch reductions on the
    Figure 3 step's gradients); other devices use torch.
    """
    if len(grads) < 1:
        raise ValueError("grads must hold at least one tensor, got none")
    if all(g.device.type == "cpu" and g.dtype in (torch.float32, torch.float64) for g in grads):
        acc = np.zeros(grads[0].shape[0])
        for g in grads:
            _add_squares(g.detach().reshape(g.shape[0], -1).numpy(), acc)
        return torch.from_numpy(acc)
    out = None
    for g in grads:
        sq = torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1, dtype=torch.float64)
        out = sq * sq if out is None else out + sq * sq
    assert out is not None
    return out


class _Clock:
    """Elapsed gradient-flow time per run, ``time[b] = sum_t eta_t`` over the steps run ``b``
    took, and ``last_eta[b]``, the step size ``eta_t`` of its last step, indexed by the run's
    position in the first batch (runs dropped by ``compact`` keep their time and step)."""

    time: list[float]
    last_eta: list[float]
    runs: list[int]

    def _clock_start(self, n: int) -> None:
        if not self.time:
            self.time = [0.0] * n
            self.last_eta = [math.nan] * n
            self.runs = list(range(n))

    def _tick(self, j: int, eta: float) -> None:
        b = self.runs[j]
        self.time[b] += eta
        self.last_eta[b] = eta

    def _clock_compact(self, keep: Sequence[int]) -> None:
        if self.runs:
            self.runs = [self.runs[i] for i in keep]

    def _clock_state(self) -> dict:
        return {"time": list(self.time), "last_eta": list(self.last_eta), "runs": list(self.runs)}

    def _clock_load(self, state: dict, n: int) -> None:
        # a state written before the clock existed: the time is unknown, not zero
        self.time = [float(x) for x in state.get("time", [math.nan] * n)]
        self.last_eta = [float(x) for x in state.get("last_eta", [math.nan] * len(self.time))]
        self.runs = [int(x) for x in state.get("runs", range(len(self.time)))]
        if (
            any(not 0 <= r < len(self.time) for r in self.runs)
            or (n and len(self.runs) != n)
            or len(self.last_eta) != len(self.time)
        ):
            raise ValueError(
                f"state['time'] ({len(self.time)} runs), state['last_eta'] and state['runs'] must "
                f"cover the {n} runs of the optimizer state"
            )


class GD(_Clock):
    """Plain gradient descent ``theta <- theta - lr * g``."""

    name = "gd"

    def __init__(self, lr: float):
        self.lr = _check_rate("lr", lr)
        self.time: list[float] = []
        self.last_eta: list[float] = []
        self.runs: list[int] = []

    def step(self, params: Sequence[Tensor], grads: Sequence[Tensor], active: Tensor) -> None:
        _check_step(params, grads, active)
        _apply(params, [g * self.lr for g in grads], active)
        act = active.tolist()
        self._clock_start(len(act))
        for j, a in enumerate(act):
            if a:
                self._tick(j, self.lr)

    def compact(self, keep: Sequence[int]) -> None:
        """Keep only the runs at positions ``keep`` (GD has no state but its clock)."""
        _check_keep(keep, None)
        self._clock_compact(keep)

    def state_dict(self) -> dict:
        return self._clock_state()

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise ValueError("state must be a dict (from state_dict())")
        self._clock_load(state, len(state.get("runs", [])))


class AdaptiveGD(_Clock):
    """Gradient descent with one global adaptive step per run (Razin et al. 2021, App. B.2).

    With ``g`` the concatenation of all gradients of a run:
    ``v_t = beta v_{t-1} + (1 - beta) ||g_t||^2``, ``v_0 = 0``;
    ``v_hat = v_t / (1 - beta^t)``; ``eta_t = lr / (sqrt(v_hat) + eps)`` (eps after the
    square root); ``theta <- theta - eta_t g_t``.  The per-run scalars ``v`` and ``t``
    are Python floats (IEEE double): the bookkeeping costs no tensor operations.
    ``time[b]`` is run ``b``'s elapsed gradient-flow time ``sum_t eta_t`` (what the
    local dynamics ``d sigma / dt`` are measured against; see :class:`_Clock`).
    """

    name = "adaptive"

    def __init__(self, lr: float, *, beta: float = 0.99, eps: float = 1e-6):
        self.lr = _check_rate("lr", lr)
        self.beta = _check_beta("beta", beta)
        self.eps = _check_rate("eps", eps)
        self.v: list[float] = []
        self.t: list[int] = []
        self.time: list[float] = []
        self.last_eta: list[float] = []
        self.runs: list[int] = []

    def step_sizes(self, grads: Sequence[Tensor], active: Sequence[bool]) -> list[float]:
        """Advance ``v`` and ``t`` of active runs and return ``eta_t`` per run."""
        sq = squared_norms(grads).tolist()
        if len(active) != len(sq):
            raise ValueError(f"active must hold one flag per run ({len(sq)}), got {len(active)}")
        if not self.v:
            self.v = [0.0] * len(sq)
            self.t = [0] * len(sq)
            self._clock_start(len(sq))
        elif len(self.v) != len(sq):
            raise ValueError(
                f"the optimizer holds the state of {len(self.v)} runs but grads have "
                f"{len(sq)}; call compact(keep) when runs drop out"
            )
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
            if active[b]:
                self._tick(b, eta[-1])
        return eta

    def step(self, params: Sequence[Tensor], grads: Sequence[Tensor], active: Tensor) -> None:
        _check_step(params, grads, active)
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
        keep = _check_keep(keep, len(self.v) if self.v else None)
        if self.v:
            self.v = [self.v[i] for i in keep]
            self.t = [self.t[i] for i in keep]
            self._clock_compact(keep)

    def state_dict(self) -> dict:
        return {"v": list(self.v), "t": list(self.t), **self._clock_state()}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or not {"v", "t"} <= state.keys():
            raise ValueError("state must be a dict with the keys 'v' and 't' (from state_dict())")
        if len(state["v"]) != len(state["t"]):
            raise ValueError(
                f"state['v'] and state['t'] must have one entry per run, got "
                f"{len(state['v'])} and {len(state['t'])}"
            )
        self.v, self.t = list(state["v"]), list(state["t"])
        self._clock_load(state, len(self.v))


class Adam:
    """Adam (Kingma & Ba 2015), elementwise, with bias correction; one step count per run."""

    name = "adam"

    def __init__(self, lr: float, *, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.lr = _check_rate("lr", lr)
        if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = (_check_beta("betas[0]", betas[0]), _check_beta("betas[1]", betas[1]))
        self.eps = _check_rate("eps", eps)
        self.m: list[Tensor] | None = None
        self.v: list[Tensor] | None = None
        self.t: Tensor | None = None

    def step(self, params: Sequence[Tensor], grads: Sequence[Tensor], active: Tensor) -> None:
        _check_step(params, grads, active)
        b1, b2 = self.betas
        if self.m is None or self.v is None or self.t is None:
            self.m = [torch.zeros_like(g) for g in grads]
            self.v = [torch.zeros_like(g) for g in grads]
            self.t = torch.zeros(grads[0].shape[0], dtype=torch.float64)
        elif len(self.m) != len(grads) or any(m.shape != g.shape for m, g in zip(self.m, grads)):
            raise ValueError(
                f"the optimizer holds moments of shapes {[tuple(m.shape) for m in self.m]} but "
                f"grads have {[tuple(g.shape) for g in grads]}; call compact(keep) when runs "
                "drop out"
            )
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
        keep = _check_keep(keep, None if self.t is None else int(self.t.shape[0]))
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
        if not isinstance(state, dict) or not {"m", "v", "t"} <= state.keys():
            raise ValueError(
                "state must be a dict with the keys 'm', 'v' and 't' (from state_dict())"
            )
        self.m = None if state["m"] is None else [t.clone() for t in state["m"]]
        self.v = None if state["v"] is None else [t.clone() for t in state["v"]]
        self.t = None if state["t"] is None else state["t"].clone()


def make_optimizer(name: str, *, lr: float, eps: float | None = None, beta: float = 0.99):
    """Optimizer by name: ``adaptive`` (the papers'), ``gd`` or ``adam``."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}")
    lr = _check_rate("lr", lr)
    if eps is not None:
        eps = _check_rate("eps", eps)
    beta = _check_beta("beta", beta)
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

    def __post_init__(self) -> None:
        self.tol = _check_real("tol", self.tol, nonnegative=True)
        self.patience = _check_int("patience", self.patience, minimum=1)
        self.check_every = _check_int("check_every", self.check_every, minimum=1)
        self.max_iterations = _check_int("max_iterations", self.max_iterations, minimum=0)

    def init_state(self, batch: int) -> dict:
        batch = _check_int("batch", batch, minimum=0)
        return {
            "streak": [0] * batch,
            "status": ["running"] * batch,
            "stopped_at": [None] * batch,
        }

    def update(self, state: dict, iteration: int, loss: Sequence[float]) -> list[tuple[int, str]]:
        """Update ``state`` after ``iteration`` steps given each run's loss.

        Returns ``(run, message)`` pairs for runs stopped by a non-finite loss.
        """
        if len(loss) != len(state["status"]):
            raise ValueError(
                f"loss must hold one value per run ({len(state['status'])}), got {len(loss)}"
            )
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
