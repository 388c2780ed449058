"""2-D convolution with a cheap double backward, for the locality penalty.

The penalty of Razin, Maman & Cohen (ICML 2022, Section 6) differentiates the input
gradient of the network (double backpropagation).  Through a convolution ``y = conv(x,
W)`` the input gradient is ``gI = convᵀ(gO, W)``, bilinear in ``(gO, W)``; for a
cotangent ``ggI`` of ``gI`` its derivatives are

    ∂/∂gO = conv(ggI, W)        (a forward convolution of ``ggI``)
    ∂/∂W  = the weight gradient of ``conv`` at input ``ggI`` and output gradient ``gO``

since ``⟨ggI, convᵀ(gO, W)⟩ = ⟨conv(ggI, W), gO⟩``.  PyTorch's generic convolution
double backward forms the second term as a convolution of batch/channel-transposed
tensors (for a 32 x 32 activation a convolution with a 32 x 32 "kernel", plus copies
making the transposes contiguous): ~30% of a regularized ResNet18 step here
(torch.profiler, ``bench/bench_locality_step.py --profile``), about three times the
native backward of the same layer.  Here it is ATen's dedicated weight-gradient kernel
(``convolution_backward`` with only the weight requested).

Which gradients a backward call needs is not visible to a custom function
(``ctx.needs_input_grad`` says which inputs require grad, not which ones the current
``autograd.grad`` call asked for).  Native autograd skips the weight gradient in the
penalty's ``create_graph`` pass to the input; so does this function, by the rule that
**inside :func:`implreg.cnn.batchnorm.double_backward` a backward with ``create_graph``
(grad mode on) through these convolutions yields the input gradient only** -- exactly
the pass the regularizer makes.  Every backward without ``create_graph`` (the training
loss's) returns all requested gradients.  A ``create_graph`` backward asking for a weight
would get ``None`` for it (``autograd.grad`` then raises unless ``allow_unused``), never a
wrong number.

:class:`Conv2d` is ``torch.nn.Conv2d`` (same parameters and state dict) that uses this
function inside :func:`~implreg.cnn.batchnorm.double_backward` when :data:`FAST` is set
and the padding mode is ``"zeros"``; every other forward is the native one.  Values and
gradients equal the native ones to rounding (``tests/test_cnn_conv.py``).
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from implreg.cnn.batchnorm import double_backward_active

__all__ = ["FAST", "Conv2d", "conv2d_double_backward", "private_input"]

Tensor = torch.Tensor
_PRIVATE = threading.local()
# False: Conv2d stays native everywhere (bench/bench_locality_step.py times both).
FAST = True


def _aten_backward(g_out: Tensor, x: Tensor, weight: Tensor, geom, mask, bias: bool = False):
    """ATen's ``convolution_backward`` of ``conv(x, weight) (+ bias)`` for the gradients in
    ``mask`` (input, weight, bias); ``x`` and ``weight`` may stand in for their shapes
    where their gradient is the only one asked for."""
    stride, padding, dilation, groups = geom
    bias_sizes = [weight.shape[0]] if bias else None
    return torch.ops.aten.convolution_backward(
        g_out, x, weight, bias_sizes, stride, padding, dilation, False, [0, 0], groups, mask
    )


def _weight_grad(x: Tensor, weight: Tensor, g_out: Tensor, geom) -> Tensor:
    """The weight gradient of ``conv(x, weight)`` for output gradient ``g_out`` (ATen's
    dedicated kernel; ``weight`` gives the shape and layout only)."""
    return _aten_backward(g_out, x, weight, geom, [False, True, False])[1]


def _input_grad(x_shape, weight: Tensor, g_out: Tensor, geom) -> Tensor:
    """The input gradient ``convᵀ(g_out, weight)`` of ``conv`` at an input of ``x_shape``.

    One input channel (the first layer on grey images): the transposed convolution as
    one matrix product and a col2im (``F.fold``), 2.4-3.4x faster here than ATen's kernel
    for 16-32 output channels (whose single output channel is its slow case); otherwise
    ATen's ``convolution_backward`` with only the input requested.
    """
    stride, padding, dilation, groups = geom
    if groups == 1 and x_shape[1] == 1:
        b, c_out, h_out, w_out = g_out.shape
        w_t = weight.reshape(c_out, -1).t().expand(b, -1, -1)  # bmm: no copy of g_out
        cols = torch.bmm(w_t, g_out.reshape(b, c_out, h_out * w_out))
        return F.fold(cols, tuple(x_shape[-2:]), weight.shape[-2:], dilation, padding, stride)
    x_stand_in = g_out.new_empty(1).expand(x_shape)
    return _aten_backward(g_out, x_stand_in, weight, geom, [True, False, False])[0]


class _ConvInputGrad(torch.autograd.Function):
    """``(gO, W) -> gI = convᵀ(gO, W)`` (ATen's input-gradient kernel), with the closed-form
    backward ``(conv(ggI, W), weight gradient at (ggI, gO))``."""

    @staticmethod
    def forward(ctx, g_out, weight, x_shape, geom):
        ctx.geom = geom
        ctx.save_for_backward(g_out, weight)
        return _input_grad(x_shape, weight, g_out, geom)

    @staticmethod
    @once_differentiable
    def backward(ctx, gg_in):
        g_out, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geom
        d_g_out = d_weight = None
        if ctx.needs_input_grad[0]:
            d_g_out = F.conv2d(gg_in, weight, None, stride, padding, dilation, groups)
        if ctx.needs_input_grad[1]:
            d_weight = _weight_grad(gg_in, weight, g_out, ctx.geom)
        return d_g_out, d_weight, None, None


class _Conv(torch.autograd.Function):
    """``conv(x, W) + b`` (ATen's forward kernel).  Its backward: with grad mode off (no
    ``create_graph``) ATen's ``convolution_backward`` for every requested gradient; with
    grad mode on (the penalty's pass to the input) the input gradient alone, through
    :class:`_ConvInputGrad` so that it is differentiable."""

    @staticmethod
    def forward(ctx, x, weight, bias, geom):
        stride, padding, dilation, groups = geom
        ctx.geom = geom
        ctx.has_bias = bias is not None
        private = getattr(_PRIVATE, "input", None)
        ctx.seal = private[1] if private is not None and private[0] is x else None
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g_out):
        x, weight = ctx.saved_tensors
        if torch.is_grad_enabled():
            g_in = None
            if ctx.needs_input_grad[0]:
                g_in = _ConvInputGrad.apply(g_out, weight, x.shape, ctx.geom)
            return g_in, None, None, None
        # the regularizer's private copy of the batch never has its .grad read
        need_in = ctx.needs_input_grad[0] and not (ctx.seal is not None and ctx.seal.closed)
        mask = [need_in, ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        g_in, g_weight, g_bias = _aten_backward(g_out, x, weight, ctx.geom, mask, ctx.has_bias)
        return g_in if need_in else None, g_weight, g_bias if ctx.has_bias else None, None


class _Seal:
    """Set when a :func:`private_input` block ends."""

    closed = False


@contextlib.contextmanager
def private_input(x: Tensor):
    """After this block, a convolution applied to ``x`` within it gives ``x`` no gradient in
    a backward without ``create_graph``.

    For :func:`implreg.cnn.regularizer` only: it takes the input gradient with respect to a
    detached copy of the batch that no one else sees, inside the block; the training
    loss's backward, after it, would only fill that copy's ``.grad`` (native autograd
    computes it: about 6% of the small CNN's regularized step in torch.profiler).  Backward
    passes inside the block, with or without ``create_graph``, are unaffected.
    """
    before = getattr(_PRIVATE, "input", None)
    seal = _Seal()
    _PRIVATE.input = (x, seal)
    try:
        yield x
    finally:
        seal.closed = True
        _PRIVATE.input = before


def conv2d_double_backward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=(1, 1),
    padding=(0, 0),
    dilation=(1, 1),
    groups: int = 1,
) -> Tensor:
    """``F.conv2d`` (zero padding, integer-pair geometry) whose input gradient is
    differentiated by the closed form of this module.  A ``create_graph`` backward yields
    the input gradient only (see the module docstring)."""
    geom = (tuple(stride), tuple(padding), tuple(dilation), int(groups))
    return _Conv.apply(x, weight, bias, geom)


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` whose forward, inside
    :func:`~implreg.cnn.batchnorm.double_backward`, is :func:`conv2d_double_backward`
    (cheap double backward); native everywhere else."""

    def forward(self, x: Tensor) -> Tensor:
        if (
            FAST
            and double_backward_active()
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and x.dim() == 4
        ):
            return conv2d_double_backward(
                x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
            )
        return super().forward(x)
