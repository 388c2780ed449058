"""CP model functions against their definitions (paper eq. 3, Definition 1, Theorem 1)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import cp_shapes, dense_by_definition, random_entries, random_factors
from hypothesis import given
from hypothesis import strategies as st

from implreg.factorizations.cp import (
    balanced_split,
    cp_component_norms,
    cp_frobenius_norm,
    cp_gammas,
    cp_gammas_sparse,
    cp_init,
    cp_to_tensor,
    cp_unbalancedness,
    cp_values,
    khatri_rao,
    khatri_rao_backward,
)


@given(cp_shapes(), st.integers(0, 10_000))
def test_end_tensor_matches_outer_products(shape, seed):
    dims, rank, batch = shape
    f = random_factors(dims, rank, batch, seed)
    assert torch.allclose(cp_to_tensor(f), dense_by_definition(f))


@given(cp_shapes(max_order=4), st.integers(0, 10_000))
def test_khatri_rao_definition(shape, seed):
    dims, rank, batch = shape
    f = random_factors(dims, rank, batch, seed)
    kr = khatri_rao(f)
    assert kr.shape == (batch, math.prod(dims), rank)
    for row, tup in enumerate(itertools.product(*[range(d) for d in dims])):
        expect = torch.ones(batch, rank, dtype=torch.float64)
        for n, i in enumerate(tup):
            expect = expect * f[n][:, i, :]
        assert torch.allclose(kr[:, row, :], expect)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_khatri_rao_backward_matches_autograd(k):
    f = [x.requires_grad_() for x in random_factors([3, 2, 4, 2][:k], 3, 2, seed=k)]
    g = torch.randn(2, math.prod([3, 2, 4, 2][:k]), 3, dtype=torch.float64)
    (khatri_rao(f) * g).sum().backward()
    analytic = khatri_rao_backward([x.detach() for x in f], g)
    for a, x in zip(analytic, f):
        assert torch.allclose(a, x.grad)


@given(cp_shapes(), st.integers(1, 40), st.integers(1, 7), st.integers(0, 10_000))
def test_values_at_indices_match_the_end_tensor(shape, m, chunk, seed):
    dims, rank, batch = shape
    f = random_factors(dims, rank, batch, seed)
    idx, lin = random_entries(dims, m, seed)
    expect = cp_to_tensor(f).reshape(batch, -1)[:, lin]
    assert torch.allclose(cp_values(f, idx, chunk=chunk), expect)


@given(cp_shapes(), st.integers(0, 10_000))
def test_component_norms_are_frobenius_norms_of_rank_one_terms(shape, seed):
    dims, rank, batch = shape
    f = random_factors(dims, rank, batch, seed)
    norms = cp_component_norms(f)
    for r in range(rank):
        single = [x[:, :, r : r + 1] for x in f]
        dense = dense_by_definition(single).reshape(batch, -1)
        assert torch.allclose(norms[:, r], dense.norm(dim=1))


@given(cp_shapes(min_order=2), st.integers(0, 10_000))
def test_unbalancedness_is_definition_1(shape, seed):
    dims, rank, batch = shape
    f = random_factors(dims, rank, batch, seed)
    got = cp_unbalancedness(f)
    for b in range(batch):
        best = 0.0
        for r in range(rank):
            for n1 in range(len(dims)):
                for n2 in range(len(dims)):
                    a = float(f[n1][b, :, r].norm() ** 2)
                    c = float(f[n2][b, :, r].norm() ** 2)
                    best = max(best, abs(a - c))
        assert got[b].item() == pytest.approx(best, rel=1e-12, abs=1e-12)


@given(cp_shapes(), st.integers(0, 10_000))
def test_frobenius_norm_without_building_the_tensor(shape, seed):
    dims, rank, batch = shape
    f = random_factors(dims, rank, batch, seed)
    dense = cp_to_tensor(f).reshape(batch, -1).norm(dim=1)
    assert torch.allclose(cp_frobenius_norm(f), dense)


@given(cp_shapes(min_order=2, max_order=4), st.integers(0, 10_000))
def test_gammas_match_definition_and_sparse_form(shape, seed):
    dims, rank, batch = shape
    f = random_factors(dims, rank, batch, seed)
    idx, lin = random_entries(dims, 7, seed)
    vals = torch.randn(batch, idx.shape[0], dtype=torch.float64)
    grad_end = torch.zeros(batch, math.prod(dims), dtype=torch.float64)
    grad_end[:, lin] = vals
    grad_end = grad_end.reshape(batch, *dims)
    gam = cp_gammas(f, grad_end)
    for r in range(rank):
        unit = [x[:, :, r : r + 1] / x[:, :, r : r + 1].norm(dim=1, keepdim=True) for x in f]
        comp = dense_by_definition(unit)
        expect = -(grad_end * comp).reshape(batch, -1).sum(1)
        assert torch.allclose(gam[:, r], expect)
    assert torch.allclose(cp_gammas_sparse(f, idx, vals), gam)


def test_theorem_1_norm_velocity_identity():
    """d/dt ||component_r|| = gamma_r * sum_n prod_{n' != n} ||w_r^{n'}||^2 (proof of Thm. 1)."""
    dims, rank = [3, 4, 2], 4
    f = random_factors(dims, rank, 1, seed=5)
    target = torch.randn(1, *dims, dtype=torch.float64)
    params = [x.clone().requires_grad_() for x in f]
    loss = 0.5 * ((cp_to_tensor(params) - target) ** 2).sum()
    loss.backward()
    grad_end = (cp_to_tensor(f) - target).detach()
    gam = cp_gammas(f, grad_end)[0]
    sq = torch.stack([x[0].norm(dim=0) ** 2 for x in f])  # (N, R)
    predicted = gam * sum(torch.prod(torch.cat([sq[:n], sq[n + 1 :]]), 0) for n in range(3))
    lr = 1e-7
    stepped = [x - lr * p.grad for x, p in zip(f, params)]
    measured = (cp_component_norms(stepped) - cp_component_norms(f))[0] / lr
    assert torch.allclose(measured, predicted, rtol=1e-4, atol=1e-8)


def test_unbalancedness_is_conserved_by_small_steps():
    """Lemma 1: gradient flow conserves ||w_r^n||^2 - ||w_r^n'||^2."""
    dims = [3, 3, 3]
    f = [x * 0.5 for x in random_factors(dims, 3, 1, seed=2)]
    target = cp_to_tensor(random_factors(dims, 1, 1, seed=3))
    start_unb = cp_unbalancedness(f)
    start_norms = cp_component_norms(f)
    for _ in range(2000):
        params = [x.clone().requires_grad_() for x in f]
        (0.5 * ((cp_to_tensor(params) - target) ** 2).sum()).backward()
        f = [x - 2e-3 * p.grad for x, p in zip(f, params)]
    drift = (cp_unbalancedness(f) - start_unb).abs().item()
    moved = (cp_component_norms(f) - start_norms).abs().max().item()
    assert moved > 0.1
    assert drift < 1e-3 * moved


@given(st.lists(st.integers(1, 12), min_size=1, max_size=6))
def test_balanced_split_is_the_most_balanced(dims):
    k = balanced_split(dims)
    total = math.log(math.prod(dims))

    def cost(j):
        return abs(math.log(math.prod(dims[:j])) - total / 2)

    if len(dims) == 1:
        assert k == 1
    else:
        assert 1 <= k < len(dims)
        assert cost(k) <= min(cost(j) for j in range(1, len(dims))) + 1e-12


def test_init_shares_one_draw_scaled_per_std_and_validates():
    f = cp_init([3, 4], 5, stds=[0.1, 0.01], mean=0.5, generator=torch.Generator().manual_seed(0))
    assert f[0].shape == (2, 3, 5) and f[1].shape == (2, 4, 5)
    for x in f:
        assert torch.allclose((x[0] - 0.5) / 0.1, (x[1] - 0.5) / 0.01, atol=1e-5)
    again = cp_init(
        [3, 4], 5, stds=[0.1, 0.01], mean=0.5, generator=torch.Generator().manual_seed(0)
    )
    assert all(torch.equal(a, b) for a, b in zip(f, again))
    with pytest.raises(ValueError, match="positive"):
        cp_init([3, 0], 5, stds=[0.1], generator=torch.Generator())
    with pytest.raises(ValueError, match="positive"):
        cp_init([3, 3], 0, stds=[0.1], generator=torch.Generator())
