"""Training-mode batch normalization with a cheap double backward, for the locality penalty.

The penalty of Razin, Maman & Cohen (ICML 2022, Section 6) differentiates the input
gradient of the network (double backpropagation).  Through BatchNorm in train mode that
second derivative is PyTorch's generic ``batchnorm_double_backward``: ~40% of a
regularized step of the small CNN and ~27% of ResNet18's (torch.profiler,
``bench/bench_locality_step.py --profile``), mostly full-size element-wise products.

Here the same derivatives are written in closed form.  Per channel, over the ``N``
entries of the batch and the spatial positions, with ``x̂ = (x - μ) r``, ``r = (σ² +
eps)^(-1/2)`` and ``⟨·⟩`` the channel mean, the backward of ``y = γ x̂ + β`` is

    gI = γ r (gO - ⟨gO⟩ - x̂ ⟨gO x̂⟩),   gγ = Σ gO x̂,   gβ = Σ gO

and for cotangents ``(ggI, ggγ, ggβ)`` of ``(gI, gγ, gβ)`` the double backward is (with
``P(v) = v - ⟨v⟩ - x̂ ⟨v x̂⟩``, ``Q = Σ ggI gO - N ⟨ggI⟩⟨gO⟩ - N ⟨ggI x̂⟩⟨gO x̂⟩``)

    ∂/∂gO = γ r P(ggI) + ggγ x̂ + ggβ
    ∂/∂γ  = r Q
    ∂/∂x  = -(γ r² Q / N) x̂ - γ r² (⟨gO x̂⟩ P(ggI) + ⟨ggI x̂⟩ P(gO)) + ggγ r P(gO)

(the last from ``δx̂ = r P(δx)`` and ``δσ = ⟨x̂ δx⟩``).  Every output is an affine
combination of ``ggI``, ``gO`` and ``x`` with per-channel coefficients, after three
per-channel reductions (``Σ ggI``, ``Σ ggI x``, ``Σ ggI gO``; ``Σ gO`` and ``Σ gO x̂`` are
``gβ`` and ``gγ`` of the first backward), so it takes a handful of passes over the
activations instead of dozens.  The forward and the first backward are ATen's native
kernels.  Values and
gradients equal the native ones to rounding (``tests/test_cnn_batchnorm.py``:
``gradcheck`` / ``gradgradcheck`` in float64 and the native double backward).

:class:`BatchNorm2d` is ``torch.nn.BatchNorm2d`` (same parameters, buffers and state
dict) that uses this function in train mode while :func:`double_backward` is active --
which :func:`implreg.cnn.regularizer.regularized_loss` turns on for its passes; every
other forward (the plain step, ``lam = 0``, evaluation) stays the native one.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["BatchNorm2d", "batch_norm_train", "double_backward", "double_backward_active"]

Tensor = torch.Tensor
_STATE = threading.local()
# False: BatchNorm2d stays native everywhere (bench/bench_locality_step.py times both).
CLOSED_FORM = True


@contextlib.contextmanager
def double_backward():
    """Within this block, :class:`BatchNorm2d` in train mode uses :func:`batch_norm_train`."""
    before = getattr(_STATE, "active", False)
    _STATE.active = True
    try:
        yield
    finally:
        _STATE.active = before


def double_backward_active() -> bool:
    """Whether this thread is inside :func:`double_backward`."""
    return getattr(_STATE, "active", False)


def _c(v: Tensor) -> Tensor:
    """A per-channel vector ``(C,)`` shaped to broadcast over ``(B, C, H, W)``."""
    return v.view(1, -1, 1, 1)


def _csum(a: Tensor, b: Tensor | None = None) -> Tensor:
    """Per-channel ``Σ a`` or ``Σ a b`` of ``(B, C, H, W)`` tensors."""
    return (a if b is None else a * b).sum(dim=(0, 2, 3))


def _affine(parts: list[tuple[Tensor, Tensor]], const: Tensor) -> Tensor:
    """``Σ_k coef_k * t_k + const`` with per-channel coefficients, in place on one buffer."""
    (c0, t0), *rest = parts
    out = t0 * _c(c0)
    for coef, t in rest:
        out.addcmul_(t, _c(coef))
    return out.add_(_c(const))


class _BNBackward(torch.autograd.Function):
    """``(gO, x, γ) -> (gI, gγ, gβ)``, the backward of train-mode batch norm (ATen's native
    kernel), with its own closed-form backward (the double backward of batch norm)."""

    @staticmethod
    def forward(ctx, g_out, x, weight, mean, rstd, eps):
        g_in, g_weight, g_bias = torch.ops.aten.native_batch_norm_backward(
            g_out, x, weight, None, None, mean, rstd, True, eps, [True, True, True]
        )
        ctx.save_for_backward(g_out, x, weight, mean, rstd, g_weight, g_bias)
        return g_in, g_weight, g_bias

    @staticmethod
    @once_differentiable
    def backward(ctx, gg_in, gg_weight, gg_bias):
        g_out, x, weight, mean, rstd, g_weight, g_bias = ctx.saved_tensors
        n = x.numel() // x.shape[1]
        m_g, m_gh = g_bias / n, g_weight / n  # ⟨gO⟩, ⟨gO x̂⟩
        zero = torch.zeros_like(rstd)
        gg_weight = zero if gg_weight is None else gg_weight
        gg_bias = zero if gg_bias is None else gg_bias
        a = weight * rstd
        if gg_in is None:
            gg_in = torch.zeros_like(x)
        m_gg = _csum(gg_in) / n
        m_ggh = (_csum(gg_in, x) / n - mean * m_gg) * rstd  # ⟨ggI x̂⟩
        q = _csum(gg_in, g_out) - n * (m_gg * m_g + m_ggh * m_gh)
        # ∂/∂gO = a P(ggI) + ggγ x̂ + ggβ, with x̂ = (x - μ) r
        k1 = (gg_weight - a * m_ggh) * rstd
        d_g_out = None
        if ctx.needs_input_grad[0]:
            d_g_out = _affine([(a, gg_in), (k1, x)], gg_bias - a * m_gg - k1 * mean)
        d_weight = rstd * q if ctx.needs_input_grad[2] else None
        d_x = None
        if ctx.needs_input_grad[1]:
            ar2 = a * rstd
            c_gg = -ar2 * m_gh
            c_go = -ar2 * m_ggh + gg_weight * rstd
            c_xh = -a * q * rstd / n + 2 * ar2 * m_gh * m_ggh - gg_weight * rstd * m_gh
            c0 = ar2 * (m_gh * m_gg + m_ggh * m_g) - gg_weight * rstd * m_g
            d_x = _affine([(c_gg, gg_in), (c_go, g_out), (c_xh * rstd, x)], c0 - c_xh * rstd * mean)
        return d_g_out, d_x, d_weight, None, None, None


class _BNTrain(torch.autograd.Function):
    """Train-mode batch norm ``y = γ (x - μ) r + β`` over ``(B, C, H, W)`` (ATen's native
    kernel, which also updates the running statistics); its backward is
    :class:`_BNBackward`, so it is twice differentiable."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        y, mean, rstd = torch.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps
        )
        ctx.eps = eps
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, g_out):
        x, weight, mean, rstd = ctx.saved_tensors
        g_in, g_weight, g_bias = _BNBackward.apply(g_out, x, weight, mean, rstd, ctx.eps)
        return g_in, g_weight, g_bias, None, None, None, None


def batch_norm_train(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Train-mode batch norm of ``(B, C, H, W)`` with an affine ``weight``/``bias``, updating
    the running statistics as ``torch.nn.functional.batch_norm`` does."""
    return _BNTrain.apply(x, weight, bias, running_mean, running_var, momentum, eps)


class BatchNorm2d(nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` whose train-mode forward, inside :func:`double_backward`,
    is :func:`batch_norm_train` (closed-form double backward); native everywhere else."""

    def forward(self, x: Tensor) -> Tensor:
        if (
            CLOSED_FORM
            and double_backward_active()
            and self.training
            and self.affine
            and self.track_running_stats
            and self.momentum is not None
            and x.dim() == 4
        ):
            self._check_input_dim(x)
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
            return batch_norm_train(
                x,
                self.weight,
                self.bias,
                self.running_mean,
                self.running_var,
                self.momentum,
                self.eps,
            )
        return super().forward(x)
