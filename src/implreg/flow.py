"""Gradient flow as an optimizer: ``dθ/dt = -∇L(θ)`` integrated by an adaptive ODE solver.

The papers' statements (Razin, Yadin & Cohen, ICML 2021, Lemma 1, Theorem 1,
Corollary 1, Theorem 2; Arora, Cohen, Hu & Luo, NeurIPS 2019, Theorem 3;
Razin, Maman & Cohen, ICML 2022) are about gradient flow, the limit of
gradient descent as the step goes to zero.  :func:`flow_train` integrates that
flow for a batch of ``B`` runs with torchdiffeq (Dormand-Prince 5(4) by
default, float64, error control ``rtol`` / ``atol``) and plugs into the same
run folders as :func:`implreg.training.train`:

- the runs still going are integrated as one system whose error norm is the
  largest per-run RMS (a run's step control does not depend on the others,
  nor on runs that stopped);
- records are taken at log-spaced times ``t_j = lr · 10^{(j-1)/per_decade}``
  (and ``t = 0``); the x value recorded is ``t / lr``, the number of gradient
  descent steps of size ``lr`` that cover the same time, so figures share the
  axis of the GD runs;
- a run stops at the first time its loss falls below ``threshold`` (the loss
  is non-increasing along the flow): the crossing is located by an event
  (``torchdiffeq.odeint_event``) on that run alone, from the last record;
- the integration restarts at every chunk of ``chunk`` record times, so the
  checkpoint written between chunks is everything the next chunk reads: a run
  resumed from it is bit-identical to one never interrupted (a checkpoint
  interval counted in iterations, ``--checkpoint-every N``, counts chunks here).

Stops: ``converged`` (loss below ``threshold``), ``max_time`` (``t_max``
reached), ``max_evals`` (the budget of gradient evaluations spent),
``non_finite`` (the loss or the state stopped being finite).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from implreg.config import param, require
from implreg.training import Checkpointer, Recorder, TrainState

Tensor = torch.Tensor
METHODS = ("dopri5", "dopri8", "bosh3", "adaptive_heun")


@dataclass(frozen=True)
class FlowSpec:
    """How the flow is integrated and when a run stops (see the module docstring)."""

    threshold: float  # stop a run once its loss falls below this
    lr: float  # the GD step whose iteration count is the x axis (t / lr)
    t_max: float  # stop every run at this time
    rtol: float = 1e-6
    atol: float = 1e-9
    method: str = "dopri5"
    per_decade: int = 50  # record times per decade of t
    max_evals: int = 10_000_000  # gradient evaluations, all runs together
    chunk: int = 8  # record times per solver call (the restart and checkpoint interval)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"flow method must be one of {', '.join(METHODS)}, got {self.method}")
        if not (self.lr > 0 and self.t_max > 0 and self.rtol > 0 and self.atol > 0):
            raise ValueError("lr, t_max, rtol and atol must be positive")
        if self.per_decade < 1 or self.max_evals < 1 or self.chunk < 1:
            raise ValueError("per_decade, max_evals and chunk must be >= 1")

    def times(self) -> np.ndarray:
        """Record times: 0, then ``lr · 10^{j/per_decade}`` up to ``t_max`` (included)."""
        if self.t_max <= self.lr:
            return np.array([0.0, self.t_max])
        n = math.floor(self.per_decade * math.log10(self.t_max / self.lr) + 1e-9)
        grid = self.lr * 10.0 ** (np.arange(n + 1) / self.per_decade)
        if grid[-1] < self.t_max * (1 - 1e-12):
            grid = np.append(grid, self.t_max)
        return np.concatenate([[0.0], grid])


@dataclass(frozen=True)
class FlowOptions:
    """Config keys of ``optimizer=flow``, shared by the dynamics experiments' configs.

    The stop threshold is the experiment's ``tol`` and the x axis ``t / lr``
    uses its ``lr``.  Gradient flow is integrated in float64 (``dtype=float64``).
    """

    flow_rtol: float = param(1e-6, gt=0, lt=1, doc="optimizer=flow: relative tolerance")
    flow_atol: float = param(1e-9, gt=0, doc="optimizer=flow: absolute tolerance")
    flow_method: Literal["dopri5", "dopri8", "bosh3", "adaptive_heun"] = param(
        "dopri5", doc="optimizer=flow: torchdiffeq's adaptive method"
    )
    flow_t_max: float = param(1e13, gt=0, doc="optimizer=flow: stop every run at this time")
    flow_per_decade: int = param(50, ge=1, le=10_000, doc="optimizer=flow: records per decade")
    flow_max_evals: int = param(3_000_000, ge=1, doc="optimizer=flow: gradient evaluations")

    def check_flow(self) -> None:
        """``optimizer=flow`` integrates in float64."""
        if getattr(self, "optimizer", None) == "flow":
            require(
                getattr(self, "dtype", "float64") == "float64",
                "optimizer=flow integrates the gradient flow in float64: add --set dtype=float64",
            )


@dataclass(frozen=True)
class GDOptions:
    """Config keys of the batched gradient-descent runs, shared by the CP and HTF dynamics
    configs: the optimizer, its step, the papers' stop rule and the record interval.

    A config redeclares a key to change its default (the HTF stop rule: ``tol`` 5e-5,
    ``patience`` 101).
    """

    optimizer: Literal["adaptive", "gd", "adam", "flow"] = param(
        "adaptive", doc="flow: gradient flow (an adaptive ODE solver, float64)"
    )
    lr: float = param(0.01, gt=0)
    eps: float = param(1e-6, gt=0, doc="adaptive step: lr / (sqrt(v) + eps)")
    tol: float = param(1e-8, ge=0, doc="stop once the train loss stays below tol ...")
    patience: int = param(51, ge=1, doc="... for this many checks ...")
    check_every: int = param(25, ge=1, doc="... made every this many iterations")
    max_iterations: int = param(100_000, ge=1)
    log_every: int = param(25, ge=1, doc="record interval (doubles past max_records)")
    max_records: int = param(4000, ge=4)

    def check_range(self, keys: Sequence[str]) -> None:
        """The numbers named by ``keys``, and ``init_stds``, fit the config's ``dtype``
        squared (the losses square them), with a factor 10 to spare."""
        dtype = self.dtype  # type: ignore[attr-defined]  (declared by the config)
        big = math.sqrt(torch.finfo(getattr(torch, dtype)).max) / 10
        for key in keys:
            value = abs(getattr(self, key))
            require(value <= big, f"{key}={value:g} is too large for {dtype} (at most {big:.3g})")
        top = max(self.init_stds)  # type: ignore[attr-defined]
        require(top <= big, f"init_stds={top:g} is too large for {dtype} (at most {big:.3g})")


class FlowRecorder(Recorder):
    """Records at real-valued x (``t / lr``); the flow's grid bounds their number."""

    def __init__(self) -> None:
        super().__init__(log_every=1, max_records=1 << 30, early_points=1)
        self.iterations: list[float] = []  # type: ignore[assignment]

    def record(self, iteration, values, *, forced: bool = False) -> None:  # noqa: D102
        if self.iterations and self.iterations[-1] == iteration:
            return
        self.iterations.append(float(iteration))
        self.forced.append(bool(forced))
        for key, val in values.items():
            self.values.setdefault(key, []).append(np.asarray(val))

    def arrays(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        its = np.asarray(self.iterations, dtype=np.float64)
        return its, {k: np.stack(v) for k, v in self.values.items() if v}


class _Budget(Exception):
    """The gradient-evaluation budget ran out inside a solver call."""


class _Stopped(Exception):
    """An interrupt (Ctrl-C, SIGTERM) arrived inside a solver call: the chunk is dropped."""


POLL_SECONDS = 1.0  # inside a solver call, the interrupt is polled at most this often


class _System:
    """The flattened flow of the running runs: ``y`` holds every parameter, run-major per tensor."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], loss_and_grad, counter: list[int]):
        self.shapes = [tuple(s) for s in shapes]  # per-run shapes (without the batch axis)
        self.sizes = [math.prod(s) for s in self.shapes]
        self.loss_and_grad = loss_and_grad
        self.counter = counter
        self.limit = None

    def split(self, y: Tensor, batch: int) -> list[Tensor]:
        out, i = [], 0
        for shape, size in zip(self.shapes, self.sizes):
            out.append(y[i : i + batch * size].view(batch, *shape))
            i += batch * size
        return out

    @staticmethod
    def join(params: Sequence[Tensor]) -> Tensor:
        return torch.cat([p.reshape(-1) for p in params])

    def field(self, batch: int, interrupt=None):
        """The vector field of ``batch`` runs; with ``interrupt``, it raises ``_Stopped`` once
        the interrupt is set (polled every :data:`POLL_SECONDS`), so a long solver call
        ends within about a second of Ctrl-C or SIGTERM."""
        next_poll = [time.monotonic() + POLL_SECONDS]

        def f(t, y):  # noqa: ARG001 (autonomous)
            if self.limit is not None and self.counter[0] >= self.limit:
                raise _Budget
            if interrupt is not None and time.monotonic() >= next_poll[0]:
                next_poll[0] = time.monotonic() + POLL_SECONDS
                if interrupt.is_set():
                    raise _Stopped
            self.counter[0] += 1
            _, grads = self.loss_and_grad(self.split(y, batch))
            return -self.join(grads)

        return f

    def norm(self, batch: int):
        """The largest per-run RMS of a flattened state-shaped tensor."""

        def norm(x: Tensor) -> Tensor:
            total = torch.zeros(batch, dtype=x.dtype, device=x.device)
            for part in self.split(x, batch):
                total = total + part.reshape(batch, -1).pow(2).sum(1)
            return (total / sum(self.sizes)).sqrt().max()

        return norm

    def losses(self, y: Tensor, batch: int) -> list[float]:
        self.counter[0] += 1
        loss, _ = self.loss_and_grad(self.split(y, batch))
        return [float(v) for v in loss.reshape(-1).tolist()]


def flow_train(
    *,
    params: Sequence[Tensor],
    loss_and_grad: Callable[[Sequence[Tensor]], tuple[Tensor, list[Tensor]]],
    spec: FlowSpec,
    recorder: FlowRecorder,
    evaluate: Callable[[Sequence[Tensor]], dict[str, np.ndarray]],
    state: TrainState | None = None,
    interrupt=None,
    progress=None,
    describe: Callable[[dict[str, np.ndarray]], dict] | None = None,
    on_message: Callable[[int, str], None] | None = None,
    checkpoint: Checkpointer | None = None,
) -> tuple[TrainState, bool]:
    """Integrate the gradient flow of ``B`` runs until each stops (module docstring).

    ``params`` are float64 tensors with the runs on their first axis, updated
    in place.  The returned state's ``iteration`` counts record times done;
    ``optimizer`` holds ``{"time", "evaluations", "method", "rtol", "atol"}``
    and ``stop`` the per-run ``status``, ``stopped_at`` (``t / lr``) and
    ``stopped_time``; every record also holds ``time`` (t) per run.  Returns
    ``(state, interrupted)`` like :func:`train`.
    """
    from torchdiffeq import odeint, odeint_event

    params = list(params)
    if any(p.dtype != torch.float64 for p in params):
        raise ValueError("gradient flow integrates float64 parameters")
    batch = params[0].shape[0]
    grid = spec.times()
    if state is None:
        stop = {"status": ["running"] * batch, "stopped_at": [None] * batch}
        stop["stopped_time"] = [None] * batch
        state = TrainState(0, params, {"time": 0.0, "evaluations": 0}, stop, {})
    else:
        for p, saved in zip(params, state.params):
            p.copy_(saved)
        recorder.load_state_dict(state.recorder)
    state.optimizer.update(method=spec.method, rtol=spec.rtol, atol=spec.atol)
    status = state.stop["status"]
    counter = [int(state.optimizer["evaluations"])]
    system = _System([tuple(p.shape[1:]) for p in params], loss_and_grad, counter)
    shown = [0]

    def running() -> list[int]:
        return [b for b in range(batch) if status[b] == "running"]

    def record(k_time: float, losses: list[float], forced: bool = False) -> None:
        values = {"train_loss": np.asarray(losses, dtype=np.float64)}
        values.update(evaluate(params))
        values["time"] = np.full(batch, k_time)  # the flow's own clock, for every run
        done = [b for b in range(batch) if np.isnan(losses[b])]
        for key, val in values.items():
            val = np.array(val, dtype=np.result_type(val, np.float32))
            val[done] = np.nan
            values[key] = val
        recorder.record(k_time / spec.lr, values, forced=forced)
        if progress is not None:
            info = {"t/lr": f"{k_time / spec.lr:.3g}", "evals": counter[0]}
            info["loss"] = "/".join(
                f"{v:.2e}" if status[b] == "running" else status[b][:4]
                for b, v in enumerate(losses)
            )
            if describe is not None:
                info.update(describe(values))
            progress.set_postfix(info, refresh=False)

    def stop_run(b: int, why: str, t: float) -> None:
        status[b] = why
        state.stop["stopped_at"][b] = t / spec.lr
        state.stop["stopped_time"][b] = t
        msg = f"{why} at t = {t:.6g} (t/lr = {t / spec.lr:.6g})"
        state.messages.append(f"run {b}: {msg}")
        if on_message is not None:
            on_message(b, msg)

    def check_losses(losses: list[float], t: float) -> None:
        for b in running():
            if not math.isfinite(losses[b]):
                stop_run(b, "non_finite", t)

    k = state.iteration
    if k == 0:  # the record at t = 0
        losses = system.losses(system.join(params), batch)
        check_losses(losses, 0.0)
        record(0.0, losses)
        for b in running():
            if losses[b] < spec.threshold:
                stop_run(b, "converged", 0.0)
        k = 1
    interrupted = False
    first = k
    chunks = 0  # solver calls made in this session: ``--checkpoint-every`` counts these
    while running() and k < len(grid):
        if interrupt is not None and interrupt.is_set():
            interrupted = True
            break
        if checkpoint is not None and k != first and checkpoint.due(chunks):
            state.iteration, state.optimizer["evaluations"] = k, counter[0]
            state.optimizer["time"] = float(grid[k - 1])
            checkpoint.write(
                {
                    "iteration": k,
                    "params": params,
                    "optimizer": dict(state.optimizer),
                    "stop": state.stop,
                    "recorder": recorder.state_dict(copy=False),
                    "messages": state.messages,
                }
            )
        idx = running()
        nb = len(idx)
        y0 = system.join([p[idx] for p in params])
        times = grid[k - 1 : min(k + spec.chunk, len(grid))]
        system.limit = spec.max_evals
        evaluations = counter[0]
        try:
            sol = odeint(
                system.field(nb, interrupt),
                y0,
                torch.as_tensor(times, dtype=torch.float64),
                method=spec.method,
                rtol=spec.rtol,
                atol=spec.atol,
                options={"norm": system.norm(nb)},
            )
        except _Budget:
            for b in idx:
                stop_run(b, "max_evals", float(grid[k - 1]))
            break
        except _Stopped:  # the state is the chunk's start; a resume redoes the chunk
            counter[0] = evaluations
            interrupted = True
            break
        except AssertionError as err:  # torchdiffeq's underflow / non-finite state checks
            for b in idx:
                stop_run(b, "non_finite", float(grid[k - 1]))
            state.messages.append(f"the solver stopped: {err}"[:300])
            break
        finally:
            system.limit = None
        chunks += 1
        prev = y0
        for j in range(1, len(times)):
            y1 = sol[j]
            losses_sub = system.losses(y1, nb)
            crossed = [
                (pos, b)
                for pos, b in enumerate(idx)
                if status[b] == "running" and losses_sub[pos] < spec.threshold
            ]
            for pos, b in enumerate(idx):  # write the running runs' new state
                if status[b] == "running" and not any(b == c for _, c in crossed):
                    for p, part in zip(params, system.split(y1, nb)):
                        p[b] = part[pos]
            for pos, b in crossed:  # locate the crossing on run b alone, from the last record
                t_event, y_event = _locate(
                    system, prev, pos, nb, float(times[j - 1]), float(times[j]), spec, odeint_event
                )
                for p, part in zip(params, system.split(y_event, 1)):
                    p[b] = part[0]
                ev_losses = [float("nan")] * batch
                ev_losses[b] = system.losses(y_event, 1)[0]
                record(t_event, ev_losses, forced=True)
                stop_run(b, "converged", t_event)
            losses = [float("nan")] * batch
            for pos, b in enumerate(idx):
                if status[b] == "running":
                    losses[b] = losses_sub[pos]
            check_losses(losses, float(times[j]))
            if any(status[b] == "running" for b in idx):
                record(float(times[j]), losses)
            if progress is not None:
                progress.update(1)
                shown[0] += 1
            prev = y1
            k += 1
            if not any(status[b] == "running" for b in idx):
                break
    if not interrupted:
        for b in running():  # the grid ended
            stop_run(b, "max_time", float(grid[-1]))
    state.iteration = k
    state.params = params
    state.optimizer["evaluations"] = counter[0]
    stopped = [t for t in state.stop["stopped_time"] if t is not None]
    end = float(grid[min(k, len(grid)) - 1])
    state.optimizer["time"] = max(stopped) if not running() and stopped else end
    state.recorder = recorder.state_dict()
    return state, interrupted


def _locate(system: _System, y_all, pos, nb, t0, t1, spec: FlowSpec, odeint_event):
    """The first time in ``(t0, t1]`` where run ``pos`` of the flattened ``y_all`` (``nb`` runs)
    has loss ``spec.threshold``, integrating that run alone; returns ``(t, its state)``."""
    y0 = system.join([part[pos : pos + 1] for part in system.split(y_all, nb)])
    log_thr = math.log(spec.threshold)
    span = t1 - t0

    def event(t, y):
        loss = system.loss_and_grad(system.split(y, 1))[0].reshape(-1)[0]
        margin = torch.log(loss.clamp_min(1e-300)) - log_thr
        # a second root at t0 + 2 span guards against the run alone crossing just after t1
        return torch.minimum(margin, torch.as_tensor((t0 + 2 * span - t) / span))

    t_event, sol = odeint_event(
        system.field(1),
        y0,
        torch.as_tensor(t0, dtype=torch.float64),
        event_fn=event,
        method=spec.method,
        rtol=spec.rtol,
        atol=spec.atol,
        options={"norm": system.norm(1)},
    )
    return float(t_event), sol[-1]
