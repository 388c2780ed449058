"""Gradient flow as an optimizer (:mod:`implreg.flow`): against exact solutions, events,
interrupts and resume, budgets, and the dynamics presets' ``optimizer=flow``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from implreg.flow import FlowRecorder, FlowSpec, flow_train
from implreg.training import Checkpointer, TrainState


def quadratic(a: torch.Tensor):
    """L_b(θ) = 1/2 Σ_i a_bi θ_bi²: the flow is θ(t) = θ(0) exp(-a t) (one run, or runs that
    all go on together)."""

    def loss_and_grad(params):
        (x,) = params
        return 0.5 * (a * x**2).sum(1), [a * x]

    return loss_and_grad


class _Quadratic:
    """Runs that drop out keep their own rates: the sub-batch is matched by its initial state."""

    def __init__(self, a: torch.Tensor, x0: torch.Tensor):
        self.a, self.x0 = a, x0

    def rates(self, x: torch.Tensor) -> torch.Tensor:
        # each row of x keeps the ratios of its run's x0 (the flow scales coordinates only
        # by exp(-a t) with a run's own a), so match rows by sign pattern and magnitude order
        idx = [self.owner(row) for row in x]
        return self.a[idx]

    def owner(self, row: torch.Tensor) -> int:
        best, where = math.inf, 0
        for b in range(self.x0.shape[0]):
            # log|x| - log|x0| = -a t: the spread over coordinates of (log|x|-log|x0|)/a is 0
            r = (torch.log(row.abs()) - torch.log(self.x0[b].abs())) / self.a[b]
            spread = float(r.max() - r.min())
            if spread < best:
                best, where = spread, b
        return where

    def __call__(self, params):
        (x,) = params
        a = self.rates(x)
        return 0.5 * (a * x**2).sum(1), [a * x]


def _run(spec, fn, x0, **kw):
    x = x0.clone()
    rec = FlowRecorder()
    state, interrupted = flow_train(
        params=[x], loss_and_grad=fn, spec=spec, recorder=rec, evaluate=lambda p: {}, **kw
    )
    return x, rec, state, interrupted


def test_times_are_log_spaced_from_lr_to_t_max():
    spec = FlowSpec(threshold=0.0, lr=0.01, t_max=10.0, per_decade=4)
    t = spec.times()
    assert t[0] == 0 and t[1] == pytest.approx(0.01) and t[-1] == pytest.approx(10.0)
    ratios = t[2:-1] / t[1:-2]
    assert np.allclose(ratios, 10 ** (1 / 4))
    assert len(t) == 1 + 3 * 4 + 1


@pytest.mark.parametrize(
    "kw",
    [{"method": "euler"}, {"rtol": 0.0}, {"per_decade": 0}, {"t_max": -1.0}, {"max_evals": 0}],
)
def test_bad_spec_is_refused(kw):
    base = {"threshold": 1e-3, "lr": 0.1, "t_max": 1.0}
    with pytest.raises(ValueError):
        FlowSpec(**{**base, **kw})


def test_matches_the_exact_flow_of_a_quadratic_and_locates_the_stop():
    torch.manual_seed(0)
    a = torch.tensor([[1.0, 3.0, 0.5], [0.2, 0.7, 2.0]], dtype=torch.float64)
    x0 = torch.randn(2, 3, dtype=torch.float64)
    fn = _Quadratic(a, x0)
    loss0 = 0.5 * (a * x0**2).sum(1)
    thr = 1e-4
    spec = FlowSpec(threshold=thr, lr=0.01, t_max=1e3, rtol=1e-9, atol=1e-12, per_decade=10)
    x, rec, state, interrupted = _run(spec, fn, x0)
    assert not interrupted
    assert state.stop["status"] == ["converged", "converged"]
    its, arrays = rec.arrays()
    for b in range(2):
        t_b = its * spec.lr
        ok = np.isfinite(arrays["train_loss"][:, b])
        exact = 0.5 * (a[b] * x0[b] ** 2 * torch.exp(-2 * a[b] * torch.as_tensor(t_b[ok])[:, None]))
        assert np.allclose(arrays["train_loss"][ok, b], exact.sum(1).numpy(), rtol=1e-6, atol=0)
        assert np.allclose(arrays["time"][ok, b], t_b[ok])
        # the stop: the loss at the located time is the threshold, and it is the first crossing
        t_stop = state.stop["stopped_time"][b]
        at_stop = float(0.5 * (a[b] * x0[b] ** 2 * torch.exp(-2 * a[b] * t_stop)).sum())
        assert at_stop == pytest.approx(thr, rel=1e-5)
        assert float(loss0[b]) > thr
        assert (x[b] - x0[b] * torch.exp(-a[b] * t_stop)).abs().max() < 1e-7
    assert state.optimizer["evaluations"] > 0


def test_runs_do_not_change_each_others_trajectories():
    torch.manual_seed(1)
    a = torch.tensor([[1.0, 2.0], [50.0, 80.0]], dtype=torch.float64)  # one stiff run
    x0 = torch.randn(2, 2, dtype=torch.float64)
    spec = FlowSpec(threshold=0.0, lr=0.01, t_max=5.0, rtol=1e-8, atol=1e-12, per_decade=5)
    _, rec_both, _, _ = _run(spec, _Quadratic(a, x0), x0)
    _, rec_one, _, _ = _run(spec, _Quadratic(a[:1], x0[:1]), x0[:1])
    both = rec_both.arrays()[1]["train_loss"][:, 0]
    one = rec_one.arrays()[1]["train_loss"][:, 0]
    # error control is per run: the same tolerance holds whatever the other run does
    exact = [
        float(0.5 * (a[0] * x0[0] ** 2 * math.exp(0) * torch.exp(-2 * a[0] * t)).sum())
        for t in rec_one.arrays()[0] * spec.lr
    ]
    assert np.allclose(both, exact, rtol=1e-6)
    assert np.allclose(one, exact, rtol=1e-6)


def test_interrupt_and_resume_is_bit_identical():
    torch.manual_seed(2)
    a = torch.tensor([[1.0, 3.0], [0.5, 0.25]], dtype=torch.float64)
    x0 = torch.randn(2, 2, dtype=torch.float64)
    spec = FlowSpec(threshold=1e-6, lr=0.01, t_max=1e3, per_decade=6, chunk=3)
    x_full, rec_full, state_full, _ = _run(spec, _Quadratic(a, x0), x0)

    saved = []
    checkpoint = Checkpointer(lambda st: saved.append(_copy(st)), every=1)

    class StopAfter:
        def __init__(self, n):
            self.n = n

        def is_set(self):
            self.n -= 1
            return self.n < 0

    _, _, _, interrupted = _run(
        spec, _Quadratic(a, x0), x0, interrupt=StopAfter(4), checkpoint=checkpoint
    )
    assert interrupted and saved
    last = saved[-1]
    state = TrainState.from_dict(last)
    x = last["params"][0].clone()
    rec = FlowRecorder()
    state2 = _resume(x, rec, state, spec, _Quadratic(a, x0))
    assert torch.equal(x, x_full)
    assert rec.iterations == rec_full.iterations
    for key, vals in rec_full.values.items():
        assert all(np.array_equal(u, v, equal_nan=True) for u, v in zip(vals, rec.values[key]))
    assert state2.stop == state_full.stop


def test_an_interrupt_inside_a_long_solver_call_stops_it_and_resume_redoes_the_chunk(
    monkeypatch,
):
    """Ctrl-C or SIGTERM during a solver call (a chunk can take minutes) ends the call at the
    next poll; the state, records and evaluation count are those of the chunk's start, so
    the resumed run equals an uninterrupted one."""
    import implreg.flow as flow_mod

    torch.manual_seed(3)
    a = torch.tensor([[1.0, 3.0], [0.5, 0.25]], dtype=torch.float64)
    x0 = torch.randn(2, 2, dtype=torch.float64)
    spec = FlowSpec(threshold=1e-6, lr=0.01, t_max=1e3, per_decade=6, chunk=3)
    x_full, rec_full, state_full, _ = _run(spec, _Quadratic(a, x0), x0)

    class SetAfter:  # set from the third poll on: the loop's poll, then two inside the call
        polls = 0

        def is_set(self):
            self.polls += 1
            return self.polls >= 3

    monkeypatch.setattr(flow_mod, "POLL_SECONDS", 0.0)
    x, rec, state, interrupted = _run(spec, _Quadratic(a, x0), x0, interrupt=SetAfter())
    assert interrupted and state.iteration == 1 and rec.iterations == [0.0]
    assert state.optimizer["evaluations"] == 1  # the initial loss only: the chunk is dropped
    assert torch.equal(x, x0)
    state2 = _resume(x, rec, state, spec, _Quadratic(a, x0))
    assert torch.equal(x, x_full) and rec.iterations == rec_full.iterations
    assert state2.stop == state_full.stop
    assert state2.optimizer["evaluations"] == state_full.optimizer["evaluations"]


def _resume(x, rec, state, spec, fn):
    """Continue a flow run of the quadratic ``fn`` from ``state`` into ``x`` and ``rec``."""
    return flow_train(
        params=[x], loss_and_grad=fn, spec=spec, recorder=rec, evaluate=lambda p: {}, state=state
    )[0]


def _copy(st: dict) -> dict:
    import copy

    out = copy.deepcopy({k: v for k, v in st.items() if k != "params"})
    out["params"] = [p.clone() for p in st["params"]]
    return out


def test_budget_and_non_finite_stops():
    a = torch.tensor([[1.0]], dtype=torch.float64)
    x0 = torch.ones(1, 1, dtype=torch.float64)
    spec = FlowSpec(threshold=0.0, lr=0.01, t_max=1e6, max_evals=40)
    _, _, state, _ = _run(spec, quadratic(a), x0)
    assert state.stop["status"] == ["max_evals"]

    def blows_up(params):  # L = -x^4 / 4: x' = x^3 blows up at t = 1/2
        (x,) = params
        return -(x**4).sum(1) / 4, [-(x**3)]

    spec = FlowSpec(threshold=-1e300, lr=0.01, t_max=10.0, max_evals=100_000)
    _, _, state, _ = _run(spec, blows_up, x0)
    assert state.stop["status"] == ["non_finite"]
    assert state.stop["stopped_time"][0] <= 0.6


def test_float32_parameters_are_refused():
    spec = FlowSpec(threshold=0.0, lr=0.01, t_max=1.0)
    with pytest.raises(ValueError, match="float64"):
        _run(spec, quadratic(torch.ones(1, 1)), torch.ones(1, 1))


def test_cp_flow_conserves_lemma_1_at_tight_tolerance():
    """ICML 2021 Lemma 1: ||w_r^n||² - ||w_r^n'||² is constant along the flow."""
    from implreg.factorizations.cp import cp_init
    from implreg.factorizations.cp_engine import completion_engine
    from implreg.losses import make_loss
    from implreg.problems.synthetic import completion_problem, low_cp_rank_tensor

    gen = torch.Generator().manual_seed(0)
    dims = (5, 4, 6)
    truth = low_cp_rank_tensor(dims, 2, norm=1.0, generator=gen)
    prob = completion_problem(truth, 40, generator=gen)
    engine = completion_engine(dims, prob.idx, prob.y.double(), method="dense")
    loss = make_loss("l2")
    factors = cp_init(dims, 6, stds=(0.3,), generator=gen, dtype=torch.float64)

    def diffs(fs):
        sq = torch.stack([f.pow(2).sum(1) for f in fs])  # (N, B, R)
        return sq[1:] - sq[:1]

    d0 = diffs(factors)
    spec = FlowSpec(threshold=1e-8, lr=0.01, t_max=2e3, rtol=1e-9, atol=1e-12, per_decade=4)
    state, _ = flow_train(
        params=factors,
        loss_and_grad=lambda f: engine.loss_and_grad(f, loss),
        spec=spec,
        recorder=FlowRecorder(),
        evaluate=lambda f: {},
    )
    scale = max(float(torch.stack([f.pow(2).sum(1) for f in factors]).max()), 1.0)
    drift = float((diffs(factors) - d0).abs().max()) / scale
    assert drift <= 1e-8
    assert state.optimizer["time"] > 0


def test_flow_needs_float64_in_the_config(tmp_path, capsys):
    from implreg.cli import main

    out = tmp_path / "run"
    assert main(["run", "tf-dynamics", "--set", "optimizer=flow", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "dtype=float64" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_tf_flow_preset_tiny_runs_and_records_time(tmp_path):
    import implreg
    from implreg.experiments.cp_dynamics import EXPERIMENT

    preset = next(p for p in EXPERIMENT.presets if p.name == "tf-flow")
    run = implreg.run("tf-flow", out=tmp_path / "run", progress=False, **preset.tiny)
    flow = run.summary["flow"]
    assert flow["method"] == "dopri5" and flow["gradient_evaluations"] > 0
    assert {r["status"] for r in run.summary["runs"]} <= {"converged", "max_time"}
    text = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert text[0].startswith("iteration,run,init_std")
    xs = sorted({float(line.split(",")[0]) for line in text[1:]})
    assert xs[0] == 0.0 and any(x != int(x) for x in xs)  # t / lr: log-spaced, not integers


def test_a_killed_flow_run_resumes_from_its_last_checkpoint_bit_identically(tmp_path):
    """kill -9 (a BaseException raised at the interrupt poll) after some chunks: the folder
    keeps its last checkpoint and ``--resume`` ends with the files of an uninterrupted run."""
    from test_crash_safety import DieAfter, Killed, _same_folder_results

    from implreg.api import run_preset
    from implreg.experiments import get_preset
    from implreg.runs import CHECKPOINT, SUMMARY, load_checkpoint

    tiny = dict(get_preset("tf-flow").tiny)
    cfg = get_preset("tf-flow").config

    def go(out, **kw):
        return run_preset(cfg, out=out, overrides=tiny, log=lambda *_: None, **kw)

    assert go(tmp_path / "whole").exit_code == 0
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        go(out, interrupt=DieAfter(3), checkpoint_every=2, checkpoint_seconds=0.0)
    assert (out / CHECKPOINT).is_file() and not (out / SUMMARY).exists()
    assert load_checkpoint(out)["iteration"] > 1  # record times done when it was written
    resumed = run_preset(out=out, resume=True, log=lambda *_: None)
    assert resumed.exit_code == 0 and not (out / CHECKPOINT).exists()
    _same_folder_results(out, tmp_path / "whole")
