"""Pointwise losses ``l(z)`` of residuals ``z = pred - y`` (paper eq. 1 and eq. 8)."""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Protocol

import torch

Tensor = torch.Tensor


class PointwiseLoss(Protocol):
    """A loss ``l(z)`` applied to residuals ``z = pred - y``: value and derivative."""

    def pointwise(self, z: Tensor) -> tuple[Tensor, Tensor]: ...


@dataclass(frozen=True)
class L2Loss:
    """``l(z) = z^2``: the squared error of the published experiments (no 1/2)."""

    name: str = "l2"

    def pointwise(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z * z, 2.0 * z


@dataclass(frozen=True)
class HuberLoss:
    """Huber loss of paper eq. (8) with transition point ``delta``.

    ``l(z) = z^2/2`` for ``|z| < delta``, else ``delta (|z| - delta/2)``.
    """

    delta: float
    name: str = "huber"

    def __post_init__(self) -> None:
        if isinstance(self.delta, bool) or not isinstance(self.delta, numbers.Real):
            raise TypeError(
                f"huber_delta must be a real number, got {type(self.delta).__name__} {self.delta!r}"
            )
        object.__setattr__(self, "delta", float(self.delta))
        if not (math.isfinite(self.delta) and self.delta > 0):
            raise ValueError(f"huber_delta must be a positive finite number, got {self.delta}")

    def pointwise(self, z: Tensor) -> tuple[Tensor, Tensor]:
        a = z.abs()
        quad = a < self.delta
        val = torch.where(quad, 0.5 * z * z, self.delta * (a - 0.5 * self.delta))
        return val, z.clamp(-self.delta, self.delta)

    def check_scale(self, residuals: Tensor) -> None:
        """Warn when ``delta`` is at or above every residual: Huber then equals (half) L2.

        Paper Assumption 1 asks for ``delta`` below the observed values; near a
        small initialization the residuals are the targets themselves.
        """
        if not isinstance(residuals, Tensor):
            raise TypeError(f"residuals must be a tensor, got {type(residuals).__name__}")
        scale = float(residuals.abs().max()) if residuals.numel() else 0.0
        if self.delta >= scale:
            warnings.warn(
                f"huber_delta={self.delta:g} is at or above the largest residual ({scale:.3g}): "
                "the Huber loss equals half the squared error on every observation; "
                "choose a delta below the residual scale",
                UserWarning,
                stacklevel=2,
            )


@dataclass(frozen=True)
class L1Loss:
    """``l(z) = |z|``, derivative ``sign(z)`` (0 at 0): a loss of the hierarchical tensor
    factorization experiments of Razin, Maman & Cohen (2022)."""

    name: str = "l1"

    def pointwise(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z.abs(), torch.sign(z)


def make_loss(name: str, *, huber_delta: float | None = None) -> L2Loss | HuberLoss | L1Loss:
    """Loss by name: ``l2``, ``l1`` or ``huber`` (which needs ``huber_delta``)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a string ('l2', 'l1' or 'huber'), got {type(name).__name__}")
    if name == "l2":
        return L2Loss()
    if name == "l1":
        return L1Loss()
    if name == "huber":
        if huber_delta is None:
            raise ValueError("the huber loss needs huber_delta")
        return HuberLoss(huber_delta)
    raise ValueError(f"unknown loss {name!r}; use 'l2', 'l1' or 'huber'")
