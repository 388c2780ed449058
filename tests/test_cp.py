"""CP model functions against their definitions (paper eq. 3, Definition 1, Lemma 1, Theorem 1)."""

from __future__ import annotations

import itertools
import math
import string

import pytest
import torch
from conftest import cp_shapes, random_entries, random_factors
from hypothesis import given, settings
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
from implreg.factorizations.cp_engine import DenseCompletion, linear_index
from implreg.losses import L2Loss


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def outer(vectors: list[torch.Tensor]) -> torch.Tensor:
    """``v_1 (x) ... (x) v_N`` with ``torch.einsum``: shape ``(d_1, ..., d_N)``."""
    letters = string.ascii_lowercase[: len(vectors)]
    return torch.einsum(",".join(letters) + "->" + letters, *vectors)


def end_tensor_slow(factors: list[torch.Tensor]) -> torch.Tensor:
    """``sum_r w_r^1 (x) ... (x) w_r^N`` for each batch entry, one outer product at a time."""
    batch, _, rank = factors[0].shape
    dims = [f.shape[1] for f in factors]
    out = torch.zeros(batch, *dims, dtype=factors[0].dtype)
    for b in range(batch):
        for r in range(rank):
            out[b] += outer([f[b, :, r] for f in factors])
    return out


def sq_norms(factors: list[torch.Tensor]) -> torch.Tensor:
    """``||w_r^n||^2`` as an ``(N, B, R)`` tensor."""
    return torch.stack([(f * f).sum(1) for f in factors])


# ---------------------------------------------------------------- end tensor, Khatri-Rao


@pytest.mark.parametrize(
    "dims, rank, batch",
    [
        ([5], 3, 1),
        ([4], 2, 3),
        ([3, 4], 2, 1),
        ([3, 4], 5, 3),
        ([2, 3, 4], 3, 2),
        ([1, 3, 1], 2, 2),
        ([2, 3, 2, 1, 3], 4, 3),
        ([2, 2, 2, 2, 2], 1, 2),
    ],
)
def test_end_tensor_matches_sum_of_outer_products(dims, rank, batch):
    f = random_factors(dims, rank, batch, seed=sum(dims) + rank)
    got = cp_to_tensor(f)
    assert got.shape == (batch, *dims)
    assert torch.allclose(got, end_tensor_slow(f), rtol=1e-12, atol=1e-12)


@given(cp_shapes(min_order=1, max_order=5), st.integers(0, 10_000))
def test_end_tensor_matches_sum_of_outer_products_random(shape, seed):
    dims, rank, batch = shape
    f = random_factors(dims, rank, batch, seed)
    assert torch.allclose(cp_to_tensor(f), end_tensor_slow(f), rtol=1e-12, atol=1e-12)


def test_end_tensor_is_row_major_and_entry_explicit():
    f = random_factors([2, 3, 2], 2, 1, seed=0)
    w = cp_to_tensor(f)[0]
    for i, j, k in itertools.product(range(2), range(3), range(2)):
        expect = sum(float(f[0][0, i, r] * f[1][0, j, r] * f[2][0, k, r]) for r in range(2))
        assert float(w[i, j, k]) == pytest.approx(expect, rel=1e-12, abs=1e-14)


@given(cp_shapes(min_order=1, max_order=4), st.integers(0, 10_000))
def test_khatri_rao_definition(shape, seed):
    dims, rank, batch = shape
    f = random_factors(dims, rank, batch, seed)
    kr = khatri_rao(f)
    assert kr.shape == (batch, math.prod(dims), rank)
    for row, tup in enumerate(itertools.product(*[range(d) for d in dims])):
        expect = torch.ones(batch, rank, dtype=torch.float64)
        for n, i in enumerate(tup):
            expect = expect * f[n][:, i, :]
        assert torch.allclose(kr[:, row, :], expect, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_khatri_rao_backward_matches_autograd(k, seed):
    g = _gen(seed)
    dims = [3, 2, 4, 2][:k] if seed == 0 else [1, 5, 2, 3][:k]
    f = [torch.randn(2, d, 3, dtype=torch.float64, generator=g).requires_grad_() for d in dims]
    upstream = torch.randn(2, math.prod(dims), 3, dtype=torch.float64, generator=g)
    (khatri_rao(f) * upstream).sum().backward()
    analytic = khatri_rao_backward([x.detach() for x in f], upstream)
    assert len(analytic) == k
    for a, x in zip(analytic, f):
        assert a.shape == x.shape
        assert torch.allclose(a, x.grad, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- values at indices


@settings(max_examples=100)
@given(cp_shapes(), st.integers(1, 40), st.integers(1, 7), st.integers(0, 10_000))
def test_values_at_indices_match_the_end_tensor(shape, m, chunk, seed):
    dims, rank, batch = shape
    f = random_factors(dims, rank, batch, seed)
    idx, lin = random_entries(dims, m, seed)
    expect = end_tensor_slow(f).reshape(batch, -1)[:, lin]
    assert torch.allclose(cp_values(f, idx, chunk=chunk), expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 5, 11, 12, 13, 24, 100])
def test_values_across_chunk_boundaries(chunk):
    dims = [3, 2, 4]
    f = random_factors(dims, 3, 2, seed=4)
    idx, lin = random_entries(dims, 24, seed=4)  # 24 = every entry; chunk 12 splits evenly
    expect = end_tensor_slow(f).reshape(2, -1)[:, lin]
    got = cp_values(f, idx, chunk=chunk)
    assert got.shape == (2, 24)
    assert torch.allclose(got, expect, rtol=1e-12, atol=1e-12)


def test_values_with_no_indices_and_bad_index_shape():
    f = random_factors([3, 2], 2, 3, seed=0)
    assert cp_values(f, torch.zeros(0, 2, dtype=torch.long)).shape == (3, 0)
    with pytest.raises(ValueError):
        cp_values(f, torch.zeros(4, 3, dtype=torch.long))


# ---------------------------------------------------------------- norms, Definition 1


@given(cp_shapes(), st.integers(0, 10_000))
def test_component_norms_are_frobenius_norms_of_rank_one_terms(shape, seed):
    dims, rank, batch = shape
    f = random_factors(dims, rank, batch, seed)
    norms = cp_component_norms(f)
    assert norms.shape == (batch, rank)
    for b in range(batch):
        for r in range(rank):
            comp = outer([x[b, :, r] for x in f])
            assert float(norms[b, r]) == pytest.approx(float(comp.norm()), rel=1e-12)


def _definition_1(f, b):
    best = 0.0
    rank = f[0].shape[2]
    for r in range(rank):
        for n1 in range(len(f)):
            for n2 in range(len(f)):
                a = sum(float(v) ** 2 for v in f[n1][b, :, r])
                c = sum(float(v) ** 2 for v in f[n2][b, :, r])
                best = max(best, abs(a - c))
    return best


@given(cp_shapes(min_order=1), st.integers(0, 10_000))
def test_unbalancedness_is_definition_1(shape, seed):
    dims, rank, batch = shape
    f = random_factors(dims, rank, batch, seed)
    # different scales per mode so that the maximizing pair is not always the same
    f = [x * (1 + n) / len(dims) for n, x in enumerate(f)]
    got = cp_unbalancedness(f)
    assert got.shape == (batch,)
    for b in range(batch):
        assert float(got[b]) == pytest.approx(_definition_1(f, b), rel=1e-12, abs=1e-12)


def test_unbalancedness_examples():
    # one component, modes with ||w||^2 = 1, 4, 9: max difference 8
    f = [torch.tensor([[[1.0]]]), torch.tensor([[[0.0], [2.0]]]), torch.tensor([[[3.0]]])]
    assert cp_unbalancedness([x.double() for x in f]).tolist() == [8.0]
    balanced = [torch.full((1, 4, 2), 0.5, dtype=torch.float64) for _ in range(3)]
    assert cp_unbalancedness(balanced).tolist() == [0.0]


@given(cp_shapes(), st.integers(0, 10_000))
def test_frobenius_norm_without_building_the_tensor(shape, seed):
    dims, rank, batch = shape
    f = random_factors(dims, rank, batch, seed)
    dense = end_tensor_slow(f).reshape(batch, -1).norm(dim=1)
    assert torch.allclose(cp_frobenius_norm(f), dense, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- gamma (Theorem 1)


def _gammas_by_definition(f, grad_end):
    """``<-grad, (x)_n w_r^n / ||w_r^n||>`` with the unit rank-one tensor built explicitly."""
    batch, _, rank = f[0].shape
    out = torch.zeros(batch, rank, dtype=torch.float64)
    for b in range(batch):
        for r in range(rank):
            unit = outer([x[b, :, r] / x[b, :, r].norm() for x in f])
            out[b, r] = -(grad_end[b] * unit).sum()
    return out


@settings(max_examples=100)
@given(cp_shapes(min_order=1, max_order=4), st.integers(1, 12), st.integers(0, 10_000))
def test_gammas_match_definition_and_sparse_form(shape, m, seed):
    dims, rank, batch = shape
    f = random_factors(dims, rank, batch, seed)
    idx, lin = random_entries(dims, m, seed)
    vals = torch.randn(batch, idx.shape[0], dtype=torch.float64, generator=_gen(seed + 1))
    grad_end = torch.zeros(batch, math.prod(dims), dtype=torch.float64)
    grad_end[:, lin] = vals  # a gradient supported on the observed entries
    grad_end = grad_end.reshape(batch, *dims)
    gam = cp_gammas(f, grad_end)
    assert gam.shape == (batch, rank)
    assert torch.allclose(gam, _gammas_by_definition(f, grad_end), rtol=1e-10, atol=1e-12)
    assert torch.allclose(cp_gammas_sparse(f, idx, vals), gam, rtol=1e-10, atol=1e-12)


def test_gamma_of_a_component_with_a_zero_factor_is_zero():
    f = random_factors([3, 4], 3, 1, seed=2)
    f[1][0, :, 1] = 0.0
    grad_end = torch.randn(1, 3, 4, dtype=torch.float64, generator=_gen(2))
    gam = cp_gammas(f, grad_end)
    assert torch.isfinite(gam).all() and gam[0, 1] == 0.0
    assert gam[0, 0] != 0.0 and gam[0, 2] != 0.0
    idx, lin = random_entries([3, 4], 12, seed=2)
    sparse = cp_gammas_sparse(f, idx, grad_end.reshape(1, -1)[:, lin])
    assert torch.allclose(sparse, gam, rtol=1e-10, atol=1e-12)


def _l2_problem(dims, rank, batch, m, seed):
    f = random_factors(dims, rank, batch, seed)
    idx, _ = random_entries(dims, m, seed)
    y = torch.randn(idx.shape[0], dtype=torch.float64, generator=_gen(seed + 7))
    return f, idx, y


def _sum_of_products_of_other_sq_norms(f):
    sq = sq_norms(f)  # (N, B, R)
    n_modes = sq.shape[0]
    return sum(
        torch.prod(torch.cat([sq[:n], sq[n + 1 :]]), 0) if n_modes > 1 else torch.ones_like(sq[0])
        for n in range(n_modes)
    )


@pytest.mark.parametrize("dims", [[5], [3, 4], [3, 4, 2], [2, 3, 2, 3]])
def test_theorem_1_norm_velocity_identity(dims):
    """One tiny GD step on the L2 loss changes ||component_r|| by
    ``lr * gamma_r * sum_n prod_{n' != n} ||w_r^{n'}||^2`` to first order (proof of Thm. 1)."""
    batch, rank = 2, 4
    f, idx, y = _l2_problem(dims, rank, batch, m=min(20, math.prod(dims)), seed=len(dims))
    eng = DenseCompletion(dims, idx, y)
    _, grads = eng.loss_and_grad(f, L2Loss())
    # gradient of the loss w.r.t. the end tensor: 2 (pred - y) / m at the observed entries
    dvals = 2.0 * (cp_values(f, idx) - y) / idx.shape[0]
    grad_end = torch.zeros(batch, math.prod(dims), dtype=torch.float64)
    grad_end[:, linear_index(idx, dims)] = dvals
    gam = cp_gammas(f, grad_end.reshape(batch, *dims))
    assert torch.allclose(cp_gammas_sparse(f, idx, dvals), gam, rtol=1e-10, atol=1e-12)
    velocity = gam * _sum_of_products_of_other_sq_norms(f)

    lr = 1e-7
    stepped = [x - lr * g for x, g in zip(f, grads)]
    measured = (cp_component_norms(stepped) - cp_component_norms(f)) / lr
    assert velocity.abs().min() > 1e-3  # a non-degenerate check
    assert torch.allclose(measured, velocity, rtol=1e-4, atol=0)
    # the sign of the change is the sign of gamma: negating gamma would fail
    assert torch.equal(measured.sign(), gam.sign())


def test_lemma_1_unbalancedness_is_conserved_by_small_steps():
    """Lemma 1: gradient flow conserves ||w_r^n||^2 - ||w_r^n'||^2 for every r, n, n'."""
    dims, rank = [3, 4, 3], 3
    f, idx, _ = _l2_problem(dims, rank, 2, m=25, seed=9)
    f = [x * 0.6 for x in f]
    truth = random_factors(dims, 1, 1, seed=10)
    y = cp_values([3.0 * x for x in truth], idx)[0]
    eng = DenseCompletion(dims, idx, y)
    start_sq = sq_norms(f)
    start_pairs = start_sq.unsqueeze(0) - start_sq.unsqueeze(1)  # (N, N, B, R)
    start_unb = cp_unbalancedness(f)
    for _ in range(1500):
        _, grads = eng.loss_and_grad(f, L2Loss())
        f = [x - 1e-3 * g for x, g in zip(f, grads)]
    end_sq = sq_norms(f)
    pairs = end_sq.unsqueeze(0) - end_sq.unsqueeze(1)
    moved = (end_sq - start_sq).abs().max().item()
    drift = (pairs - start_pairs).abs().max().item()
    assert moved > 0.5  # the squared norms themselves changed a lot
    assert drift < 1e-2 * moved
    assert (cp_unbalancedness(f) - start_unb).abs().max().item() < 1e-2 * moved


# ---------------------------------------------------------------- split, init


def _imbalance(dims, k):
    return max(math.prod(dims[:k]), math.prod(dims[k:]))


@given(st.lists(st.integers(1, 12), min_size=1, max_size=7))
def test_balanced_split_is_the_most_balanced(dims):
    k = balanced_split(dims)
    if len(dims) == 1:
        assert k == 1
        return
    assert 1 <= k < len(dims)
    # the larger half is as small as with any other split (integers: no rounding)
    assert _imbalance(dims, k) == min(_imbalance(dims, j) for j in range(1, len(dims)))


@pytest.mark.parametrize(
    "dims, k", [([10, 10, 10, 10], 2), ([2, 50], 1), ([50, 2, 2], 1), ([2, 2, 50], 2), ([7], 1)]
)
def test_balanced_split_examples(dims, k):
    assert balanced_split(dims) == k


def test_init_shares_one_draw_scaled_per_std():
    stds, mean = [0.1, 0.01, 2.0], 0.5
    f = cp_init([3, 4, 2], 5, stds=stds, mean=mean, generator=_gen(0), dtype=torch.float64)
    assert [tuple(x.shape) for x in f] == [(3, 3, 5), (3, 4, 5), (3, 2, 5)]
    assert all(x.dtype == torch.float64 for x in f)
    for x in f:
        z = [(x[b] - mean) / s for b, s in enumerate(stds)]
        assert torch.allclose(z[0], z[1], rtol=1e-10, atol=1e-12)
        assert torch.allclose(z[0], z[2], rtol=1e-10, atol=1e-12)
    # the shared draw is standard normal
    big = cp_init([400, 300], 10, stds=[1.0], generator=_gen(1), dtype=torch.float64)
    pooled = torch.cat([x.reshape(-1) for x in big])  # 7000 draws: 5 standard errors
    assert abs(pooled.mean().item()) < 5 / math.sqrt(7000)
    assert abs(pooled.std().item() - 1.0) < 5 / math.sqrt(2 * 7000)
    # reproducible with the same seed, different with another
    again = cp_init([3, 4, 2], 5, stds=stds, mean=mean, generator=_gen(0), dtype=torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(f, again))
    other = cp_init([3, 4, 2], 5, stds=stds, mean=mean, generator=_gen(1), dtype=torch.float64)
    assert not torch.equal(f[0], other[0])
    # default dtype
    assert cp_init([2], 1, stds=[1.0], generator=_gen(0))[0].dtype == torch.float32


@pytest.mark.parametrize("dims, rank", [([3, 0], 5), ([3, -2], 5), ([3, 3], 0), ([3, 3], -1)])
def test_init_rejects_non_positive_dims_and_rank(dims, rank):
    with pytest.raises(ValueError, match="positive"):
        cp_init(dims, rank, stds=[0.1], generator=_gen(0))
