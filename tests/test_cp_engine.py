"""Fast analytic gradients of the CP objective against autograd, on random shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import cp_shapes, random_entries, random_factors
from hypothesis import given
from hypothesis import strategies as st

from implreg.factorizations.cp import cp_to_tensor
from implreg.factorizations.cp_engine import (
    DenseCompletion,
    DenseSensing,
    GatherCompletion,
    RankOneSensing,
    completion_engine,
    group_modes,
    linear_index,
)
from implreg.losses import HuberLoss, L2Loss

LOSSES = [L2Loss(), HuberLoss(1.5)]


def autograd_reference(f, predict, y, loss):
    params = [x.clone().requires_grad_() for x in f]
    pred = predict(params)
    val = loss.pointwise(pred - y)[0].mean(-1)
    val.sum().backward()
    return val.detach(), [p.grad for p in params], pred.detach()


@given(
    cp_shapes(),
    st.integers(1, 50),
    st.sampled_from([1, 2, 6, 1000]),
    st.sampled_from([1, 3, 4096]),
    st.sampled_from(LOSSES),
    st.integers(0, 10_000),
)
def test_completion_engines_match_autograd(shape, m, table_max, chunk, loss, seed):
    dims, rank, batch = shape
    f = random_factors(dims, rank, batch, seed)
    idx, lin = random_entries(dims, m, seed)
    y = torch.randn(
        idx.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )

    def predict(p):
        return cp_to_tensor(p).reshape(batch, -1)[:, lin]

    ref_loss, ref_grads, ref_pred = autograd_reference(f, predict, y, loss)
    for eng in (
        DenseCompletion(dims, idx, y),
        GatherCompletion(dims, idx, y, table_max=table_max, chunk=chunk),
    ):
        val, grads = eng.loss_and_grad(f, loss)
        assert torch.allclose(val, ref_loss)
        for a, b in zip(grads, ref_grads):
            assert torch.allclose(a, b)
        assert torch.allclose(eng.predict(f), ref_pred)


def test_huber_branches_are_both_used_in_the_engine_tests():
    """With the engine tests' scales, both branches of eq. (8) carry residuals."""
    f = random_factors([3, 4, 2], 3, 1, seed=0)
    pred = cp_to_tensor(f).reshape(-1)
    y = torch.randn(pred.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    frac = ((pred - y).abs() < LOSSES[1].delta).double().mean()
    assert 0.1 < frac < 0.9


def test_repeated_observations_count_twice():
    dims = [3, 3]
    f = random_factors(dims, 2, 1, seed=1)
    idx = torch.tensor([[0, 1], [0, 1], [2, 2]])
    y = torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    lin = linear_index(idx, dims)
    ref_loss, ref_grads, _ = autograd_reference(
        f, lambda p: cp_to_tensor(p).reshape(1, -1)[:, lin], y, L2Loss()
    )
    for eng in (DenseCompletion(dims, idx, y), GatherCompletion(dims, idx, y)):
        val, grads = eng.loss_and_grad(f, L2Loss())
        assert torch.allclose(val, ref_loss)
        assert all(torch.allclose(a, b) for a, b in zip(grads, ref_grads))


@given(
    cp_shapes(max_order=4, max_dim=4),
    st.integers(1, 30),
    st.sampled_from(LOSSES),
    st.integers(0, 10_000),
)
def test_dense_sensing_matches_autograd(shape, m, loss, seed):
    dims, rank, batch = shape
    f = random_factors(dims, rank, batch, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, math.prod(dims), dtype=torch.float64, generator=g)
    y = torch.randn(m, dtype=torch.float64, generator=g)
    ref_loss, ref_grads, ref_pred = autograd_reference(
        f, lambda p: cp_to_tensor(p).reshape(batch, -1) @ x.T, y, loss
    )
    eng = DenseSensing(dims, x, y)
    val, grads = eng.loss_and_grad(f, loss)
    assert torch.allclose(val, ref_loss)
    assert all(torch.allclose(a, b) for a, b in zip(grads, ref_grads))
    assert torch.allclose(eng.predict(f), ref_pred)


@given(
    cp_shapes(max_order=4, max_dim=4),
    st.integers(1, 30),
    st.sampled_from([1, 4, 4096]),
    st.sampled_from(LOSSES),
    st.integers(0, 10_000),
)
def test_rank_one_sensing_matches_explicit_measurements(shape, m, chunk, loss, seed):
    dims, rank, batch = shape
    f = random_factors(dims, rank, batch, seed)
    g = torch.Generator().manual_seed(seed)
    vecs = [torch.randn(m, d, dtype=torch.float64, generator=g) for d in dims]
    y = torch.randn(m, dtype=torch.float64, generator=g)
    x = vecs[0]
    for v in vecs[1:]:  # X_i = x_i^1 (x) ... (x) x_i^N, built explicitly
        x = (x.unsqueeze(2) * v.unsqueeze(1)).reshape(m, -1)
    ref_loss, ref_grads, ref_pred = autograd_reference(
        f, lambda p: cp_to_tensor(p).reshape(batch, -1) @ x.T, y, loss
    )
    eng = RankOneSensing(vecs, y, chunk=chunk)
    val, grads = eng.loss_and_grad(f, loss)
    assert torch.allclose(val, ref_loss)
    assert all(torch.allclose(a, b) for a, b in zip(grads, ref_grads))
    assert torch.allclose(eng.predict(f), ref_pred)


def test_completion_engine_dispatch():
    idx, _ = random_entries([10, 10, 10, 10], 2000, 0)
    y = torch.zeros(2000)
    assert isinstance(completion_engine([10] * 4, idx, y), DenseCompletion)
    big, _ = random_entries([10] * 7, 50, 0)
    assert isinstance(completion_engine([10] * 7, big, torch.zeros(50)), GatherCompletion)
    assert isinstance(completion_engine([10] * 4, idx, y, method="gather"), GatherCompletion)
    assert isinstance(completion_engine([10] * 4, idx, y, method="dense"), DenseCompletion)
    with pytest.raises(ValueError, match="unknown completion method"):
        completion_engine([10] * 4, idx, y, method="sparse")


@given(st.lists(st.integers(1, 6), min_size=1, max_size=5), st.integers(0, 1000))
def test_linear_index_is_ravel_multi_index(dims, seed):
    idx, _ = random_entries(dims, 10, seed)
    expect = np.ravel_multi_index(idx.numpy().T, dims)
    assert np.array_equal(linear_index(idx, dims).numpy(), expect)


@given(st.lists(st.integers(1, 12), min_size=1, max_size=8), st.integers(1, 200))
def test_group_modes_partitions_consecutive_modes(dims, table_max):
    groups = group_modes(dims, table_max)
    assert [n for g in groups for n in g] == list(range(len(dims)))
    for g in groups:
        size = math.prod(dims[n] for n in g)
        assert size <= table_max or len(g) == 1
    for a, b in zip(groups, groups[1:]):  # greedy: the next mode did not fit
        assert math.prod(dims[n] for n in a) * dims[b[0]] > table_max
