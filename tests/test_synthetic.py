"""Synthetic ground truths and observations (REFERENCE §1)."""

from __future__ import annotations

import math
import string
import time

import pytest
import torch

from implreg.problems.synthetic import (
    completion_problem,
    low_cp_rank_tensor,
    sample_indices,
    sensing_problem,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _outer(vectors: list[torch.Tensor]) -> torch.Tensor:
    letters = string.ascii_lowercase[: len(vectors)]
    return torch.einsum(",".join(letters) + "->" + letters, *vectors)


def _dense_slow(factors: list[torch.Tensor]) -> torch.Tensor:
    """``sum_r w_r^1 (x) ... (x) w_r^N`` of ``(1, d_n, R)`` factors, one outer product at a time."""
    rank = factors[0].shape[2]
    return sum(_outer([f[0, :, r] for f in factors]) for r in range(rank))


# ---------------------------------------------------------------- ground truth


@pytest.mark.parametrize(
    "dims, rank, norm", [([4, 5, 6], 3, 2.5), ([10, 10, 10, 10], 5, 1.0), ([7], 2, 0.3)]
)
def test_ground_truth_has_the_requested_norm_and_rank_sized_factors(dims, rank, norm):
    t = low_cp_rank_tensor(dims, rank, norm=norm, generator=_gen(1))
    assert [tuple(f.shape) for f in t.factors] == [(1, d, rank) for d in dims]
    assert all(f.dtype == torch.float64 for f in t.factors)
    assert t.dims == dims and t.size == math.prod(dims)
    dense = _dense_slow(t.factors)
    assert torch.allclose(t.dense(), dense, rtol=1e-12, atol=1e-15)
    assert dense.norm().item() == pytest.approx(norm, rel=1e-12)
    assert t.norm() == pytest.approx(norm, rel=1e-12)


def test_ground_truth_is_reproducible_and_validated():
    a = low_cp_rank_tensor([3, 4], 2, norm=1.0, generator=_gen(5))
    b = low_cp_rank_tensor([3, 4], 2, norm=1.0, generator=_gen(5))
    c = low_cp_rank_tensor([3, 4], 2, norm=1.0, generator=_gen(6))
    assert all(torch.equal(x, y) for x, y in zip(a.factors, b.factors))
    assert not torch.equal(a.factors[0], c.factors[0])
    f32 = low_cp_rank_tensor([3, 4], 2, norm=1.0, generator=_gen(5), dtype=torch.float32)
    assert f32.factors[0].dtype == torch.float32
    for kwargs in (
        dict(dims=[4, 0], rank=3, norm=1.0),
        dict(dims=[4, 4], rank=0, norm=1.0),
        dict(dims=[4, 4], rank=3, norm=-1.0),
        dict(dims=[4, 4], rank=3, norm=0.0),
        dict(dims=[4, 4], rank=3, norm=math.inf),
    ):
        with pytest.raises(ValueError):
            low_cp_rank_tensor(
                kwargs["dims"], kwargs["rank"], norm=kwargs["norm"], generator=_gen()
            )


# ---------------------------------------------------------------- sample_indices


def _assert_distinct_in_range(idx, dims, m):
    assert idx.shape == (m, len(dims)) and idx.dtype == torch.int64
    assert torch.unique(idx, dim=0).shape[0] == m
    for n, d in enumerate(dims):
        assert int(idx[:, n].min()) >= 0 and int(idx[:, n].max()) < d


@pytest.mark.parametrize("dims, m", [([3, 4, 5], 50), ([3, 4, 5], 60), ([7], 1), ([2, 1, 2], 4)])
def test_sample_indices_distinct_in_range_reproducible(dims, m):
    idx = sample_indices(dims, m, generator=_gen(1))
    _assert_distinct_in_range(idx, dims, m)
    assert torch.equal(idx, sample_indices(dims, m, generator=_gen(1)))


def test_sample_indices_differ_across_seeds_and_cover_the_tensor():
    a = sample_indices([3, 4, 5], 20, generator=_gen(1))
    b = sample_indices([3, 4, 5], 20, generator=_gen(2))
    assert not torch.equal(a, b)
    full = sample_indices([3, 4, 5], 60, generator=_gen(3))  # m = #entries: every tuple once
    lin = full[:, 0] * 20 + full[:, 1] * 5 + full[:, 2]
    assert sorted(lin.tolist()) == list(range(60))


@pytest.mark.parametrize("m", [0, -1])
def test_sample_indices_refuses_non_positive_m(m):
    with pytest.raises(ValueError, match="must be positive"):
        sample_indices([3, 4, 5], m, generator=_gen())


def test_sample_indices_refuses_more_than_the_number_of_entries():
    with pytest.raises(ValueError, match="only 60 entries"):
        sample_indices([3, 4, 5], 61, generator=_gen())


def test_sample_indices_for_a_tensor_never_built(monkeypatch):
    """Order 10, modes of 10: 10^10 entries, sampled without a permutation of them all."""
    dims, m = [10] * 10, 20_000

    def no_permutation(*args, **kwargs):
        raise AssertionError("sample_indices must not permute 10^10 entries")

    monkeypatch.setattr(torch, "randperm", no_permutation)
    start = time.perf_counter()
    idx = sample_indices(dims, m, generator=_gen(3))
    assert time.perf_counter() - start < 10.0
    _assert_distinct_in_range(idx, dims, m)
    assert torch.equal(idx, sample_indices(dims, m, generator=_gen(3)))
    assert not torch.equal(idx, sample_indices(dims, m, generator=_gen(4)))
    # roughly uniform over each mode: 2000 expected per value, sd about 42
    for n in (0, 4, 9):
        counts = torch.bincount(idx[:, n], minlength=10).double()
        assert (counts - m / 10).abs().max() < 6 * math.sqrt(m * 0.1 * 0.9)
    with pytest.raises(ValueError, match="must be positive"):
        sample_indices(dims, 0, generator=_gen())


def test_sample_indices_large_tensor_drops_repeated_draws():
    """Just above the permutation limit (4097^2 > 2^24 entries) with m large enough that
    independent draws repeat (about m^2 / 2N = 1200 repeats): the result is still distinct."""
    dims, m = [4097, 4097], 200_000
    idx = sample_indices(dims, m, generator=_gen(6))
    _assert_distinct_in_range(idx, dims, m)
    assert torch.equal(idx, sample_indices(dims, m, generator=_gen(6)))


# ---------------------------------------------------------------- problems


def test_completion_values_are_the_tensor_entries():
    t = low_cp_rank_tensor([4, 5, 3], 2, norm=1.0, generator=_gen())
    prob = completion_problem(t, 17, generator=_gen(5))
    dense = _dense_slow(t.factors)
    assert prob.m == 17 and prob.idx.shape == (17, 3)
    assert torch.unique(prob.idx, dim=0).shape[0] == 17
    for row, value in zip(prob.idx.tolist(), prob.y.tolist()):
        assert value == pytest.approx(float(dense[tuple(row)]), rel=1e-12, abs=1e-15)
    again = completion_problem(t, 17, generator=_gen(5))
    assert torch.equal(prob.idx, again.idx) and torch.equal(prob.y, again.y)


def test_completion_problem_refuses_too_many_observations():
    t = low_cp_rank_tensor([2, 3], 1, norm=1.0, generator=_gen())
    with pytest.raises(ValueError):
        completion_problem(t, 7, generator=_gen())


def test_gaussian_sensing():
    t = low_cp_rank_tensor([4, 5, 6], 2, norm=1.0, generator=_gen())
    prob = sensing_problem(t, 400, kind="gaussian", generator=_gen(7))
    x = prob.measurements
    assert prob.kind == "gaussian" and prob.m == 400 and prob.vectors is None
    assert x.shape == (400, 120) and x.dtype == torch.float64
    vec = _dense_slow(t.factors).reshape(-1)
    assert torch.allclose(prob.y, x @ vec, rtol=1e-12, atol=1e-14)
    for i in range(3):
        assert prob.y[i].item() == pytest.approx(sum(a * b for a, b in zip(x[i], vec)).item())
    # 48000 entries: variance 1/120 within 5 standard errors, mean about 0
    n = x.numel()
    assert x.var().item() == pytest.approx(1 / 120, rel=5 * math.sqrt(2 / n))
    assert abs(x.mean().item()) < 5 * math.sqrt(1 / 120 / n)


@pytest.mark.parametrize("dims", [[3, 4, 2], [5, 3], [2, 3, 2, 2]])
def test_rank_one_sensing(dims):
    t = low_cp_rank_tensor(dims, 2, norm=1.0, generator=_gen())
    m = 2000
    prob = sensing_problem(t, m, kind="rank_one", generator=_gen(8))
    assert prob.kind == "rank_one" and prob.m == m and prob.measurements is None
    assert [tuple(v.shape) for v in prob.vectors] == [(m, d) for d in dims]
    dense = _dense_slow(t.factors)
    xs = torch.stack([_outer([v[i] for v in prob.vectors]) for i in range(m)])  # X_i explicit
    expect = (xs * dense).reshape(m, -1).sum(1)
    assert torch.allclose(prob.y, expect, rtol=1e-10, atol=1e-14)
    # each entry of X_i has variance 1/#entries (a product of independent N(0, 1/d_n)):
    # ||X_i||^2 = prod_n ||x_i^n||^2 has mean 1 and variance prod_n (1 + 2/d_n) - 1
    size = math.prod(dims)
    rel_sd = math.sqrt((math.prod(1 + 2 / d for d in dims) - 1) / m)
    assert xs.reshape(-1).pow(2).mean().item() == pytest.approx(1 / size, rel=5 * rel_sd)


def test_sensing_errors():
    t = low_cp_rank_tensor([3, 2], 1, norm=1.0, generator=_gen())
    with pytest.raises(ValueError, match="unknown measurement kind"):
        sensing_problem(t, 3, kind="binary", generator=_gen())
    for kind in ("gaussian", "rank_one"):
        with pytest.raises(ValueError, match="must be positive"):
            sensing_problem(t, 0, kind=kind, generator=_gen())
