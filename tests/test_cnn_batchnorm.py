"""``implreg.cnn.batchnorm``: the closed-form double backward of train-mode batch norm.

Checked against ``torch.autograd.gradcheck`` / ``gradgradcheck`` (float64) and against
PyTorch's own batch norm: values, first and second derivatives and running statistics
(the locality penalty's gradient through whole networks: ``tests/test_cnn_conv.py``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

from implreg.cnn import batchnorm
from implreg.cnn.batchnorm import BatchNorm2d, batch_norm_train, double_backward

F64 = torch.float64


def _inputs(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=F64) * 2 + 0.5).requires_grad_()
    w = torch.randn(shape[1], generator=g, dtype=F64).requires_grad_()
    b = torch.randn(shape[1], generator=g, dtype=F64).requires_grad_()
    return x, w, b


@settings(max_examples=12, deadline=None)
@given(
    st.tuples(st.integers(2, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
    st.integers(0, 1000),
)
def test_gradcheck_and_gradgradcheck(shape, seed):
    x, w, b = _inputs(shape, seed)

    def f(x, w, b):
        return batch_norm_train(x, w, b, eps=1e-5)

    assert gradcheck(f, (x, w, b))
    assert gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("shape", [(4, 3, 5, 2), (2, 1, 1, 3), (8, 6, 3, 3)])
def test_values_and_double_backward_equal_the_native_ones(shape):
    """A second-order functional of the input and weight gradients (as the penalty is):
    every derivative equals what PyTorch's batch norm gives."""

    def derivatives(fn):
        x, w, b = _inputs(shape, 3)
        y = fn(x, w, b)
        g = torch.Generator().manual_seed(4)
        c = torch.randn(y.shape, generator=g, dtype=F64)
        gx, gw, gb = torch.autograd.grad((y * c).sum(), (x, w, b), create_graph=True)
        d = torch.randn(gx.shape, generator=g, dtype=F64)
        total = (gx * d).sum() + (gw**2).sum() + (gb * gw).sum()
        return (y, gx, gw, gb, *torch.autograd.grad(total, (x, w, b), allow_unused=True))

    ours = derivatives(lambda x, w, b: batch_norm_train(x, w, b, eps=1e-5))
    native = derivatives(lambda x, w, b: F.batch_norm(x, None, None, w, b, True, eps=1e-5))
    for a, n in zip(ours, native):
        assert (a is None) == (n is None)
        if a is not None:
            torch.testing.assert_close(a, n, rtol=1e-10, atol=1e-12)


def test_running_statistics_and_counter_match_the_native_module():
    torch.manual_seed(0)
    ours, native = BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    native.load_state_dict(ours.state_dict())
    for step in range(3):
        x = torch.randn(5, 3, 4, 4) * (step + 1)
        with double_backward():
            y1 = ours(x)
        y2 = native(x)
        torch.testing.assert_close(y1, y2)
    for k, v in native.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v)
    assert int(ours.num_batches_tracked) == 3


def test_outside_the_block_and_in_eval_mode_it_is_the_native_module(monkeypatch):
    calls = []
    monkeypatch.setattr(batchnorm, "batch_norm_train", lambda *a, **k: calls.append(1))
    bn = BatchNorm2d(2)
    x = torch.randn(3, 2, 2, 2)
    bn(x)
    bn.eval()
    with double_backward():
        bn(x)
    assert calls == []
    bn.train()
    with double_backward():
        bn(x)
    assert calls == [1]


# The penalty's gradient through whole networks, closed form against PyTorch's batch norm
# (alone and with the convolutions' closed form): tests/test_cnn_conv.py.
