"""``implreg.cnn.conv``: convolution with a closed-form double backward for the penalty.

Checked against PyTorch's own convolution (float64): values, the first backward, the
input gradient taken with ``create_graph`` and every derivative of a functional of it
(as the locality penalty is), ``gradcheck`` of that functional, the one-channel col2im
path against ATen's kernel on random geometries, the ``create_graph`` rule (input
gradient only), the private input, and a whole regularized step of both networks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck

from implreg.cnn import (
    ResNet18,
    SmallCNN,
    batchnorm,
    conv,
    regularized_loss,
    sample_pathfinder_patches,
)
from implreg.cnn.batchnorm import double_backward
from implreg.cnn.conv import Conv2d, _input_grad, conv2d_double_backward, private_input

F64 = torch.float64

geometries = st.fixed_dictionaries(
    {
        "c_in": st.sampled_from([1, 1, 2, 4]),
        "c_out": st.integers(1, 4),
        "k": st.integers(1, 3),
        "stride": st.integers(1, 2),
        "padding": st.integers(0, 2),
        "dilation": st.integers(1, 2),
        "groups": st.sampled_from([1, 2]),
        "side": st.integers(5, 8),
        "bias": st.booleans(),
        "seed": st.integers(0, 10_000),
    }
)


def _draw(geo):
    """(x, W, b, V, u, kwargs) float64 for one geometry; ``V`` weights the output, ``u`` the
    input gradient."""
    c_in, c_out, groups = geo["c_in"], geo["c_out"], geo["groups"]
    if c_in % groups or c_out % groups:
        groups = 1
    g = torch.Generator().manual_seed(geo["seed"])
    x = torch.randn(3, c_in, geo["side"], geo["side"], generator=g, dtype=F64)
    w = torch.randn(c_out, c_in // groups, geo["k"], geo["k"], generator=g, dtype=F64)
    b = torch.randn(c_out, generator=g, dtype=F64) if geo["bias"] else None
    kw = {
        "stride": (geo["stride"],) * 2,
        "padding": (geo["padding"],) * 2,
        "dilation": (geo["dilation"],) * 2,
        "groups": groups,
    }
    out_shape = F.conv2d(x, w, b, **kw).shape
    v = torch.randn(out_shape, generator=g, dtype=F64)
    u = torch.randn(x.shape, generator=g, dtype=F64)
    return x, w, b, v, u, kw


def _fits(geo) -> bool:
    span = geo["dilation"] * (geo["k"] - 1) + 1
    return geo["side"] + 2 * geo["padding"] >= span


def _second_order(fn, x, w, b, v, u):
    """Everything the penalty needs from one convolution: output, input gradient with
    ``create_graph`` for output weights ``V`` (a parameter, so that ∂/∂gO is exercised)
    and the gradients of ``<u, g> + <g, g>`` with respect to ``W``, ``V`` and ``b``; then
    the first backward of a plain loss with respect to ``x``, ``W`` and ``b``."""
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    v = v.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    y = fn(x, w, b)
    (gx,) = torch.autograd.grad((y * v).sum(), x, create_graph=True)
    total = (gx * u).sum() + (gx * gx).sum()
    wrt = [t for t in (w, v, b) if t is not None]
    second = torch.autograd.grad(total, wrt, allow_unused=True)
    y2 = fn(x, w, b)
    first = torch.autograd.grad((y2 * v.detach()).sum() + (y2**2).sum(), [x, *wrt[::2]])
    return (y.detach(), gx.detach(), *second, *first)


@settings(max_examples=40, deadline=None)
@given(geometries)
def test_every_derivative_equals_the_native_convolution(geo):
    if not _fits(geo):
        return
    x, w, b, v, u, kw = _draw(geo)
    with double_backward():
        ours = _second_order(lambda x, w, b: conv2d_double_backward(x, w, b, **kw), x, w, b, v, u)
    native = _second_order(lambda x, w, b: F.conv2d(x, w, b, **kw), x, w, b, v, u)
    assert len(ours) == len(native)
    for a, n in zip(ours, native):
        assert (a is None) == (n is None)
        if a is not None:
            torch.testing.assert_close(a, n, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize(
    "geo",
    [
        {"c_in": 1, "c_out": 3, "k": 3, "stride": 1, "padding": 1, "dilation": 1, "groups": 1},
        {"c_in": 2, "c_out": 4, "k": 3, "stride": 2, "padding": 1, "dilation": 1, "groups": 2},
        {"c_in": 1, "c_out": 2, "k": 2, "stride": 2, "padding": 0, "dilation": 2, "groups": 1},
    ],
)
def test_gradcheck_of_the_penalty_like_functional(geo):
    """``(W, V) -> <u, g> + |g|^2`` with ``g = d <V, conv(x, W)> / d x`` taken with
    ``create_graph``: its derivatives are the double backward, checked by finite
    differences."""
    x, w, _, v, u, kw = _draw({**geo, "side": 6, "bias": False, "seed": 7})

    def functional(w, v):
        xr = x.clone().requires_grad_()
        with double_backward():
            y = conv2d_double_backward(xr, w, None, **kw)
        (gx,) = torch.autograd.grad((y * v).sum(), xr, create_graph=True)
        return (gx * u).sum() + (gx * gx).sum()

    assert gradcheck(functional, (w.requires_grad_(), v.requires_grad_()))


@settings(max_examples=40, deadline=None)
@given(geometries)
def test_the_one_channel_col2im_path_equals_atens_kernel(geo):
    geo = {**geo, "c_in": 1, "groups": 1}
    if not _fits(geo):
        return
    x, w, _, v, _, kw = _draw(geo)
    geom = (kw["stride"], kw["padding"], kw["dilation"], 1)
    ours = _input_grad(x.shape, w, v, geom)
    aten = torch.ops.aten.convolution_backward(
        v, x, w, None, *geom[:3], False, [0, 0], 1, [True, False, False]
    )[0]
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, aten, rtol=1e-12, atol=1e-12)


def test_a_create_graph_backward_gives_the_input_gradient_only():
    """The documented rule: no wrong weight gradient, an error from autograd instead."""
    x, w, _, v, _, kw = _draw(
        {
            **dict.fromkeys(("c_in", "c_out"), 2),
            "k": 3,
            "stride": 1,
            "padding": 1,
            "dilation": 1,
            "groups": 1,
            "side": 5,
            "bias": False,
            "seed": 1,
        }
    )
    x.requires_grad_()
    w.requires_grad_()
    with double_backward():
        y = conv2d_double_backward(x, w, None, **kw)
    with pytest.raises(RuntimeError, match="not have been used"):
        torch.autograd.grad((y * v).sum(), w, create_graph=True)
    gw = torch.autograd.grad((y * v).sum(), w)[0]  # without create_graph: the native one
    torch.testing.assert_close(gw, torch.autograd.grad((F.conv2d(x, w, **kw) * v).sum(), w)[0])


def test_after_its_block_the_private_input_gets_no_gradient_and_everything_else_does():
    x = torch.randn(2, 1, 5, 5, dtype=F64, requires_grad=True)
    w = torch.randn(3, 1, 3, 3, dtype=F64, requires_grad=True)
    with double_backward(), private_input(x):
        y = conv2d_double_backward(x, w, None, padding=(1, 1))
        (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)  # inside: as usual
        (gx_plain,) = torch.autograd.grad(y.sum(), x, retain_graph=True)
    torch.testing.assert_close(gx_plain, gx.detach())
    (y.sum() + gx.sum()).backward()
    assert x.grad is None
    assert w.grad is not None
    x2 = x.detach().clone().requires_grad_()
    with double_backward():
        conv2d_double_backward(x2, w, None, padding=(1, 1)).sum().backward()
    assert x2.grad is not None


def test_the_module_is_native_outside_the_block_and_when_switched_off(monkeypatch):
    calls = []
    monkeypatch.setattr(conv, "conv2d_double_backward", lambda *a, **k: calls.append(1))
    ours, native = Conv2d(2, 3, 3, padding=1), torch.nn.Conv2d(2, 3, 3, padding=1)
    native.load_state_dict(ours.state_dict())
    x = torch.randn(2, 2, 5, 5)
    torch.testing.assert_close(ours(x), native(x))
    with double_backward():
        ours(x)
    assert calls == [1]
    monkeypatch.setattr(conv, "FAST", False)
    with double_backward():
        torch.testing.assert_close(ours(x), native(x))
    assert calls == [1]
    reflect = Conv2d(2, 3, 3, padding=1, padding_mode="reflect")
    with double_backward():
        reflect(x)  # not zero padding: native
    assert calls == [1]


@pytest.mark.parametrize("closed", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("build", [lambda: SmallCNN(1, 8, depth=3), lambda: ResNet18(1, 4)])
def test_a_regularized_step_equals_pytorchs_own_double_backward(build, closed):
    """Loss, parameter gradients and running statistics of one regularized step with the
    closed forms (``closed`` = (convolution, batch norm)) against PyTorch's own, float64."""
    torch.manual_seed(0)
    net = build().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 1, 12, 12, generator=g, dtype=F64)
    y = torch.randint(0, 2, (6,), generator=g)
    pi, pj = sample_pathfinder_patches(12, 12, np.random.default_rng(0))
    results = []
    for fast_conv, closed_bn in (closed, (False, False)):
        model = build().double()
        model.load_state_dict(net.state_dict())
        before = conv.FAST, batchnorm.CLOSED_FORM
        conv.FAST, batchnorm.CLOSED_FORM = fast_conv, closed_bn
        try:
            loss = regularized_loss(model, x, y, 3.0, pi, pj)[0]
            loss.backward()
        finally:
            conv.FAST, batchnorm.CLOSED_FORM = before
        results.append((loss.detach(), [p.grad for p in model.parameters()], model.state_dict()))
    (l1, g1, s1), (l2, g2, s2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-14)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for k in s2:
        torch.testing.assert_close(s1[k], s2[k], rtol=1e-12, atol=1e-14)
