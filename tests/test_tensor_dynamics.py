"""The CP dynamics experiment (paper Figure 3) at reduced budgets, and its building blocks."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import StopAfter, run_config

from implreg.api import run_preset
from implreg.cli import main
from implreg.config import check
from implreg.experiments import PRESETS
from implreg.experiments import cp_dynamics as td
from implreg.experiments.dynamics import trajectories
from implreg.metrics import learned_components, top_components
from implreg.training import Recorder

TINY = td.CPDynamicsConfig(
    dims=(4, 4, 4),
    gt_rank=2,
    rank=20,
    num_observations=40,
    init_stds=(0.1, 0.05),
    max_iterations=150,
    dtype="float64",
)


def _run(cfg, tmp_path, **kw):
    return run_config(cfg, tmp_path, **kw)


def load_norms(run_dir):
    return td.EXPERIMENT.load_trajectories(run_dir)


def test_reduced_figure3_incremental_learning_and_ordering(tmp_path):
    """Figure 3 at R = 200: five components leave zero one at a time at init 0.005."""
    cfg = dataclasses.replace(PRESETS["tf-dynamics"].config, rank=200, max_iterations=20000, seed=3)
    out = _run(cfg, tmp_path)
    runs = {r["init_std"]: r for r in out.summary["runs"]}
    small = runs[0.005]
    assert small["status"] == "converged"
    assert small["n_learned"] == 5
    assert small["next_largest_over_smallest_learned"] < 0.01
    times = [c["left_zero_at"] for c in small["learned"]]
    assert times == sorted(times) and len(set(times)) == 5  # one after another
    errs = [runs[s]["final_reconstruction_error"] for s in (0.005, 0.01, 0.05)]
    # Only "the largest init ends worst" is robust (TF_CLAIMS): the stop rule (train loss below
    # 1e-8 for 51 checks) ends the 0.005 run soon after its fifth escape, while its error still
    # falls (0.0093 at 15375, 0.0036 at the stop at 16550 on a 2026-12-03 machine), so which of
    # 0.005 and 0.01 ends lower depends on the machine's float32 summation order.
    assert errs[2] > max(errs[0], errs[1])
    assert max(errs[0], errs[1]) <= 0.02
    # unbalancedness is conserved up to discretization (Lemma 1), tiny next to the norms
    assert small["unbalancedness_final"] < 1e-2
    # the adaptive step's record: flow time sum_t eta_t, at most lr / eps per step, and a last
    # step below lr / eps once the gradient is no longer tiny
    for r in runs.values():
        stop = r["stopped_at"]
        assert 0 < r["flow_time"] <= stop * cfg.lr / cfg.eps * (1 + 1e-12)
        assert 0 < r["last_step_size"] < cfg.lr / cfg.eps


def test_trajectories_track_component_identity(tmp_path):
    _run(TINY, tmp_path)
    data = load_norms(tmp_path)
    norms = data["norms"]
    assert norms.shape[1:] == (2, 20)
    # the top components by final norm are followed over time, not re-sorted per record
    b0 = norms[:, 0, :]
    sel = top_components(b0, 3)
    assert np.array_equal(np.argsort(-b0[-1])[:3], sel)
    learned = learned_components(data["iterations"], b0, fraction=0.1)
    assert all(b0[-1, c["component"]] > 0.1 * b0[-1].max() for c in learned)


def test_gather_and_dense_methods_agree(tmp_path):
    a = _run(dataclasses.replace(TINY, method="dense"), tmp_path / "a")
    b = _run(dataclasses.replace(TINY, method="gather"), tmp_path / "b")
    for ra, rb in zip(a.summary["runs"], b.summary["runs"]):
        assert ra["final_train_loss"] == pytest.approx(rb["final_train_loss"], rel=1e-8)
        assert ra["final_reconstruction_error"] == pytest.approx(
            rb["final_reconstruction_error"], rel=1e-8
        )


def test_sampled_reconstruction_error_estimates_the_full_one(tmp_path):
    full = _run(TINY, tmp_path / "full")
    sampled = _run(dataclasses.replace(TINY, dense_max=10, recon_sample=20000), tmp_path / "s")
    for rf, rs in zip(full.summary["runs"], sampled.summary["runs"]):
        assert rs["final_reconstruction_error"] == pytest.approx(
            rf["final_reconstruction_error"], rel=0.05
        )


@pytest.mark.parametrize("measurement", ["gaussian", "rank_one"])
def test_sensing_fits_the_measurements(tmp_path, measurement):
    cfg = dataclasses.replace(
        TINY, task="sensing", measurement=measurement, num_observations=60, max_iterations=1500
    )
    out = _run(cfg, tmp_path)
    its = load_norms(tmp_path)["iterations"]
    assert its[0] == 0
    for r in out.summary["runs"]:
        assert r["final_train_loss"] < 1e-3


def test_huber_preset_is_below_the_residual_scale_and_large_delta_warns():
    td.build_problem(PRESETS["tf-huber"].config)  # pytest turns any warning into an error
    with pytest.warns(UserWarning, match="equals half the squared error"):
        td.build_problem(dataclasses.replace(TINY, loss="huber", huber_delta=10.0))


def test_huber_run_converges(tmp_path):
    cfg = dataclasses.replace(TINY, loss="huber", huber_delta=0.01, max_iterations=400)
    out = _run(cfg, tmp_path)
    assert all(r["final_train_loss"] < 1e-3 for r in out.summary["runs"])


def test_non_finite_loss_stops_the_run_naming_the_iteration(tmp_path, capsys):
    argv = [
        "run",
        "tf-dynamics",
        "--set",
        "dims=4,4,4",
        "--set",
        "rank=20",
        "--set",
        "gt_rank=2",
        "--set",
        "num_observations=40",
        "--set",
        "init_stds=1,0.001",
        "--set",
        "optimizer=gd",
        "--set",
        "lr=1e6",
        "--set",
        "max_iterations=50",
        "--no-progress",
        "--out",
        str(tmp_path / "r"),
    ]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "init std 1: the loss became" in out and "at iteration" in out
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    statuses = [r["status"] for r in summary["runs"]]
    assert statuses[0] == "diverged"
    assert summary["runs"][0]["stopped_at"] < 50


@pytest.mark.parametrize("k", [0, 1, 17, 149])
def test_resume_after_interrupt_is_bit_identical(tmp_path, k):
    cfg = dataclasses.replace(TINY, tol=0.0, max_iterations=150, log_every=7)
    _run(cfg, tmp_path / "ref")
    cut = tmp_path / "cut"
    first = _run(cfg, cut, interrupt=StopAfter(k))
    assert first.interrupted and first.outcome.where.startswith(f"iteration {k};")
    assert (cut / "checkpoint.pt").exists()
    second = run_preset(out=cut, resume=True, log=lambda *_: None)
    assert not second.interrupted
    assert (cut / "metrics.csv").read_text() == (tmp_path / "ref" / "metrics.csv").read_text()
    a, b = load_norms(tmp_path / "ref"), load_norms(cut)
    assert np.array_equal(a["norms"], b["norms"], equal_nan=True)


def test_stopped_runs_drop_out_and_are_recorded_as_nan(tmp_path):
    cfg = dataclasses.replace(TINY, max_iterations=2000, tol=1e-6, patience=2, check_every=5)
    out = _run(cfg, tmp_path)
    stops = [r["stopped_at"] for r in out.summary["runs"]]
    assert all(s is not None for s in stops)
    data = load_norms(tmp_path)
    its, norms = data["iterations"], data["norms"]
    for b, s in enumerate(stops):
        assert np.isfinite(norms[its <= s, b]).all()
        assert np.isnan(norms[its > s, b]).all()
        # the plotted top components of a stopped run are its learned components
        its_b, norms_b = trajectories(its, norms, b)
        assert its_b[-1] == s
        learned = {c["component"] for c in out.summary["runs"][b]["learned"]}
        assert learned <= set(top_components(norms_b, len(learned)).tolist())


def test_recorder_memory_is_bounded_and_keeps_early_and_forced_records():
    rec = Recorder(log_every=1, max_records=50)
    for t in range(10_000):
        if rec.should_log(t) or t == 4321:
            rec.record(t, {"x": np.array([float(t)])}, forced=(t == 4321))
    its, arrays = rec.arrays()
    assert len(its) <= 51
    assert 0 in its and 4321 in its
    assert np.array_equal(arrays["x"][:, 0], its.astype(float))
    assert np.all(np.diff(its) > 0)


def test_presets_validate():
    for preset in PRESETS.values():
        check(preset.config)


def test_learned_components_rule():
    its = np.array([0, 10, 20, 30])
    norms = np.array(
        [
            [1e-4, 1e-4, 1e-4, 1e-4],
            [1e-4, 0.5, 1e-4, 1e-4],
            [1e-4, 0.6, 0.05, 1e-4],
            [1e-4, 0.6, 0.3, 0.03],
        ]
    )
    learned = learned_components(its, norms, fraction=0.1)
    assert [c["component"] for c in learned] == [1, 2]
    assert [c["left_zero_at"] for c in learned] == [10, 30]
    # nothing grew: nothing was learned, however the tiny norms compare with each other
    flat = np.full((3, 5), 1e-6) * np.array([1.0, 1.1, 1.2, 1.3, 1.4])
    assert learned_components(its[:3], flat) == []


@pytest.mark.slow
def test_full_figure3_preset(tmp_path):
    """The whole tf-dynamics preset (about 20 s here): `pytest -m slow`."""
    out = _run(PRESETS["tf-dynamics"].config, tmp_path)
    runs = {r["init_std"]: r for r in out.summary["runs"]}
    small = runs[0.005]
    assert small["n_learned"] == 5
    assert small["next_largest_over_smallest_learned"] < 0.01
    errs = [runs[s]["final_reconstruction_error"] for s in (0.005, 0.01, 0.05)]
    assert errs[2] > max(errs[0], errs[1])  # the robust part of the claim, as above
    assert errs[0] <= 0.02
