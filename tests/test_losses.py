"""Losses: values against their definitions, derivatives against autograd (paper eq. 8)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from implreg.losses import HuberLoss, L2Loss, make_loss


def _autograd_derivative(loss, z: torch.Tensor) -> torch.Tensor:
    z = z.clone().requires_grad_()
    loss.pointwise(z)[0].sum().backward()
    return z.grad


def _residuals(seed: int, n: int = 200, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, dtype=torch.float64, generator=g)


def _eq_8(z: float, delta: float) -> float:
    """Paper eq. (8): z^2/2 for |z| < delta, else delta (|z| - delta/2)."""
    return 0.5 * z * z if abs(z) < delta else delta * (abs(z) - 0.5 * delta)


# ---------------------------------------------------------------- L2


@pytest.mark.parametrize("seed", [0, 1])
def test_l2_is_the_square_without_a_half(seed):
    z = _residuals(seed)
    val, d = L2Loss().pointwise(z)
    for zi, vi in zip(z.tolist(), val.tolist()):
        assert vi == pytest.approx(zi * zi, rel=1e-15)
    assert torch.allclose(d, _autograd_derivative(L2Loss(), z), rtol=1e-14, atol=0)
    assert torch.allclose(d, 2.0 * z, rtol=1e-15, atol=0)
    assert L2Loss().pointwise(torch.tensor([3.0], dtype=torch.float64))[0].item() == 9.0


def test_l2_keeps_shape_and_dtype():
    z = torch.zeros(3, 4, dtype=torch.float32)
    val, d = L2Loss().pointwise(z)
    assert val.shape == d.shape == (3, 4) and val.dtype == d.dtype == torch.float32


# ---------------------------------------------------------------- Huber, eq. (8)


@pytest.mark.parametrize("delta", [0.01, 0.5, 1.0, 2.5])
def test_huber_value_is_equation_8(delta):
    z = torch.cat([_residuals(2), torch.tensor([0.0, delta, -delta, 2 * delta, -0.5 * delta])])
    z = z.to(torch.float64)
    val, _ = HuberLoss(delta).pointwise(z)
    for zi, vi in zip(z.tolist(), val.tolist()):
        assert vi == pytest.approx(_eq_8(zi, delta), rel=1e-12, abs=1e-15)


@given(st.floats(-1e3, 1e3, allow_nan=False), st.floats(1e-3, 1e2))
def test_huber_value_is_equation_8_anywhere(z, delta):
    val, _ = HuberLoss(delta).pointwise(torch.tensor([z], dtype=torch.float64))
    assert val.item() == pytest.approx(_eq_8(z, delta), rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("delta", [0.01, 0.5, 1.0, 2.5])
def test_huber_derivative_matches_autograd(delta):
    z = _residuals(3)
    assert (z.abs() < delta).any() and (z.abs() >= delta).any()  # both branches checked
    loss = HuberLoss(delta)
    _, d = loss.pointwise(z)
    assert torch.allclose(d, _autograd_derivative(loss, z), rtol=1e-14, atol=0)
    # derivative of eq. (8): z inside, delta * sign(z) outside
    expect = torch.where(z.abs() < delta, z, delta * z.sign())
    assert torch.allclose(d, expect, rtol=1e-15, atol=0)


@pytest.mark.parametrize("delta", [0.01, 1.0, 2.5])
def test_huber_is_continuous_at_the_transition_point(delta):
    loss = HuberLoss(delta)
    eps = 1e-9
    for s in (-1.0, 1.0):
        inner = loss.pointwise(torch.tensor([s * (delta - eps)], dtype=torch.float64))
        at = loss.pointwise(torch.tensor([s * delta], dtype=torch.float64))
        outer = loss.pointwise(torch.tensor([s * (delta + eps)], dtype=torch.float64))
        assert at[0].item() == pytest.approx(delta * delta / 2, rel=1e-14)
        assert inner[0].item() == pytest.approx(at[0].item(), abs=2 * eps * delta)
        assert outer[0].item() == pytest.approx(at[0].item(), abs=2 * eps * delta)
        assert inner[1].item() == pytest.approx(s * delta, abs=2 * eps)
        assert at[1].item() == pytest.approx(s * delta, abs=1e-15)
        assert outer[1].item() == pytest.approx(s * delta, abs=1e-15)


@pytest.mark.parametrize("delta", [0.0, -1.0, -math.inf, math.nan, math.inf])
def test_huber_rejects_bad_delta(delta):
    with pytest.raises(ValueError, match="huber_delta"):
        HuberLoss(delta)


# ---------------------------------------------------------------- scale check


RESIDUALS = torch.tensor([0.125, -0.5, 0.25], dtype=torch.float64)  # exact binary fractions


@pytest.mark.parametrize("delta", [0.5, 0.75, 10.0])
def test_huber_scale_check_warns_when_delta_covers_every_residual(delta):
    with pytest.warns(UserWarning, match="at or above the largest residual") as record:
        HuberLoss(delta).check_scale(RESIDUALS)  # 0.5: delta == max |residual| also warns
    assert len(record) == 1
    assert "equals half the squared error" in str(record[0].message)


@pytest.mark.parametrize("delta", [0.01, 0.25, 0.4999])
def test_huber_scale_check_is_silent_below_the_largest_residual(delta):
    residuals = RESIDUALS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        HuberLoss(delta).check_scale(residuals)
    assert caught == []


# ---------------------------------------------------------------- make_loss


def test_make_loss():
    assert isinstance(make_loss("l2"), L2Loss)
    assert isinstance(make_loss("l2", huber_delta=0.3), L2Loss)
    huber = make_loss("huber", huber_delta=0.3)
    assert isinstance(huber, HuberLoss) and huber.delta == 0.3
    assert make_loss("huber", huber_delta=1).delta == 1.0


def test_l1_loss_is_the_absolute_value_with_its_sign():
    from implreg.losses import L1Loss

    z = torch.tensor([-2.0, -1e-30, 0.0, 3.5], dtype=torch.float64)
    value, slope = make_loss("l1").pointwise(z)
    assert isinstance(make_loss("l1"), L1Loss)
    assert torch.equal(value, z.abs()) and torch.equal(
        slope, torch.tensor([-1.0, -1, 0, 1]).double()
    )
    x = z.clone().requires_grad_()
    x.abs().sum().backward()
    assert torch.equal(slope, x.grad)  # autograd's subgradient at 0 is 0 too


def test_make_loss_errors():
    with pytest.raises(ValueError, match="needs huber_delta"):
        make_loss("huber")
    with pytest.raises(ValueError, match="huber_delta"):
        make_loss("huber", huber_delta=0.0)
    with pytest.raises(ValueError, match="huber_delta"):
        make_loss("huber", huber_delta=math.nan)
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("l3")
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("L2")
