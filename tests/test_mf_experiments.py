"""Matrix-factorization presets at reduced budgets (REFERENCE §3)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import run_config

from implreg.cli import main
from implreg.experiments import PRESETS
from implreg.runs import read_json

SMALL = dict(shape=(30, 30), gt_rank=3, gt_norm=30.0, num_observations=400, workers=1)


def test_depth_learns_singular_values_one_after_another(tmp_path):
    cfg = dataclasses.replace(
        PRESETS["mf-dynamics"].config, **SMALL, depths=(1, 3), max_iterations=60_000, log_every=50
    )
    out = run_config(cfg, tmp_path)
    runs = {r["depth"]: r for r in out.summary["runs"]}
    assert runs[3]["status"] == "converged"
    assert runs[3]["test_mse"] < 1e-3 < runs[1]["test_mse"]
    assert runs[3]["effective_rank"] < 3.3 < runs[1]["effective_rank"]
    hist = read_json(tmp_path / "units" / "depth3.json")["result"]["history"]
    assert runs[3]["n_learned"] == 3 and runs[3]["learned"][0]["left_zero_at"] > 0
    its, sv = np.asarray(hist["iteration"]), np.asarray(hist["singular_values"])
    final = sv[-1, :3]
    # iteration at which each of the top three reaches half its final value: strictly increasing
    reach = [its[np.argmax(sv[:, k] >= 0.5 * final[k])] for k in range(3)]
    assert reach[0] < reach[1] < reach[2]
    assert (tmp_path / "figure.png").stat().st_size > 0


def test_depth_vs_nuclear_grid_and_figure(tmp_path):
    cfg = dataclasses.replace(
        PRESETS["mf-depth-vs-nuclear"].config,
        shape=(20, 20),
        gt_rank=1,
        gt_norm=20.0,
        depths=(2, 3),
        init_scales=(1e-2, 1e-3),
        observations=(120,),
        sweep_observations=(80, 120),
        sweep_depths=(3,),
        sweep_init_scale=1e-3,
        max_iterations=40_000,
        workers=2,
    )
    out = run_config(cfg, tmp_path)
    s = out.summary
    fits = {(f["depth"], f["init_scale"], f["m"]): f for f in s["fits"]}
    assert set(fits) == {
        (2, 1e-2, 120),
        (2, 1e-3, 120),
        (3, 1e-2, 120),
        (3, 1e-3, 120),
        (3, 1e-3, 80),
    }
    nuc = {n["m"]: n for n in s["nuclear"]}
    assert set(nuc) == {80, 120}
    # the ground truth is feasible for the baseline: its nuclear norm is not above the truth's
    assert nuc[120]["nuclear_norm"] <= s["ground_truth"]["nuclear_norm"] * (1 + 1e-3)
    deep = fits[(3, 1e-3, 120)]
    assert deep["status"] == "converged" and deep["effective_rank"] < 1.5
    assert (tmp_path / "figure.png").stat().st_size > 0
    # a finished grid is read back, not recomputed
    again = run_config(cfg, tmp_path / "again")
    assert [f["test_mse"] for f in again.summary["fits"]] == [f["test_mse"] for f in s["fits"]]


@pytest.mark.parametrize(
    ("preset", "key", "message"),
    [
        ("mf-dynamics", "num_observations=20000", "num_observations must lie in 1..10000"),
        ("mf-dynamics", "depths=0,2", "every value of depths must be >= 1"),
        ("mf-dynamics", "init_scale=-1", "init_scale must be positive"),
        ("mf-depth-vs-nuclear", "observations=20000", "observation counts must lie in"),
        ("mf-depth-vs-nuclear", "init_scales=1e-3,-1", "every value of init_scales must be pos"),
        ("mf-depth-vs-nuclear", "depths=0", "every value of depths must be >= 1"),
        ("mf-depth-vs-nuclear", "solver=NOPE", "solver must be one of 'SCS', 'CLARABEL'"),
    ],
)
def test_bad_input(tmp_path, capsys, preset, key, message):
    out = tmp_path / "r"
    assert main(["run", preset, "--set", key, "--out", str(out), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
