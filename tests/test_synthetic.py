"""Synthetic ground truths and observations (REFERENCE §1)."""

from __future__ import annotations

import math

import pytest
import torch

from implreg.problems.synthetic import (
    completion_problem,
    low_cp_rank_tensor,
    sample_indices,
    sensing_problem,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_ground_truth_norm_and_rank():
    t = low_cp_rank_tensor([4, 5, 6], 3, norm=2.5, generator=_gen())
    assert [f.shape for f in t.factors] == [(1, 4, 3), (1, 5, 3), (1, 6, 3)]
    assert t.dense().norm().item() == pytest.approx(2.5, rel=1e-12)
    assert t.norm() == pytest.approx(2.5, rel=1e-12)
    with pytest.raises(ValueError):
        low_cp_rank_tensor([4, 0], 3, norm=1.0, generator=_gen())
    with pytest.raises(ValueError):
        low_cp_rank_tensor([4, 4], 3, norm=-1.0, generator=_gen())


def test_sample_indices_distinct_in_range_reproducible():
    dims = [3, 4, 5]
    idx = sample_indices(dims, 50, generator=_gen(1))
    assert idx.shape == (50, 3)
    assert torch.unique(idx, dim=0).shape[0] == 50
    for n, d in enumerate(dims):
        assert int(idx[:, n].min()) >= 0 and int(idx[:, n].max()) < d
    assert torch.equal(idx, sample_indices(dims, 50, generator=_gen(1)))
    assert torch.unique(sample_indices(dims, 60, generator=_gen(2)), dim=0).shape[0] == 60
    with pytest.raises(ValueError, match="only 60 entries"):
        sample_indices(dims, 61, generator=_gen())
    with pytest.raises(ValueError, match="must be positive"):
        sample_indices(dims, 0, generator=_gen())


def test_sample_indices_for_a_tensor_never_built():
    idx = sample_indices([10] * 10, 20_000, generator=_gen(3))
    assert idx.shape == (20_000, 10)
    assert torch.unique(idx, dim=0).shape[0] == 20_000
    # roughly uniform over each mode
    counts = torch.bincount(idx[:, 4], minlength=10).double()
    assert (counts / counts.sum() - 0.1).abs().max() < 0.02


def test_completion_values_are_the_tensor_entries():
    t = low_cp_rank_tensor([4, 5, 3], 2, norm=1.0, generator=_gen())
    prob = completion_problem(t, 17, generator=_gen(5))
    dense = t.dense()
    assert torch.allclose(prob.y, dense[tuple(prob.idx.T)])
    assert prob.m == 17


def test_gaussian_sensing():
    t = low_cp_rank_tensor([4, 5, 6], 2, norm=1.0, generator=_gen())
    prob = sensing_problem(t, 400, kind="gaussian", generator=_gen(7))
    x = prob.measurements
    assert x.shape == (400, 120)
    assert torch.allclose(prob.y, x @ t.dense().reshape(-1))
    assert x.var().item() == pytest.approx(1 / 120, rel=0.05)


def test_rank_one_sensing():
    t = low_cp_rank_tensor([3, 4, 2], 2, norm=1.0, generator=_gen())
    prob = sensing_problem(t, 300, kind="rank_one", generator=_gen(8))
    dense = t.dense()
    for i in range(5):
        xi = torch.einsum("a,b,c->abc", *[v[i] for v in prob.vectors])
        assert prob.y[i].item() == pytest.approx((xi * dense).sum().item(), rel=1e-10)
    entries = torch.stack(
        [torch.einsum("a,b,c->abc", *[v[i] for v in prob.vectors]).reshape(-1) for i in range(300)]
    )
    assert entries.var().item() == pytest.approx(1 / 24, rel=0.15)
    with pytest.raises(ValueError, match="unknown measurement kind"):
        sensing_problem(t, 3, kind="binary", generator=_gen())
    assert math.prod(t.dims) == 24
