"""Losses: values against their definitions, derivatives against autograd (paper eq. 8)."""

from __future__ import annotations

import math

import pytest
import torch

from implreg.losses import HuberLoss, L2Loss, make_loss


def _grad(loss, z):
    z = z.clone().requires_grad_()
    loss.pointwise(z)[0].sum().backward()
    return z.grad


def test_l2_is_square_without_half():
    z = torch.linspace(-3, 3, 41, dtype=torch.float64)
    val, d = L2Loss().pointwise(z)
    assert torch.allclose(val, z * z)
    assert torch.allclose(d, _grad(L2Loss(), z))


@pytest.mark.parametrize("delta", [0.1, 1.0, 2.5])
def test_huber_is_equation_8(delta):
    loss = HuberLoss(delta)
    z = torch.linspace(-4, 4, 81, dtype=torch.float64)
    val, d = loss.pointwise(z)
    for zi, vi in zip(z.tolist(), val.tolist()):
        expect = 0.5 * zi * zi if abs(zi) < delta else delta * (abs(zi) - 0.5 * delta)
        assert vi == pytest.approx(expect, rel=1e-12, abs=1e-15)
    assert torch.allclose(d, _grad(loss, z))
    # continuous at the transition point, value and slope
    eps = 1e-9
    for s in (-1, 1):
        inner = loss.pointwise(torch.tensor([s * (delta - eps)], dtype=torch.float64))
        outer = loss.pointwise(torch.tensor([s * (delta + eps)], dtype=torch.float64))
        assert inner[0].item() == pytest.approx(outer[0].item(), abs=1e-8)
        assert inner[1].item() == pytest.approx(outer[1].item(), abs=1e-8)


@pytest.mark.parametrize("delta", [0.0, -1.0, math.nan, math.inf])
def test_huber_rejects_bad_delta(delta):
    with pytest.raises(ValueError, match="huber_delta"):
        HuberLoss(delta)


def test_huber_scale_check_warns_only_when_delta_covers_every_residual():
    residuals = torch.tensor([0.01, -0.03, 0.02])
    with pytest.warns(UserWarning, match="equals half the squared error"):
        HuberLoss(0.05).check_scale(residuals)
    HuberLoss(0.005).check_scale(residuals)  # filterwarnings=error: any warning fails


def test_make_loss():
    assert isinstance(make_loss("l2"), L2Loss)
    assert make_loss("huber", huber_delta=0.3).delta == 0.3
    with pytest.raises(ValueError, match="needs huber_delta"):
        make_loss("huber")
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("l1")
