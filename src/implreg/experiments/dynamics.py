"""The batched-dynamics runner: a batch of runs trained in one vectorized pass, tracked over time.

An experiment that follows the dynamics of gradient descent (CP component
norms, singular values, and next the local component norms of hierarchical
tensor factorization) builds a :class:`Dynamics` (parameters batched over the
runs, loss and analytic gradients, an ``evaluate`` giving per-run scalars and
one trajectory of per-component quantities, tracked by component identity)
and derives from :class:`DynamicsExperiment`, which

- trains with the stop rule, checkpoints on an interrupt and resumes
  bit-identically (:func:`implreg.training.train`);
- writes ``metrics.csv`` (one row per run and record) and the trajectories
  (``<trajectory>.npz``: iterations, values ``(T, B, K)``, the run values, ``top_k``);
- summarizes which components left zero and when (:func:`learned_summary`);
- draws the top-k trajectory figure (:func:`topk_figure`) from the folder alone.

:func:`learned_summary` and :func:`topk_figure` also serve grids of single
runs (``mf-dynamics``: one depth per unit).
"""

from __future__ import annotations

import abc
import csv
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from implreg.experiments.base import Experiment, Outcome, RunContext, assess
from implreg.experiments.dynamics_summary import (
    add_step_record,
    learned_now,
    learned_summary,
    learned_text,
    topk_figure,
    trajectories,
)
from implreg.flow import FlowSpec, flow_train
from implreg.optim import StopRule
from implreg.runs import (
    CHECKPOINT,
    SUMMARY,
    DamagedRunError,
    atomic_path,
    load_checkpoint,
    reading,
    save_checkpoint,
    write_json,
)
from implreg.threads import threads_for_config, use_threads
from implreg.training import Checkpointer, Recorder, TrainState, train


@dataclass
class Dynamics:
    """What one batched pass trains: ``B`` runs that differ by ``values`` of ``key``."""

    key: str  # the config quantity the runs differ by, e.g. "init_std"
    values: Sequence[float]
    params: list[torch.Tensor]
    loss_and_grad: Callable[[Sequence[torch.Tensor]], tuple[torch.Tensor, list[torch.Tensor]]]
    evaluate: Callable[[Sequence[torch.Tensor]], dict[str, np.ndarray]]
    optimizer: Any
    stop: StopRule
    recorder: Recorder
    describe: Callable[[dict[str, np.ndarray]], dict] | None = None
    flow: FlowSpec | None = None  # integrate the gradient flow instead (``optimizer`` unused)


FLOW_AXIS = "t / lr (gradient flow time in GD steps)"


def flow_spec(cfg: Any) -> FlowSpec | None:
    """The gradient-flow settings of a config with ``optimizer=flow`` (None otherwise)."""
    if getattr(cfg, "optimizer", None) != "flow":
        return None
    return FlowSpec(
        threshold=cfg.tol,
        lr=cfg.lr,
        t_max=cfg.flow_t_max,
        rtol=cfg.flow_rtol,
        atol=cfg.flow_atol,
        method=cfg.flow_method,
        per_decade=cfg.flow_per_decade,
        max_evals=cfg.flow_max_evals,
    )


class DynamicsExperiment(Experiment):
    """Batched training of ``B`` runs with checkpoints, metrics, trajectories and a figure.

    Subclasses give ``build(cfg, prepared) -> Dynamics``, ``summarize(cfg,
    its, arrays, state)`` and ``summary_text``; class attributes name the
    tracked trajectory and the scalar metrics.
    """

    trajectory: ClassVar[str] = "component_norms"  # the evaluate() key tracked by identity
    what: ClassVar[str] = "component norm"
    scalars: ClassVar[tuple[str, ...]] = ("reconstruction_error", "unbalancedness")
    scalar_label: ClassVar[str] = "||W - W*|| / ||W*||"  # y label of the first scalar
    file_tag: ClassVar[str] = "std"  # per-run figure files: <trajectory>_<tag><value>.png
    label: ClassVar[str] = "init std {:g}"

    @abc.abstractmethod
    def build(self, cfg: Any, prepared: Any) -> Dynamics: ...

    @abc.abstractmethod
    def summarize(self, cfg: Any, its: np.ndarray, arrays: dict, state: TrainState) -> dict: ...

    def has_finished_work(self, run_dir: Path) -> bool:
        return (Path(run_dir) / CHECKPOINT).exists()

    def run_threads(self, cfg: Any, requested: int | None = None) -> int:
        """The thread policy's count for the step (:func:`implreg.threads.threads_for_config`)."""
        return threads_for_config(cfg, requested=requested)

    def run(self, cfg: Any, prepared: Any, ctx: RunContext) -> Outcome:
        dyn = self.build(cfg, prepared)
        state = None
        if ctx.resume and (ctx.run_dir / CHECKPOINT).exists():  # a folder there is refused
            state = self.read_checkpoint(ctx.run_dir, dyn)
        elif ctx.resume:  # stopped (kill -9) before its first checkpoint: nothing was saved
            ctx.log("no checkpoint in the run folder yet: the run starts from iteration 0")
        start_it = state.iteration if state else 0
        labels = [self.label.format(v) for v in dyn.values]
        threads = threads_for_config(cfg, requested=ctx.threads)
        checkpointer = Checkpointer(
            lambda st: save_checkpoint(ctx.run_dir, st),
            every=ctx.checkpoint_every,
            seconds=ctx.checkpoint_seconds,
        )
        common = dict(
            params=dyn.params,
            loss_and_grad=dyn.loss_and_grad,
            recorder=dyn.recorder,
            evaluate=dyn.evaluate,
            state=state,
            interrupt=ctx.interrupt,
            describe=dyn.describe,
            on_message=lambda b, msg: ctx.log(f"{labels[b]}: {msg}"),
            checkpoint=checkpointer,
        )
        if dyn.flow is not None:
            bar = ctx.bar(len(dyn.flow.times()), start_it, unit="record", desc="flow")
        else:
            bar = ctx.bar(dyn.stop.max_iterations, start_it, desc="iteration")
        start = time.perf_counter()
        try:
            with use_threads(threads):
                if dyn.flow is not None:
                    state, interrupted = flow_train(spec=dyn.flow, progress=bar, **common)
                else:
                    state, interrupted = train(
                        optimizer=dyn.optimizer, stop=dyn.stop, progress=bar, **common
                    )
        finally:
            if bar is not None:
                bar.close()
        elapsed = time.perf_counter() - start
        self.write_metrics(ctx.run_dir, dyn.key, dyn.values, dyn.recorder, cfg.top_k)
        if interrupted:
            save_checkpoint(ctx.run_dir, state.to_dict())
            return Outcome(None, 130, True, f"iteration {state.iteration}; checkpoint written")
        its, arrays = dyn.recorder.arrays()
        if dyn.flow is not None:  # the summary counts GD-step equivalents t / lr
            flow_records = state.iteration
            state.iteration = round(state.optimizer["time"] / dyn.flow.lr)
        summary = self.summarize(cfg, its, arrays, state)
        if dyn.flow is None:
            add_step_record(summary["runs"], state.optimizer)
        summary["wall_seconds_this_session"] = elapsed
        summary["threads"] = threads
        if dyn.flow is not None:
            summary["flow"] = {
                "method": dyn.flow.method,
                "rtol": dyn.flow.rtol,
                "atol": dyn.flow.atol,
                "time": state.optimizer["time"],
                "gradient_evaluations": state.optimizer["evaluations"],
                "record_times": flow_records,
                "stopped_time": state.stop["stopped_time"],
            }
        else:
            summary["iterations_per_second"] = (
                (state.iteration - start_it) / elapsed if elapsed > 0 else None
            )
        summary["problems"] = assess(summary["runs"], lambda r: self.label.format(r[dyn.key]))
        write_json(ctx.run_dir / SUMMARY, summary)
        (ctx.run_dir / CHECKPOINT).unlink(missing_ok=True)  # the summary holds the result now
        self.plot(ctx.run_dir)
        return Outcome(summary, 1 if summary["problems"] else 0)

    def read_checkpoint(self, run_dir: Path, dyn: Dynamics) -> TrainState:
        """The checkpoint of ``run_dir``, checked against the runs its config.json builds."""
        keys = ("iteration", "params", "optimizer", "stop", "recorder", "messages")
        state = TrainState.from_dict(load_checkpoint(run_dir, keys))
        path = Path(run_dir) / CHECKPOINT
        shapes = [tuple(p.shape) for p in dyn.params]
        saved = [tuple(p.shape) if isinstance(p, torch.Tensor) else None for p in state.params]
        if saved != shapes:
            raise DamagedRunError(
                f"{path} does not match config.json (parameters {saved} where the config "
                f"builds {shapes}); was config.json edited?"
            )
        status = state.stop.get("status") if isinstance(state.stop, dict) else None
        if not isinstance(status, list) or len(status) != len(dyn.values):
            raise DamagedRunError(f"{path} does not match config.json (number of runs differs)")
        if not isinstance(state.iteration, int) or state.iteration < 0:
            raise DamagedRunError(f"{path} is damaged (iteration {state.iteration!r})")
        return state

    def write_metrics(
        self, run_dir: Path, key: str, values: Sequence, recorder: Recorder, top_k: int
    ) -> None:
        """``metrics.csv`` (one row per run and record) and ``<trajectory>.npz``."""
        its, arrays = recorder.arrays()
        if its.size == 0:
            return
        with atomic_path(run_dir / self.table) as tmp:
            with open(tmp, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["iteration", "run", key, "train_loss", *self.scalars])
                cols = ["train_loss", *self.scalars]
                flow = its.dtype.kind == "f"  # gradient flow: t / lr, not an integer
                for t, it in enumerate(its):
                    x = repr(float(it)) if flow else int(it)
                    for b, v in enumerate(values):
                        w.writerow([x, b, v, *(repr(float(arrays[c][t, b])) for c in cols)])
        with atomic_path(run_dir / f"{self.trajectory}.npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(
                    fh,
                    iterations=its,
                    norms=arrays[self.trajectory],
                    **{f"{key}s": np.asarray(values)},
                    top_k=top_k,
                    flow=its.dtype.kind == "f",
                )

    def load_trajectories(self, run_dir: Path) -> dict[str, np.ndarray]:
        """The arrays of ``<trajectory>.npz``: iterations, norms (T, B, K), run values, top_k."""
        path = Path(run_dir) / f"{self.trajectory}.npz"
        with reading(path, "trajectories"), open(path, "rb") as fh, np.load(fh) as data:
            arrays = {k: data[k] for k in data.files}
            if "iterations" not in arrays or "norms" not in arrays or arrays["norms"].ndim != 3:
                raise ValueError("not a trajectory file")
            return arrays

    def plot(self, run_dir: Path) -> list[Path]:
        """The top-k trajectories of every run and the first scalar, from the folder alone."""
        run_dir = Path(run_dir)
        data = self.load_trajectories(run_dir)
        its, norms = data["iterations"], data["norms"]
        values = next(
            v for k, v in data.items() if k not in ("iterations", "norms", "top_k", "flow")
        )
        series, lines, singles = [], [], []
        with reading(run_dir / self.table, "metrics table"), open(run_dir / self.table) as fh:
            rows = list(csv.DictReader(fh))
            if len(rows) != its.size * len(values):  # one row per record and run
                raise ValueError(f"{len(rows)} rows where {its.size * len(values)} belong")
            for b, v in enumerate(values):
                mine = [r for r in rows if int(r["run"]) == b]
                xs = np.array([float(r["iteration"]) for r in mine])
                lines.append((self.label.format(v), xs, [float(r[self.scalars[0]]) for r in mine]))
        with reading(run_dir / f"{self.trajectory}.npz", "trajectories"):
            for b, v in enumerate(values):
                its_b, norms_b = trajectories(its, norms, b)
                series.append((self.label.format(v), its_b, norms_b))
                singles.append(f"{self.trajectory}_{self.file_tag}{v:g}.png")
        return topk_figure(
            run_dir,
            series,
            top_k=int(data.get("top_k", 10)),
            what=self.what,
            scalar=(self.scalars[0], self.scalar_label, lines),
            singles=singles,
            xlabel=FLOW_AXIS if bool(data.get("flow", False)) else "iteration",
        )


__all__ = [
    "FLOW_AXIS",
    "Dynamics",
    "DynamicsExperiment",
    "flow_spec",
    "learned_now",
    "learned_summary",
    "learned_text",
    "topk_figure",
    "trajectories",
]
