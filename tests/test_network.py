"""The network view (paper Figure 2) computes the CP model: same outputs, same gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import cp_shapes, random_entries, random_factors
from hypothesis import given
from hypothesis import strategies as st

from implreg.factorizations.cp import cp_values
from implreg.factorizations.cp_engine import DenseCompletion, GatherCompletion
from implreg.factorizations.network import CPNetwork
from implreg.losses import L2Loss


@given(cp_shapes(), st.integers(1, 30), st.integers(0, 10_000))
def test_network_equals_cp_model(shape, m, seed):
    dims, rank, _ = shape
    f = random_factors(dims, rank, 1, seed)
    net = CPNetwork.from_factors(f)
    idx, _ = random_entries(dims, m, seed)
    out = net(idx)
    assert torch.allclose(out, cp_values(f, idx)[0])
    assert torch.allclose(net(net.one_hot(idx)), out)
    assert all(torch.equal(a, b) for a, b in zip(net.to_factors(), f))

    y = torch.randn(idx.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ((net(idx) - y) ** 2).mean().backward()
    for eng in (DenseCompletion(dims, idx, y), GatherCompletion(dims, idx, y, table_max=3)):
        _, grads = eng.loss_and_grad(f, L2Loss())
        for p, g in zip(net.filters, grads):
            assert torch.allclose(p.grad, g[0])


def test_network_layers_are_what_figure_2_says():
    net = CPNetwork([2, 3], 2, dtype=torch.float64)
    with torch.no_grad():
        net.filters[0].copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        net.filters[1].copy_(torch.tensor([[1.0, -1.0], [0.5, 2.0], [0.0, 1.0]]))
    # input (1, 2): channel 0: 3 * 0.5, channel 1: 4 * 2 -> sum 9.5
    assert net(torch.tensor([[1, 1]])).item() == pytest.approx(9.5)


def test_network_rejects_bad_shapes():
    with pytest.raises(ValueError):
        CPNetwork([2, 0], 3)
    net = CPNetwork([2, 2], 3)
    with pytest.raises(ValueError):
        net(torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError):
        CPNetwork.from_factors([torch.zeros(2, 2, 3)])
