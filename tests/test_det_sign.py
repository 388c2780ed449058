"""The 2x2 determinant-sign example (Razin & Cohen 2020, REFERENCE §3) at reduced budgets."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import run_config

from implreg.cli import main
from implreg.experiments import PRESETS
from implreg.experiments import mf_det_sign as ds
from implreg.factorizations.det_sign import (
    OBSERVED,
    TARGET,
    init_layers,
    loss_and_grads,
    product,
    run_gd,
)
from implreg.sweep import load_results


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_kernel_loss_and_gradients_match_autograd(depth):
    rng = np.random.default_rng(depth)
    layers = rng.normal(size=(depth, 2, 2))
    loss, grads, w = loss_and_grads(layers.copy())
    t = torch.tensor(layers, requires_grad=True)
    prod = t[0]
    for j in range(1, depth):
        prod = t[j] @ prod
    ref = 0.5 * (((prod - torch.tensor(TARGET)) * torch.tensor(OBSERVED)) ** 2).sum()
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-12)
    assert np.allclose(grads, t.grad.numpy(), rtol=1e-12, atol=1e-14)
    assert np.allclose(w, prod.detach().numpy())


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_inits_have_positive_det_and_balanced_is_balanced(depth):
    rng = np.random.default_rng(0)
    for _ in range(20):
        for init in ("random", "balanced"):
            layers = init_layers(depth, init, 1e-3, rng)
            assert np.linalg.det(product(layers)) > 0
        bal = init_layers(depth, "balanced", 1e-3, rng)
        for j in range(depth - 1):
            assert np.allclose(bal[j + 1].T @ bal[j + 1], bal[j] @ bal[j].T, atol=1e-15)
    # the random init's product has entry std end_std
    prods = np.stack([product(init_layers(depth, "random", 1e-3, rng)) for _ in range(4000)])
    assert prods.std() == pytest.approx(1e-3, rel=0.1)


def test_plain_gd_is_the_obvious_loop():
    rng = np.random.default_rng(3)
    layers = init_layers(3, "random", 1e-1, rng)
    ref = torch.tensor(layers.copy(), requires_grad=True)
    status, steps, _ = run_gd(layers, 1e-2, 0.0, 1e-30, 50, 0.9)
    assert status == 1 and steps == 50
    for _ in range(50):
        prod = ref[2] @ ref[1] @ ref[0]
        loss = 0.5 * (((prod - torch.tensor(TARGET)) * torch.tensor(OBSERVED)) ** 2).sum()
        (g,) = torch.autograd.grad(loss, ref)
        ref = (ref - 1e-2 * g).detach().requires_grad_()
    assert np.allclose(layers, ref.detach().numpy(), rtol=1e-12, atol=1e-15)


def _run(cfg, tmp_path):
    return run_config(cfg, tmp_path)


def test_flow_follows_the_rank_one_path_and_keeps_det_positive(tmp_path):
    cfg = dataclasses.replace(
        PRESETS["mf-det-sign"].config,
        depths=(3, 4),
        modes=("flow",),
        inits=("balanced",),
        loss_tol=1e-3,
        workers=1,
    )
    out = _run(cfg, tmp_path)
    for r in out.summary["runs"]:
        assert r["status"] == "reached_loss_tol"
        assert not r["crossed_det_zero"] and r["final_det"] > 0
        assert r["final_abs_w11"] == pytest.approx(r["rank_one_abs_w11"], rel=0.02)
        assert r["final_abs_w11"] > 20  # (2 * 1e-3) ** -0.5 = 22.4
        # every norm and quasi-norm grows while the effective rank falls towards 1
        units = ds.EXPERIMENT.units(cfg)
        rec = load_results(tmp_path, units)[f"depth{r['depth']}-flow-balanced"]["records"]
        for key in rec:
            if key.startswith("schatten_"):
                assert rec[key][-1] > 1000 * rec[key][0]
        assert r["final_norms"]["effective_rank"] < 1.01
        assert max(r["final_balancedness"]) < 1e-2  # balancedness is conserved up to discretization
    assert (tmp_path / "figure.png").stat().st_size > 0


def test_published_gd_at_depth_2_crosses_det_zero_and_is_flagged(tmp_path, capsys):
    out = tmp_path / "r"
    argv = [
        "run",
        "mf-det-sign",
        "--set",
        "depths=2",
        "--set",
        "modes=gd",
        "--set",
        "inits=random",
        "--set",
        "loss_tol=1e-3",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "CROSSED det = 0" in printed
    (unit,) = (out / "units").glob("*.json")
    assert '"crossed_det_zero": true' in unit.read_text()


def test_bad_input(tmp_path, capsys):
    for key, msg in [
        ("depths=0,2", "every value of depths must be >= 1"),
        ("end_std=-1", "end_std must be positive"),
        ("modes=gd,exact", "modes must be one of 'gd', 'flow'"),
        ("flow_c=2", "flow_c must be in (0, 1)"),
    ]:
        out = tmp_path / key.split("=")[0]
        assert main(["run", "mf-det-sign", "--set", key, "--out", str(out)]) == 2
        assert msg in capsys.readouterr().err
        assert not out.exists()
