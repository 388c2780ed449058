"""Deep matrix factorization: products, layer gradients, engines and initializations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from implreg.factorizations.matrix import (
    MatrixCompletion,
    MatrixSensing,
    layer_sizes,
    mf_init,
    mf_layer_grads,
    mf_product,
)
from implreg.losses import HuberLoss, L2Loss


@st.composite
def mf_shapes(draw, max_depth: int = 5, max_dim: int = 6):
    """(shape, depth, widths, batch) for a random deep matrix factorization."""
    depth = draw(st.integers(1, max_depth))
    shape = (draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim)))
    widths = draw(st.lists(st.integers(1, max_dim), min_size=depth - 1, max_size=depth - 1))
    batch = draw(st.sampled_from([1, 3]))
    return shape, depth, widths, batch


def random_layers(shape, depth, widths, batch, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    sizes = layer_sizes(shape, depth, widths)
    return [
        torch.randn(batch, sizes[j + 1], sizes[j], generator=g, dtype=dtype) for j in range(depth)
    ]


def product_by_loop(layers):
    batch = layers[0].shape[0]
    out = []
    for b in range(batch):
        w = layers[0][b]
        for layer in layers[1:]:
            w = layer[b] @ w
        out.append(w)
    return torch.stack(out)


@given(mf_shapes(), st.integers(0, 2**31 - 1))
def test_product_matches_loop(spec, seed):
    shape, depth, widths, batch = spec
    layers = random_layers(shape, depth, widths, batch, seed)
    w = mf_product(layers)
    assert w.shape == (batch, *shape)
    torch.testing.assert_close(w, product_by_loop(layers), rtol=1e-12, atol=1e-12)


@given(mf_shapes(), st.integers(0, 2**31 - 1))
def test_layer_grads_match_autograd(spec, seed):
    shape, depth, widths, batch = spec
    layers = random_layers(shape, depth, widths, batch, seed)
    g_end = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed + 1))
    g_end = g_end.double()
    leaves = [w.clone().requires_grad_(True) for w in layers]
    (product_by_loop(leaves) * g_end).sum().backward()
    grads = mf_layer_grads(layers, g_end)
    assert len(grads) == depth
    for got, leaf in zip(grads, leaves):
        assert got.shape == leaf.shape
        torch.testing.assert_close(got, leaf.grad, rtol=1e-10, atol=1e-10)


def test_layer_grads_rejects_bad_gradient_shape():
    layers = random_layers((3, 4), 2, [2], 1, 0)
    with pytest.raises(ValueError):
        mf_layer_grads(layers, torch.zeros(1, 4, 3, dtype=torch.float64))


def _autograd_loss(layers, loss, predict):
    leaves = [w.clone().requires_grad_(True) for w in layers]
    val, _ = loss.pointwise(predict(product_by_loop(leaves)))
    per_batch = val.mean(-1)
    per_batch.sum().backward()
    return per_batch.detach(), [leaf.grad for leaf in leaves]


def _check_engine(engine, layers, loss, residual_fn, huber_branches=False):
    expected_loss, expected_grads = _autograd_loss(layers, loss, residual_fn)
    got_loss, got_grads = engine.loss_and_grad(layers, loss)
    torch.testing.assert_close(got_loss, expected_loss, rtol=1e-10, atol=1e-12)
    for got, exp in zip(got_grads, expected_grads):
        torch.testing.assert_close(got, exp, rtol=1e-9, atol=1e-11)
    if huber_branches:
        z = residual_fn(mf_product(layers))
        assert bool((z.abs() < loss.delta).any()) and bool((z.abs() >= loss.delta).any())


LOSSES = [L2Loss(), HuberLoss(1.0)]


@pytest.mark.parametrize("loss", LOSSES, ids=lambda x: x.name)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(("shape", "depth", "widths"), [((5, 4), 3, [3, 6]), ((4, 4), 1, [])])
def test_completion_matches_autograd(loss, batch, shape, depth, widths):
    g = torch.Generator().manual_seed(7)
    layers = random_layers(shape, depth, widths, batch, 11)
    m = 15
    rows = torch.randint(0, shape[0], (m,), generator=g)
    cols = torch.randint(0, shape[1], (m,), generator=g)
    rows[-3:], cols[-3:] = rows[0], cols[0]  # repeated observations
    y = 2.0 * torch.randn(m, generator=g, dtype=torch.float64)
    engine = MatrixCompletion(shape, rows, cols, y)

    def residual(w):
        return w[:, rows, cols] - y

    _check_engine(engine, layers, loss, residual, huber_branches=isinstance(loss, HuberLoss))
    torch.testing.assert_close(engine.predict(layers), mf_product(layers)[:, rows, cols])


@pytest.mark.parametrize("loss", LOSSES, ids=lambda x: x.name)
@pytest.mark.parametrize("batch", [1, 3])
def test_sensing_matches_autograd(loss, batch):
    shape, depth, widths = (3, 5), 3, [4, 2]
    g = torch.Generator().manual_seed(3)
    layers = random_layers(shape, depth, widths, batch, 5)
    m = 12
    a = torch.randn(m, shape[0] * shape[1], generator=g, dtype=torch.float64)
    a[-1] = a[0]  # a repeated measurement
    y = 2.0 * torch.randn(m, generator=g, dtype=torch.float64)
    engine = MatrixSensing(shape, a, y)

    def residual(w):
        mats = a.view(m, *shape)
        return torch.einsum("bij,mij->bm", w, mats) - y

    _check_engine(engine, layers, loss, residual, huber_branches=isinstance(loss, HuberLoss))
    torch.testing.assert_close(engine.predict(layers), residual(mf_product(layers)) + y)


def test_engines_reject_bad_inputs():
    idx = torch.tensor([0, 1])
    y = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ValueError):
        MatrixCompletion((2, 2), idx, idx, torch.zeros(3))
    with pytest.raises(ValueError):
        MatrixCompletion((2, 2), idx, torch.tensor([0, 2]), y)
    with pytest.raises(ValueError):
        MatrixSensing((2, 2), torch.zeros(2, 5), y)
    with pytest.raises(ValueError):
        MatrixSensing((2, 2), torch.zeros(2, 4), torch.zeros(3))


# ---------------------------------------------------------------- initialization


@pytest.mark.parametrize("scheme", ["gaussian", "balanced", "orthogonal", "identity"])
@pytest.mark.parametrize(("shape", "depth"), [((4, 6), 3), ((5, 5), 1), ((6, 3), 2)])
def test_init_shapes_and_dtype(scheme, shape, depth):
    g = torch.Generator().manual_seed(0)
    layers = mf_init(
        shape, depth, scales=[1e-3, 1.0], scheme=scheme, generator=g, dtype=torch.float32
    )
    sizes = layer_sizes(shape, depth)
    assert [tuple(w.shape) for w in layers] == [(2, sizes[j + 1], sizes[j]) for j in range(depth)]
    assert all(w.dtype == torch.float32 for w in layers)
    # one shared draw: batch entries differ by the per-layer factor scale**(1/N)
    for w in layers:
        torch.testing.assert_close(
            w[0].double() * 1e3 ** (1 / depth), w[1].double(), rtol=1e-5, atol=1e-7
        )


def test_init_custom_widths():
    g = torch.Generator().manual_seed(0)
    layers = mf_init((3, 4), 3, scales=[1.0], widths=[7, 2], generator=g)
    assert [tuple(w.shape) for w in layers] == [(1, 7, 4), (1, 2, 7), (1, 3, 2)]


def test_gaussian_end_norm():
    g = torch.Generator().manual_seed(1)
    scales = [1e-3] * 1 + [1.0]
    norms = []
    for _ in range(10):
        layers = mf_init((100, 100), 3, scales=scales, generator=g)
        norms.append(torch.linalg.matrix_norm(mf_product(layers)))
    mean = torch.stack(norms).mean(0)
    torch.testing.assert_close(
        mean, torch.tensor([1e-2, 10.0], dtype=torch.float64), rtol=0.15, atol=0
    )
    # per-layer std is scale**(1/N) / sqrt(width)
    layers = mf_init((100, 100), 3, scales=[8.0], generator=g)
    assert abs(float(layers[0].std()) - 2.0 / 10.0) < 0.01


@pytest.mark.parametrize(("shape", "depth"), [((6, 6), 3), ((4, 7), 2), ((7, 4), 4), ((5, 3), 1)])
def test_balanced_init(shape, depth):
    g = torch.Generator().manual_seed(2)
    scales = [0.5, 2.0]
    layers = mf_init(shape, depth, scales=scales, scheme="balanced", generator=g)
    for j in range(depth - 1):
        lhs = layers[j + 1].transpose(1, 2) @ layers[j + 1]
        rhs = layers[j] @ layers[j].transpose(1, 2)
        assert float((lhs - rhs).abs().max()) < 1e-10
    norms = torch.linalg.matrix_norm(mf_product(layers))
    k = min(shape)
    expected = torch.tensor(scales, dtype=torch.float64) * math.sqrt(k)
    torch.testing.assert_close(norms, expected, rtol=1e-10, atol=0)


def test_balanced_init_requires_full_width():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="balanced"):
        mf_init((4, 4), 3, scales=[1.0], scheme="balanced", widths=[4, 5], generator=g)


@pytest.mark.parametrize(("shape", "depth", "widths"), [((5, 5), 3, None), ((3, 6), 3, [8, 2])])
def test_orthogonal_init(shape, depth, widths):
    g = torch.Generator().manual_seed(3)
    scale = 0.3
    layers = mf_init(shape, depth, scales=[scale], scheme="orthogonal", widths=widths, generator=g)
    c2 = scale ** (2 / depth)
    for w in layers:
        w = w[0]
        gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
        torch.testing.assert_close(gram, c2 * torch.eye(gram.shape[0], dtype=torch.float64))


def test_identity_init():
    g = torch.Generator().manual_seed(0)
    layers = mf_init((3, 5), 2, scales=[4.0], scheme="identity", generator=g)
    for w in layers:
        torch.testing.assert_close(w[0], 2.0 * torch.eye(*w.shape[1:], dtype=torch.float64))
    torch.testing.assert_close(mf_product(layers)[0], 4.0 * torch.eye(3, 5, dtype=torch.float64))


@pytest.mark.parametrize("scheme", ["gaussian", "balanced", "orthogonal", "identity"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_positive_det(scheme, depth):
    scales = [1e-6, 1e-3, 1.0]
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        layers = mf_init(
            (6, 6), depth, scales=scales, scheme=scheme, generator=g, positive_det=True
        )
        det = torch.linalg.det(mf_product(layers))
        assert bool((det > 0).all()), (seed, det)


def test_positive_det_with_underflowing_determinant():
    """At 40 x 40 and scale 1e-6 det(W_e) underflows to 0 in float64; its sign is still right."""
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        layers = mf_init((40, 40), 3, scales=[1e-6, 1.0], generator=g, positive_det=True)
        sign, _ = torch.linalg.slogdet(mf_product(layers))
        assert bool((sign > 0).all()), (seed, sign)


def test_positive_det_flips_some_draw():
    """Without positive_det some seeds give det < 0; with it the same seeds give det > 0."""
    signs = []
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        layers = mf_init((4, 4), 2, scales=[1.0], generator=g)
        signs.append(float(torch.linalg.det(mf_product(layers))[0]) > 0)
    assert not all(signs)


def test_positive_det_needs_square():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="square"):
        mf_init((3, 4), 2, scales=[1.0], generator=g, positive_det=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"shape": (3, 3), "depth": 0},
        {"shape": (3, 3), "depth": 2.5},
        {"shape": (0, 3), "depth": 2},
        {"shape": (3,), "depth": 2},
        {"shape": (3, 3), "depth": 2, "scales": [0.0]},
        {"shape": (3, 3), "depth": 2, "scales": [-1.0]},
        {"shape": (3, 3), "depth": 2, "scales": [math.inf]},
        {"shape": (3, 3), "depth": 2, "scales": [math.nan]},
        {"shape": (3, 3), "depth": 2, "scales": []},
        {"shape": (3, 3), "depth": 2, "scheme": "xavier"},
        {"shape": (3, 3), "depth": 3, "widths": [3]},
        {"shape": (3, 3), "depth": 2, "widths": [0]},
    ],
)
def test_init_rejects_bad_inputs(kwargs):
    kwargs = {"scales": [1.0], **kwargs}
    with pytest.raises(ValueError):
        mf_init(generator=torch.Generator().manual_seed(0), **kwargs)
