"""Log-domain CP predictor: exact against the plain product, gradients against autograd."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from implreg.factorizations.cp import cp_values
from implreg.factorizations.cp_logdomain import log_abs_values, plain_values, values


def _draw(order, levels, rank, n, seed, mean=0.0, std=1.0):
    g = torch.Generator().manual_seed(seed)
    a = mean + std * torch.randn(order, levels, rank, generator=g, dtype=torch.float64)
    x = torch.randint(0, levels, (n, order), generator=g)
    return a, x


@given(st.integers(1, 12), st.integers(2, 4), st.integers(1, 5), st.integers(0, 10_000))
def test_matches_plain_product_and_cp_values(order, levels, rank, seed):
    a, x = _draw(order, levels, rank, 17, seed)
    ref = plain_values(a, x)
    assert torch.allclose(values(a, x), ref, rtol=1e-10, atol=1e-12)
    # the same model as implreg's CP factorization (factors (1, L, R) per mode)
    factors = [a[n].unsqueeze(0) for n in range(order)]
    assert torch.allclose(ref, cp_values(factors, x)[0], rtol=1e-12, atol=1e-12)
    la, sg = log_abs_values(a, x)
    nz = ref != 0
    assert torch.allclose((sg * torch.exp(la))[nz], ref[nz], rtol=1e-10)


@given(st.integers(1, 8), st.integers(1, 4), st.integers(0, 10_000))
def test_gradients_match_autograd_of_the_plain_product(order, rank, seed):
    a, x = _draw(order, 2, rank, 11, seed)
    y = torch.randn(11, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    p1, p2 = a.clone().requires_grad_(), a.clone().requires_grad_()
    ((values(p1, x) - y) ** 2).mean().backward()
    ((plain_values(p2, x) - y) ** 2).mean().backward()
    assert torch.allclose(p1.grad, p2.grad, rtol=1e-9, atol=1e-12)


def test_order_784_where_the_plain_product_fails():
    # factors near 10: the plain product overflows float64; the log domain does not
    a, x = _draw(784, 2, 3, 5, 0, mean=10.0, std=0.1)
    assert torch.isinf(plain_values(a, x)).all()
    la, sg = log_abs_values(a, x)
    assert torch.isfinite(la).all() and (sg == 1).all()
    expect = torch.log(plain_values(a / 10.0, x)) + 784 * math.log(10.0)
    assert torch.allclose(la, expect, rtol=1e-12)
    # factors near 0.5 (mean 1 init after training drifts): the plain product underflows
    b, _ = _draw(784, 2, 3, 5, 1, mean=0.5, std=0.01)
    assert (plain_values(b.float(), x) == 0).all()
    lb, _ = log_abs_values(b, x)
    assert torch.isfinite(lb).all() and (lb < -500).all()


def test_float32_mean_one_init_is_stable_and_signs_are_tracked():
    a, x = _draw(784, 2, 4, 64, 2, mean=1.0, std=1e-3)
    a[5, :, 0] *= -1.0  # one negative filter flips component 0's sign for every input
    v = values(a.float(), x)
    ref = plain_values(a, x)
    assert torch.allclose(v.double(), ref, rtol=1e-4)


def test_shape_errors():
    a, x = _draw(4, 2, 3, 5, 0)
    with pytest.raises(ValueError):
        values(a, x[:, :3])
