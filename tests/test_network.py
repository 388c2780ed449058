"""The network view (paper Figure 2) computes the CP model: same outputs, same gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import cp_shapes, random_entries, random_factors
from hypothesis import given, settings
from hypothesis import strategies as st

from implreg.factorizations.cp import cp_to_tensor, cp_values
from implreg.factorizations.cp_engine import DenseCompletion, GatherCompletion
from implreg.factorizations.network import CPNetwork
from implreg.losses import L2Loss


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@given(cp_shapes(min_order=1, max_order=5), st.integers(1, 40), st.integers(0, 10_000))
def test_network_outputs_are_the_cp_values(shape, m, seed):
    dims, rank, _ = shape
    f = random_factors(dims, rank, 1, seed)
    net = CPNetwork.from_factors(f)
    idx, lin = random_entries(dims, m, seed)
    out = net(idx)
    assert out.shape == (idx.shape[0],)
    assert out.dtype == torch.float64
    assert torch.allclose(out, cp_values(f, idx)[0], rtol=1e-12, atol=1e-12)
    assert torch.allclose(out, cp_to_tensor(f).reshape(-1)[lin], rtol=1e-12, atol=1e-12)


@given(cp_shapes(min_order=1, max_order=5), st.integers(1, 40), st.integers(0, 10_000))
def test_one_hot_input_equals_index_input(shape, m, seed):
    dims, rank, _ = shape
    net = CPNetwork.from_factors(random_factors(dims, rank, 1, seed))
    idx, _ = random_entries(dims, m, seed)
    # one-hot vectors built independently of the network: rows of the identity
    one_hot = [torch.eye(d, dtype=torch.float64)[idx[:, n]] for n, d in enumerate(dims)]
    assert torch.equal(net(one_hot), net(idx))
    assert all(torch.equal(a, b) for a, b in zip(net.one_hot(idx), one_hot))
    assert torch.equal(net(tuple(one_hot)), net(idx.to(torch.int32)))


@settings(max_examples=100)
@given(cp_shapes(min_order=1, max_order=5), st.integers(1, 40), st.integers(0, 10_000))
def test_network_gradients_are_the_engine_gradients(shape, m, seed):
    """Autograd through the network equals the analytic L2 gradients of the CP objective."""
    dims, rank, _ = shape
    f = random_factors(dims, rank, 1, seed)
    net = CPNetwork.from_factors(f)
    idx, _ = random_entries(dims, m, seed)
    y = torch.randn(idx.shape[0], dtype=torch.float64, generator=_gen(seed + 1))
    loss = ((net(idx) - y) ** 2).mean()  # L2Loss: l(z) = z^2, mean over observations
    loss.backward()
    engines = [
        DenseCompletion(dims, idx, y),
        GatherCompletion(dims, idx, y, table_max=1, chunk=3),
        GatherCompletion(dims, idx, y, table_max=30, chunk=4096),
    ]
    for eng in engines:
        val, grads = eng.loss_and_grad(f, L2Loss())
        assert val.item() == pytest.approx(loss.item(), rel=1e-12, abs=1e-14)
        for p, g in zip(net.filters, grads):
            assert p.grad.shape == g[0].shape
            assert torch.allclose(p.grad, g[0], rtol=1e-10, atol=1e-12)


@given(cp_shapes(min_order=1, max_order=4, max_dim=4), st.integers(1, 6), st.integers(0, 10_000))
def test_general_inputs_give_the_multilinear_form(shape, batch, seed):
    """For any inputs the network outputs <W_e, x_1 (x) ... (x) x_N>: layers (i)-(iii)."""
    dims, rank, _ = shape
    f = random_factors(dims, rank, 1, seed)
    net = CPNetwork.from_factors(f)
    g = _gen(seed + 2)
    xs = [torch.randn(batch, d, dtype=torch.float64, generator=g) for d in dims]
    outer = xs[0]
    for x in xs[1:]:
        outer = (outer.unsqueeze(-1) * x.unsqueeze(1)).reshape(batch, -1)
    expect = outer @ cp_to_tensor(f).reshape(-1)
    assert torch.allclose(net(xs), expect, rtol=1e-10, atol=1e-12)


def test_layers_are_what_figure_2_says():
    net = CPNetwork([2, 3], 2, dtype=torch.float64)
    with torch.no_grad():
        net.filters[0].copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        net.filters[1].copy_(torch.tensor([[1.0, -1.0], [0.5, 2.0], [0.0, 1.0]]))
    # input (1, 1): channel 0 gives 3 * 0.5, channel 1 gives 4 * 2; sum 9.5
    assert net(torch.tensor([[1, 1]])).item() == 9.5
    # input (0, 2): channel 0 gives 1 * 0, channel 1 gives 2 * 1; sum 2
    assert net(torch.tensor([[0, 2]])).item() == 2.0
    assert net(torch.tensor([[1, 1], [0, 2]])).tolist() == [9.5, 2.0]


def test_parameters_and_factor_round_trip():
    f = random_factors([3, 1, 4], 2, 1, seed=3)
    net = CPNetwork.from_factors(f)
    assert isinstance(net.filters, torch.nn.ParameterList)
    assert [tuple(p.shape) for p in net.parameters()] == [(3, 2), (1, 2), (4, 2)]
    assert all(p.requires_grad for p in net.parameters())
    assert net.dims == [3, 1, 4] and net.rank == 2
    out = net.to_factors()
    assert all(torch.equal(a, b) for a, b in zip(out, f))
    assert all(not x.requires_grad and x.shape == y.shape for x, y in zip(out, f))
    # copies both ways: the network shares memory neither with its source nor its output
    before = net.filters[0].detach().clone()
    f[0].add_(1.0)
    out[0].add_(1.0)
    assert torch.equal(net.filters[0].detach(), before)


def test_fresh_network_starts_at_zero_and_has_the_requested_dtype():
    net = CPNetwork([2, 5], 3)
    assert all(p.dtype == torch.float32 and not p.detach().any() for p in net.filters)
    assert CPNetwork([2], 1, dtype=torch.float64).filters[0].dtype == torch.float64


def test_gd_through_the_network_follows_gd_on_the_factors():
    dims, rank, lr = [3, 4, 2], 3, 0.05
    f = random_factors(dims, rank, 1, seed=11)
    start = [x.clone() for x in f]
    idx, _ = random_entries(dims, 15, seed=11)
    y = torch.randn(15, dtype=torch.float64, generator=_gen(12))
    net = CPNetwork.from_factors(f)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    eng = DenseCompletion(dims, idx, y)
    for _ in range(20):
        opt.zero_grad()
        ((net(idx) - y) ** 2).mean().backward()
        opt.step()
        _, grads = eng.loss_and_grad(f, L2Loss())
        f = [x - lr * g for x, g in zip(f, grads)]
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(net.to_factors(), f))
    assert max(float((a - b).abs().max()) for a, b in zip(f, start)) > 1e-2  # it moved


def test_network_rejects_bad_shapes_and_inputs():
    with pytest.raises(ValueError):
        CPNetwork([2, 0], 3)
    with pytest.raises(ValueError):
        CPNetwork([2, 2], 0)
    with pytest.raises(ValueError):
        CPNetwork([], 2)
    net = CPNetwork([2, 2], 3)
    with pytest.raises(ValueError):
        net(torch.zeros(4, 3, dtype=torch.long))  # wrong number of modes
    with pytest.raises(ValueError):
        net(torch.tensor([[0, 2]]))  # index out of range
    with pytest.raises(ValueError):
        net(torch.tensor([[-1, 0]]))
    with pytest.raises(TypeError):
        net(torch.zeros(4, 2))  # float "indices"
    with pytest.raises(ValueError):
        net([torch.zeros(4, 2)])  # one input for two modes
    with pytest.raises(ValueError):
        net([torch.zeros(4, 2), torch.zeros(3, 2)])  # batch mismatch
    with pytest.raises(ValueError):
        net([torch.zeros(4, 2), torch.zeros(4, 3)])  # width mismatch
    with pytest.raises(ValueError):
        CPNetwork.from_factors([torch.zeros(2, 2, 3)])  # B = 2
    with pytest.raises(ValueError):
        CPNetwork.from_factors([torch.zeros(1, 2, 3), torch.zeros(1, 2, 4)])  # ranks differ
    with pytest.raises(ValueError):
        CPNetwork.from_factors([])
