"""A batched training loop: one vectorized step for ``B`` runs, stop rules, the metric
recorder, interrupts.

The loop is deterministic: the state it checkpoints (parameters, optimizer
state, stop-rule state, recorder, iteration) is everything it reads, so a run
interrupted and resumed from its checkpoint is bit-identical to one that was
never interrupted (``tests/test_cli.py`` checks this).
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from implreg.optim import StopRule

Tensor = torch.Tensor


class Interrupt:
    """A flag raised by SIGINT / SIGTERM while installed (``with Interrupt() as stop: ...``)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        self.signum = signum
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        self._old.clear()


class Poll:
    """An interrupt flag read from a callable (``should_stop`` of the sweep engine)."""

    def __init__(self, should_stop: Callable[[], bool] | None):
        self.should_stop = should_stop

    def is_set(self) -> bool:
        return self.should_stop is not None and bool(self.should_stop())


class Recorder:
    """Record named per-run metrics at iteration 0, log-spaced early steps and every ``log_every``.

    Values are arrays whose first axis indexes the ``B`` runs (``(B,)`` scalars or
    ``(B, K)`` vectors such as all component norms).  When more than
    ``max_records`` records are held, every other periodic record is dropped
    and the interval doubles, so memory stays bounded for runs of any length;
    early and forced records (such as the iteration a run stopped) are kept.
    """

    def __init__(self, *, log_every: int, max_records: int = 4000, early_points: int = 16):
        if log_every < 1 or max_records < 4:
            raise ValueError("log_every must be >= 1 and max_records >= 4")
        self.every = int(log_every)
        self.max_records = int(max_records)
        grid = np.logspace(0, math.log10(max(self.every, 1)), early_points)
        self.early = {0} | {int(x) for x in np.unique(np.round(grid))}
        self.iterations: list[int] = []
        self.forced: list[bool] = []
        self.values: dict[str, list[np.ndarray]] = {}

    def should_log(self, iteration: int) -> bool:
        return iteration % self.every == 0 or iteration in self.early

    def record(
        self, iteration: int, values: dict[str, np.ndarray], *, forced: bool = False
    ) -> None:
        if self.iterations and self.iterations[-1] == iteration:
            return
        self.iterations.append(int(iteration))
        self.forced.append(bool(forced))
        for key, val in values.items():
            self.values.setdefault(key, []).append(np.asarray(val))
        if len(self.iterations) > self.max_records:
            self._thin()

    def _thin(self) -> None:
        every = 2 * self.every
        keep = [
            f or it in self.early or it % every == 0 for it, f in zip(self.iterations, self.forced)
        ]
        self.iterations = [x for x, k in zip(self.iterations, keep) if k]
        self.forced = [x for x, k in zip(self.forced, keep) if k]
        self.values = {
            key: [x for x, k in zip(vals, keep) if k] for key, vals in self.values.items()
        }
        self.every = every

    def arrays(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Iterations ``(T,)`` and each metric stacked to ``(T, B, ...)``."""
        its = np.asarray(self.iterations, dtype=np.int64)
        return its, {k: np.stack(v) for k, v in self.values.items() if v}

    def last(self, key: str) -> np.ndarray | None:
        vals = self.values.get(key)
        return vals[-1] if vals else None

    def state_dict(self, *, copy: bool = True) -> dict:
        """The recorder's state; ``copy=False`` shares the arrays (to write them out at once)."""
        return {
            "every": self.every,
            "iterations": list(self.iterations),
            "forced": list(self.forced),
            "values": {
                k: [v.copy() if copy else v for v in vals] for k, vals in self.values.items()
            },
        }

    def load_state_dict(self, state: dict) -> None:
        self.every = state["every"]
        self.iterations = list(state["iterations"])
        self.forced = list(state["forced"])
        self.values = {k: list(v) for k, v in state["values"].items()}


class Checkpointer:
    """When to write a periodic checkpoint: every ``every`` iterations and/or ``seconds`` seconds.

    ``save(state_dict)`` is called by :func:`train` at the top of an iteration,
    where the state is exactly what an interrupt would checkpoint, so a run
    resumed from any periodic checkpoint is bit-identical to one never stopped.
    """

    def __init__(
        self,
        save: Callable[[dict], None],
        *,
        every: int = 0,
        seconds: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if every < 0 or not seconds >= 0:
            raise ValueError(f"checkpoint intervals must be >= 0, got {every} and {seconds}")
        self.save = save
        self.every = int(every)
        self.seconds = float(seconds)
        self.clock = clock
        self.last = clock()
        self.written = 0

    def due(self, iteration: int) -> bool:
        if self.every and iteration % self.every == 0:
            return True
        return bool(self.seconds) and self.clock() - self.last >= self.seconds

    def write(self, state: dict) -> None:
        self.save(state)
        self.written += 1
        self.last = self.clock()


@dataclass
class TrainState:
    """Everything the loop reads and writes."""

    iteration: int
    params: list[Tensor]
    optimizer: dict
    stop: dict
    recorder: dict
    messages: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "iteration": self.iteration,
            "params": [p.clone() for p in self.params],
            "optimizer": self.optimizer,
            "stop": self.stop,
            "recorder": self.recorder,
            "messages": list(self.messages),
        }

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        return cls(
            d["iteration"], d["params"], d["optimizer"], d["stop"], d["recorder"], d["messages"]
        )


def train(
    *,
    params: Sequence[Tensor],
    loss_and_grad: Callable[[Sequence[Tensor]], tuple[Tensor, list[Tensor]]],
    optimizer,
    stop: StopRule,
    recorder: Recorder,
    evaluate: Callable[[Sequence[Tensor]], dict[str, np.ndarray]],
    state: TrainState | None = None,
    interrupt: Interrupt | None = None,
    progress=None,
    describe: Callable[[dict[str, np.ndarray]], dict] | None = None,
    on_message: Callable[[int, str], None] | None = None,
    checkpoint: Checkpointer | None = None,
) -> tuple[TrainState, bool]:
    """Run until every run has stopped or ``interrupt`` is raised.

    At iteration ``t`` (parameters after ``t`` steps) the loss and gradients are
    computed, the stop rule updated, the metrics recorded when due
    (``train_loss`` plus ``evaluate``) and the running runs take a step.  The
    optimizer must provide ``compact(keep)``, dropping the state of runs that
    stopped (``keep`` lists the positions, within the running sub-batch, of the
    runs that go on).  Returns the final state
    and whether the loop was interrupted (then the state is ready to checkpoint).
    ``checkpoint`` writes the same state periodically while the loop runs.
    """
    params = list(params)
    batch = params[0].shape[0]
    if state is None:
        state = TrainState(0, params, {}, stop.init_state(batch), recorder.state_dict())
    else:
        for p, saved in zip(params, state.params):
            p.copy_(saved)
        optimizer.load_state_dict(state.optimizer)
        recorder.load_state_dict(state.recorder)
    status = state.stop["status"]
    t = state.iteration
    interrupted = False
    last_shown = t
    # Runs still running are stepped as one compact sub-batch ``work``; stopped
    # runs drop out of the vectorized pass (their parameters are frozen anyway).
    run_idx = [b for b in range(batch) if status[b] == "running"]
    work = params if len(run_idx) == batch else [p[run_idx].clone() for p in params]

    def write_back() -> None:
        if work is not params and run_idx:
            for p, w in zip(params, work):
                p[run_idx] = w

    first = t
    while run_idx:
        if interrupt is not None and interrupt.is_set():
            interrupted = True
            break
        if checkpoint is not None and t != first and checkpoint.due(t):
            write_back()
            checkpoint.write(
                {
                    "iteration": t,
                    "params": params,
                    "optimizer": optimizer.state_dict(),
                    "stop": state.stop,
                    "recorder": recorder.state_dict(copy=False),
                    "messages": state.messages,
                }
            )
        loss, grads = loss_and_grad(work)
        loss_list = [float("nan")] * batch
        for j, value in enumerate(loss.tolist()):
            loss_list[run_idx[j]] = value
        before = list(status)
        msgs = stop.update(state.stop, t, loss_list)
        for b, msg in msgs:
            state.messages.append(f"run {b}: {msg}")
            if on_message is not None:
                on_message(b, msg)
        just_stopped = any(a != b for a, b in zip(before, status))
        if recorder.should_log(t) or just_stopped:
            write_back()
            values = {"train_loss": np.asarray(loss_list, dtype=np.float64)}
            values.update(evaluate(params))
            done = [b for b, st in enumerate(before) if st != "running"]
            if done:  # runs stopped earlier are frozen: record NaN, not a flat line
                for key, val in values.items():
                    val = np.array(val, dtype=np.result_type(val, np.float32))
                    val[done] = np.nan
                    values[key] = val
            recorder.record(t, values, forced=just_stopped)
            if progress is not None:
                short = {"converged": "done", "diverged": "nan", "max_iterations": "cap"}
                shown = [
                    f"{v:.2e}" if status[b] == "running" else short.get(status[b], status[b])
                    for b, v in enumerate(loss_list)
                ]
                info = {"loss": "/".join(shown)}
                if describe is not None:
                    info.update(describe(values))
                progress.set_postfix(info, refresh=False)
                progress.update(t - last_shown)
                last_shown = t
        if just_stopped:
            write_back()
            keep = [j for j, b in enumerate(run_idx) if status[b] == "running"]
            run_idx = [run_idx[j] for j in keep]
            if not run_idx:
                break
            work = [w[keep].clone() for w in work]
            grads = [g[keep] for g in grads]
            optimizer.compact(keep)
        optimizer.step(work, grads, torch.ones(len(run_idx), dtype=torch.bool))
        t += 1
    write_back()
    if progress is not None:
        progress.update(t - last_shown)
    state.iteration = t
    state.params = params
    state.optimizer = optimizer.state_dict()
    state.recorder = recorder.state_dict()
    return state, interrupted
