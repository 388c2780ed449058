"""The Figure 4 fitter that runs to the minimum (Razin et al. 2021, Figure 4):
sparse objective against the dense one and autograd, an exact low-rank minimum reached,
no worse than the previous fitter at the same budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DATA_DIR

from implreg.factorizations.cp_exp import (
    ExpSumObjective,
    ExpSumPredictor,
    Standardization,
    fit_exp_sum,
    one_hot_features,
)
from implreg.factorizations.cp_exp_binary import BinaryExpSumObjective
from implreg.optim.exp_sum_fit import fit_exp_sum_converged

F64 = torch.float64
DATA = DATA_DIR


def _binary(n: int, order: int, seed: int, p: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, order, generator=g) < p).to(torch.int64)


@pytest.mark.parametrize("engine", ["packed", "csr"])
def test_binary_objective_matches_dense_objective_and_autograd(engine):
    x = _binary(300, 10, seed=0)
    feats = one_hot_features(x, 2, F64)
    std = Standardization.of(feats)
    targets = torch.rand(300, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    signs = torch.tensor([[1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=F64)
    sparse = BinaryExpSumObjective(feats, std.mean, std.scale, targets, signs, engine=engine)
    dense = ExpSumObjective(std.apply(feats), targets, signs)
    params = 0.3 * torch.randn(3, 2 * 11, generator=torch.Generator().manual_seed(2), dtype=F64)
    idx = torch.tensor([0, 2])
    loss, grad_of = sparse(params[idx], idx)
    ref_loss, ref_grad_of = dense(params[idx], idx)
    sel = torch.arange(2)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_of(sel), ref_grad_of(sel), rtol=1e-10, atol=1e-14)
    p = params[idx].clone().requires_grad_()
    sparse(p, idx)[0].sum().backward()  # the loss is built from differentiable ops
    torch.testing.assert_close(grad_of(sel), p.grad, rtol=1e-10, atol=1e-14)


def test_reaches_an_exact_low_rank_minimum():
    """Targets are a rank-2 positive exp-sum predictor's values, so train MSE 0 is attainable."""
    x = _binary(500, 12, seed=3)
    std = Standardization.of(one_hot_features(x, 2, torch.float32))
    g = torch.Generator().manual_seed(4)
    truth = ExpSumPredictor(
        weights=0.25 * torch.randn(1, 2, 12, generator=g),
        bias=torch.tensor([[-1.0, -1.5]]),
        signs=torch.ones(1, 2),
        standardization=std,
        levels=2,
    )
    y = truth.values(x)[:, 0]
    fit = fit_exp_sum_converged(x, y, 2, iterations=2000, window=50, rel_tol=1e-7)
    # float32 arithmetic: the loss floor is ~ (1e-7 * |y|)^2, far below this bound
    assert float(fit.train_loss[0]) < 1e-6 * float(y.pow(2).mean())
    assert bool(fit.converged[0])
    assert float(fit.rel_change[0]) <= 1e-7 or float(fit.train_loss[0]) < 1e-10
    # the predictor returned evaluates to the fitted loss
    pred = fit.predictor.values(x)[:, 0]
    assert float((pred - y).pow(2).mean()) == pytest.approx(float(fit.train_loss[0]), abs=1e-9)


def test_constant_features_are_dropped_and_get_zero_weight():
    x = _binary(200, 6, seed=5)
    x[:, 2] = 0  # a pixel that is never on
    y = (x[:, 0] | x[:, 1]).to(torch.float32)
    fit = fit_exp_sum_converged(x, y, 1, iterations=50)
    assert float(fit.predictor.weights[0, 0, 2]) == 0.0
    assert torch.isfinite(fit.predictor.values(x)).all()


@pytest.mark.skipif(
    not (DATA / "mnist").is_dir(),
    reason="no MNIST: ../shared/data and $IMPLREG_DATA_DIR are absent",
)
def test_not_worse_than_the_previous_fitter_on_real_mnist():
    """3000 MNIST images, class 6 vs rest, rank 3, the same 150 iterations from the same start."""
    from implreg.problems.images import discretize, load_dataset

    data = load_dataset("mnist", DATA)
    x = torch.from_numpy(discretize(data["train"].images[:3000]))
    y = torch.from_numpy((data["train"].labels[:3000] == 6).astype(np.float32))
    old = fit_exp_sum(x, y, 3, iterations=150, seed=7)
    new = fit_exp_sum_converged(x, y, 3, iterations=150, rel_tol=0.0, seed=7)
    assert new.iterations == 150
    assert float(new.train_loss[0]) <= float(old.train_loss[0])


@pytest.mark.parametrize("engine", ["packed", "csr"])
def test_binary_objective_keeps_its_buffers_between_evaluations(engine):
    """Evaluations of every width in one objective equal a fresh objective's, and a stale
    grad_of (its buffers reused by a later evaluation) refuses to run."""
    x = _binary(250, 9, seed=20)
    feats = one_hot_features(x, 2, F64)
    std = Standardization.of(feats)
    targets = torch.rand(250, 4, generator=torch.Generator().manual_seed(21), dtype=F64)
    signs = torch.ones(4, 3, dtype=F64)
    params = 0.2 * torch.randn(4, 3 * 10, generator=torch.Generator().manual_seed(22), dtype=F64)

    def fresh(idx, sel):
        obj = BinaryExpSumObjective(feats, std.mean, std.scale, targets, signs, engine=engine)
        loss, grad_of = obj(params[idx], idx)
        return loss, grad_of(sel)

    kept = BinaryExpSumObjective(feats, std.mean, std.scale, targets, signs, engine=engine)
    for idx, sel in [([0, 1, 2, 3], [0, 1, 2, 3]), ([2], [0]), ([1, 3], [1]), ([0, 1, 2], [0, 2])]:
        idx, sel = torch.tensor(idx), torch.tensor(sel)
        loss, grad_of = kept(params[idx], idx)
        ref_loss, ref_grad = fresh(idx, sel)
        assert torch.equal(loss, ref_loss)
        assert torch.equal(grad_of(sel), ref_grad)
    idx = torch.tensor([0, 1])
    _, stale = kept(params[idx], idx)
    kept(params[idx], idx)
    with pytest.raises(RuntimeError, match="after a later evaluation"):
        stale(torch.arange(2))
