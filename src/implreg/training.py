"""A batched training loop: one vectorized step for ``B`` runs, stop rules, logging, interrupts.

The loop is deterministic: the state it checkpoints (parameters, optimizer
state, stop-rule state, recorder, iteration) is everything it reads, so a run
interrupted and resumed from its checkpoint is bit-identical to one that was
never interrupted (``tests/test_cli.py`` checks this).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from implreg.metrics import Recorder
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
    on_message: Callable[[str], None] | None = None,
) -> tuple[TrainState, bool]:
    """Run until every run has stopped or ``interrupt`` is raised.

    At iteration ``t`` (parameters after ``t`` steps) the loss and gradients are
    computed, the metrics recorded when due (``train_loss`` plus ``evaluate``),
    the stop rule updated, and active runs take a step.  Returns the final state
    and whether the loop was interrupted (then the state is ready to checkpoint).
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
    while True:
        if interrupt is not None and interrupt.is_set():
            interrupted = True
            break
        loss, grads = loss_and_grad(params)
        loss_list = loss.tolist()
        before = list(status)
        msgs = stop.update(state.stop, t, loss_list)
        for msg in msgs:
            state.messages.append(msg)
            if on_message is not None:
                on_message(msg)
        just_stopped = any(a != b for a, b in zip(before, status))
        if recorder.should_log(t) or just_stopped:
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
                info = {"loss": "/".join(f"{v:.2e}" for v in loss_list)}
                if describe is not None:
                    info.update(describe(values))
                progress.set_postfix(info, refresh=False)
                progress.update(t - last_shown)
                last_shown = t
        running = [s == "running" for s in status]
        if not any(running):
            break
        optimizer.step(params, grads, torch.tensor(running))
        t += 1
    if progress is not None:
        progress.update(t - last_shown)
    state.iteration = t
    state.params = params
    state.optimizer = optimizer.state_dict()
    state.recorder = recorder.state_dict()
    return state, interrupted
