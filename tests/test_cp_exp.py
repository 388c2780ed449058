"""Exponential-linear CP predictors: features, standardization, objective, CP factors, fitting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from implreg.factorizations import cp_logdomain
from implreg.factorizations.cp_exp import (
    ExpSumObjective,
    ExpSumPredictor,
    Standardization,
    fit_exp_sum,
    one_hot_features,
)

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    # the fits are many small products: intra-op threads only add contention on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_predictor(tasks, rank, order, levels, seed, scale=0.5, n_train=40, mixed_signs=True):
    """A float64 predictor standardized on random training inputs; returns it and the generator."""
    g = _gen(seed)
    x_train = torch.randint(0, levels, (n_train, order), generator=g)
    std = Standardization.of(one_hot_features(x_train, levels, F64))
    d = order * (levels - 1)
    weights = scale * torch.randn(tasks, rank, d, generator=g, dtype=F64) / d**0.5
    bias = torch.randn(tasks, rank, generator=g, dtype=F64)
    if mixed_signs:
        signs = torch.where(torch.rand(tasks, rank, generator=g) < 0.5, -1.0, 1.0).to(F64)
    else:
        signs = torch.ones(tasks, rank, dtype=F64)
    return ExpSumPredictor(weights, bias, signs, std, levels), g


def _all_inputs(order: int, levels: int) -> torch.Tensor:
    grids = torch.meshgrid(*[torch.arange(levels)] * order, indexing="ij")
    return torch.stack([t.reshape(-1) for t in grids], dim=1)


# --------------------------------------------------------------------------- one_hot_features


@given(st.integers(2, 5), st.integers(1, 6), st.integers(1, 7), st.integers(0, 10_000))
def test_one_hot_features_match_the_definition(levels, order, n, seed):
    x = torch.randint(0, levels, (n, order), generator=_gen(seed))
    feats = one_hot_features(x, levels, F64)
    assert feats.shape == (n, order * (levels - 1)) and feats.dtype == F64
    expect = torch.zeros(n, order * (levels - 1), dtype=F64)
    for i in range(n):
        for j in range(order):
            for v in range(1, levels):
                expect[i, j * (levels - 1) + v - 1] = float(int(x[i, j]) == v)
    assert torch.equal(feats, expect)
    assert one_hot_features(x, levels).dtype == torch.float32


def test_one_hot_features_binary_is_the_input():
    x = torch.randint(0, 2, (9, 7), generator=_gen(0))
    assert torch.equal(one_hot_features(x, 2, F64), x.to(F64))


def test_one_hot_features_of_no_inputs_binary():
    assert one_hot_features(torch.zeros(0, 4, dtype=torch.long), 2, F64).shape == (0, 4)


@pytest.mark.parametrize("levels", [3, 5])
def test_one_hot_features_of_no_inputs(levels):
    feats = one_hot_features(torch.zeros(0, 4, dtype=torch.long), levels, F64)
    assert feats.shape == (0, 4 * (levels - 1))


def test_one_hot_features_rejects_bad_inputs():
    x = torch.tensor([[0, 1, 2]])
    with pytest.raises(ValueError):
        one_hot_features(x, 2)  # 2 is out of range for binary
    with pytest.raises(ValueError):
        one_hot_features(torch.tensor([[0, -1]]), 3)
    with pytest.raises(ValueError):
        one_hot_features(torch.tensor([[0, 0]]), 1)
    with pytest.raises(ValueError):
        one_hot_features(torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError):
        one_hot_features(torch.zeros(2, 2, 2, dtype=torch.long), 2)


# --------------------------------------------------------------------------- Standardization


def test_standardization_matches_numpy_and_handles_constant_features():
    g = _gen(1)
    feats = torch.randint(0, 2, (50, 6), generator=g).float()
    feats[:, 2] = 1.0  # constant
    feats[:, 4] = 0.0  # constant
    feats[:, 5] = torch.randn(50, generator=g)
    std = Standardization.of(feats)
    arr = feats.double().numpy()
    scale = arr.std(0)
    scale[scale == 0] = 1.0
    np.testing.assert_allclose(std.mean.numpy(), arr.mean(0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(std.scale.numpy(), scale, rtol=1e-12)
    assert std.scale[2] == 1.0 and std.scale[4] == 1.0
    z = std.apply(feats.double())
    assert (z[:, 2] == 0).all() and (z[:, 4] == 0).all()
    np.testing.assert_allclose(z.numpy(), (arr - arr.mean(0)) / scale, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(z.mean(0).numpy(), 0.0, atol=1e-12)
    assert std.apply(feats).dtype == torch.float32


# --------------------------------------------------------------------------- ExpSumObjective


def _naive_losses(params, feats, targets, signs, idx):
    """``mean_i (sum_r s_tr exp(b_tr + w_tr . feat_i) - y_it)^2`` task by task, term by term."""
    d = feats.shape[1]
    rank = signs.shape[1]
    out = []
    for k, t in enumerate(idx.tolist()):
        p = params[k].reshape(rank, d + 1)
        pred = torch.zeros(feats.shape[0], dtype=params.dtype)
        for r in range(rank):
            pred = pred + signs[t, r] * torch.exp(p[r, d] + (feats * p[r, :d]).sum(1))
        out.append(((pred - targets[:, t]) ** 2).mean())
    return torch.stack(out)


@given(
    st.integers(1, 4),
    st.integers(1, 3),
    st.integers(1, 5),
    st.integers(1, 8),
    st.integers(0, 10_000),
)
def test_objective_loss_and_gradient_match_autograd_of_the_definition(tasks, rank, d, n, seed):
    g = _gen(seed)
    feats = torch.randn(n, d, generator=g, dtype=F64)
    targets = 2.0 * torch.randn(n, tasks, generator=g, dtype=F64)
    signs = torch.where(torch.rand(tasks, rank, generator=g) < 0.5, -1.0, 1.0).to(F64)
    obj = ExpSumObjective(feats, targets, signs)
    # a random subset of the tasks, in random order
    perm = torch.randperm(tasks, generator=g)
    idx = perm[: int(torch.randint(1, tasks + 1, (1,), generator=g))]
    params = 0.5 * torch.randn(idx.shape[0], rank * (d + 1), generator=g, dtype=F64)

    loss, grad_of = obj(params, idx)
    p = params.clone().requires_grad_()
    naive = _naive_losses(p, feats, targets, signs, idx)
    assert loss.shape == (idx.shape[0],) and loss.dtype == F64
    assert torch.allclose(loss, naive.detach(), rtol=1e-12, atol=1e-14)
    (expect,) = torch.autograd.grad(naive.sum(), p)

    everything = torch.arange(idx.shape[0])
    assert torch.allclose(grad_of(everything), expect, rtol=1e-10, atol=1e-12)
    sel = everything[torch.rand(idx.shape[0], generator=g) < 0.5].flip(0)
    if sel.numel() == 0:
        sel = everything[-1:]
    got = grad_of(sel)
    assert got.shape == (sel.shape[0], rank * (d + 1))
    assert torch.allclose(got, expect[sel], rtol=1e-10, atol=1e-12)


def test_objective_gradient_of_an_empty_selection():
    obj = ExpSumObjective(
        torch.ones(4, 3, dtype=F64), torch.ones(4, 2, dtype=F64), -torch.ones(2, 2)
    )
    _, grad_of = obj(torch.zeros(2, 2 * 4, dtype=F64), torch.arange(2))
    assert grad_of(torch.arange(0)).shape == (0, 2 * 4)


def test_objective_rejects_mismatched_targets():
    feats = torch.zeros(5, 3, dtype=F64)
    signs = torch.ones(2, 1, dtype=F64)
    with pytest.raises(ValueError):
        ExpSumObjective(feats, torch.zeros(4, 2, dtype=F64), signs)
    with pytest.raises(ValueError):
        ExpSumObjective(feats, torch.zeros(5, dtype=F64), signs)


# --------------------------------------------------------------------------- predictor <-> CP


@given(
    st.integers(2, 6),
    st.integers(2, 4),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(0, 10_000),
)
def test_cp_factors_evaluate_to_the_predictor(order, levels, rank, tasks, seed):
    pred, g = _random_predictor(tasks, rank, order, levels, seed)
    if levels**order <= 1024:
        x = _all_inputs(order, levels)
    else:
        x = torch.randint(0, levels, (300, order), generator=g)
    vals = pred.values(x)
    assert vals.shape == (x.shape[0], tasks) and vals.dtype == F64
    # the predictor against its own definition
    feats = pred.standardization.apply(one_hot_features(x, levels, F64))
    terms = pred.signs * torch.exp(torch.einsum("nd,trd->ntr", feats, pred.weights) + pred.bias)
    assert torch.allclose(vals, terms.sum(2), rtol=1e-12, atol=1e-12)
    # raw_linear: the same log-terms on the raw one-hot features
    w, b = pred.raw_linear()
    assert w.dtype == F64 and w.shape == pred.weights.shape and b.shape == pred.bias.shape
    z_raw = torch.einsum("nd,trd->ntr", one_hot_features(x, levels, F64), w) + b
    assert torch.allclose(z_raw, pred.log_terms(x), rtol=1e-10, atol=1e-10)
    # cancelling signs: compare to the scale of the terms, not of their sum
    tol = 1e-9 * terms.abs().sum(2)
    for task in range(tasks):
        factors = pred.cp_factors(task)
        assert factors.shape == (order, levels, rank) and factors.dtype == F64
        ref = vals[:, task]
        assert ((cp_logdomain.values(factors, x) - ref).abs() <= tol[:, task]).all()
        assert ((cp_logdomain.plain_values(factors, x) - ref).abs() <= tol[:, task]).all()


def test_cp_factors_carry_the_signs_on_the_first_mode_and_balance_the_rest():
    pred, _ = _random_predictor(2, 3, 5, 3, seed=11)
    factors = pred.cp_factors(1)
    assert torch.equal(torch.sign(factors[0, 0]), pred.signs[1])
    assert (factors[1:] > 0).all()
    # level 0 is the reference: every mode carries b'/N there
    _, b = pred.raw_linear()
    assert torch.allclose(factors[1:, 0].log(), (b[1] / 5).expand(4, 3), rtol=1e-12)


def test_cp_factors_at_order_784_agree_in_the_log_domain():
    pred, g = _random_predictor(1, 2, 784, 2, seed=3, scale=1.0, n_train=64)
    x = torch.randint(0, 2, (40, 784), generator=g)
    factors = pred.cp_factors(0)
    assert torch.isfinite(factors).all()
    vals = pred.values(x)[:, 0]
    terms_abs = torch.exp(pred.log_terms(x)).abs().sum(2)[:, 0]
    got = cp_logdomain.values(factors, x)
    assert ((got - vals).abs() <= 1e-6 * terms_abs).all()
    # positive signs: the log-domain magnitude is the log of the value
    pos, _ = _random_predictor(1, 2, 784, 2, seed=4, scale=1.0, n_train=64, mixed_signs=False)
    la, sg = cp_logdomain.log_abs_values(pos.cp_factors(0), x)
    assert (sg == 1).all()
    assert torch.allclose(la, torch.log(pos.values(x)[:, 0]), rtol=1e-6, atol=1e-6)


def test_values_are_chunked_and_empty_inputs_give_no_rows():
    pred, g = _random_predictor(3, 2, 6, 3, seed=5)
    x = torch.randint(0, 3, (50, 6), generator=g)
    assert torch.allclose(pred.values(x, chunk=7), pred.values(x), rtol=1e-14, atol=1e-14)
    empty = pred.values(torch.zeros(0, 6, dtype=torch.long))
    assert empty.shape == (0, 3)
    assert pred.rank == 2


# --------------------------------------------------------------------------- fit_exp_sum


def _synthetic(n=2000, order=20, seed=0):
    """Binary inputs and two tasks, each generated by a known rank-2 positive exp-sum."""
    g = _gen(seed)
    x = torch.randint(0, 2, (n, order), generator=g)
    std = Standardization.of(one_hot_features(x, 2, F64))
    weights = 0.3 * torch.randn(2, 2, order, generator=g, dtype=F64)
    bias = torch.tensor([[0.0, -0.5], [0.5, -1.0]], dtype=F64)
    true = ExpSumPredictor(weights, bias, torch.ones(2, 2, dtype=F64), std, 2)
    return x, true.values(x)


def test_fit_recovers_a_rank_2_exp_sum():
    x, y = _synthetic()
    fit = fit_exp_sum(x, y, 2, iterations=300, dtype=F64)
    mse = ((fit.predictor.values(x) - y) ** 2).mean(0)
    assert (mse < 1e-3 * y.var(0)).all(), (mse, y.var(0))
    assert (fit.train_loss < 1e-3 * y.var(0)).all()
    assert fit.predictor.weights.shape == (2, 2, 20) and fit.predictor.bias.shape == (2, 2)
    assert fit.iterations <= 300 and fit.evaluations >= fit.iterations
    # float32 (the default) gets there too
    fit32 = fit_exp_sum(x, y, 2, iterations=300)
    assert fit32.predictor.weights.dtype == torch.float32
    assert (fit32.train_loss.double() < 1e-3 * y.var(0)).all()


def test_fit_train_loss_never_increases_and_matches_the_predictor():
    x, y = _synthetic(n=600, order=12, seed=1)
    seen: list[torch.Tensor] = []
    fit = fit_exp_sum(
        x, y, 3, iterations=40, dtype=F64, callback=lambda it, loss: seen.append(loss.clone())
    )
    losses = torch.stack(seen)
    assert losses.shape == (fit.iterations, 2)
    assert (losses[1:] <= losses[:-1]).all()
    assert torch.equal(losses[-1], fit.train_loss)
    recomputed = ((fit.predictor.values(x) - y) ** 2).mean(0)
    assert torch.allclose(fit.train_loss, recomputed, rtol=1e-9, atol=1e-15)
    # a short float32 fit, far from converged: still the loss of the returned predictor
    short = fit_exp_sum(x, y, 2, iterations=3)
    recomputed = ((short.predictor.values(x).double() - y) ** 2).mean(0)
    assert torch.allclose(short.train_loss.double(), recomputed, rtol=1e-4)


def test_fit_with_levels_signs_and_given_standardization():
    g = _gen(2)
    x = torch.randint(0, 3, (300, 5), generator=g)
    std = Standardization.of(one_hot_features(x, 3, F64))
    w = 0.4 * torch.randn(1, 1, 10, generator=g, dtype=F64)
    true = ExpSumPredictor(w, torch.zeros(1, 1, dtype=F64), -torch.ones(1, 1, dtype=F64), std, 3)
    y = true.values(x)[:, 0]  # negative targets, 1-D
    fit = fit_exp_sum(
        x, y, 1, levels=3, signs=-torch.ones(1, 1), standardization=std, iterations=200, dtype=F64
    )
    assert fit.predictor.standardization is std and fit.predictor.levels == 3
    assert torch.equal(fit.predictor.signs, -torch.ones(1, 1, dtype=F64))
    assert fit.train_loss.shape == (1,)
    assert fit.train_loss[0] < 1e-8 * y.var()
    assert torch.allclose(fit.predictor.values(x)[:, 0], y, rtol=1e-4, atol=1e-6)


def test_fit_rejects_bad_arguments():
    x = torch.randint(0, 2, (10, 4), generator=_gen(0))
    y = torch.rand(10, 2, generator=_gen(1))
    with pytest.raises(ValueError):
        fit_exp_sum(x, y, 0)
    with pytest.raises(ValueError):
        fit_exp_sum(x, y[:9], 1)
    with pytest.raises(ValueError):
        fit_exp_sum(x, y, 2, signs=torch.ones(2, 1))
    with pytest.raises(ValueError):
        fit_exp_sum(x + 2, y, 1)  # out of range for binary
