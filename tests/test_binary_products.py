"""Products with a binary matrix by table look-up (binary_products) against float64 dense
products on random shapes, thread counts and dtypes; the Figure 4 fit on the packed engine
against the dense one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from implreg.factorizations import binary_products as bp
from implreg.factorizations.binary_products import NARROW, TILE, PackedBinary
from implreg.factorizations.cp_exp import fit_exp_sum

F64 = torch.float64


def _binary(n: int, d: int, p: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, d)) < p).astype(np.uint8)


def _check(x: np.ndarray, k: int, dtype: torch.dtype, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n, d = x.shape
    w = torch.randn(d, k, generator=g, dtype=F64)
    gr = torch.randn(n, k, generator=g, dtype=F64)
    xd = torch.from_numpy(x).to(F64)
    pb = PackedBinary(x)
    got_f = pb.matmul(w.to(dtype))
    got_b = pb.rmatmul(gr.to(dtype))
    assert got_f.dtype == dtype and got_f.shape == (n, k)
    assert got_b.dtype == dtype and got_b.shape == (d, k)
    # Tolerance: each output is a sum of up to d (forward) or n (transpose) terms.
    eps = torch.finfo(dtype).eps
    ref_f, ref_b = xd @ w, xd.T @ gr
    tol_f = 4 * eps * max(d, 1) * (xd @ w.abs()).clamp_min(1.0)
    tol_b = 4 * eps * max(n, 1) * (xd.T @ gr.abs()).clamp_min(1.0)
    assert bool(((got_f.to(F64) - ref_f).abs() <= tol_f).all())
    assert bool(((got_b.to(F64) - ref_b).abs() <= tol_b).all())


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 300),
    d=st.integers(0, 37),
    k=st.sampled_from([1, 2, NARROW, NARROW + 1, 17, 64]),
    p=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
    dtype=st.sampled_from([torch.float32, F64]),
    seed=st.integers(0, 10_000),
)
def test_products_equal_dense_products(n, d, k, p, dtype, seed):
    _check(_binary(n, d, p, seed), k, dtype, seed)


def test_column_tiles_and_wide_inputs():
    """More columns than one tile (split into equal tiles), several byte positions."""
    x = _binary(70, 50, 0.3, 1)
    _check(x, TILE + 7, F64, 2)
    _check(x, 2 * TILE + 1, torch.float32, 3)


def test_results_do_not_depend_on_threads_and_keep_torch_threads():
    x = _binary(3000, 90, 0.2, 4)
    pb = PackedBinary(x)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(90, 40, generator=g)
    gr = torch.randn(3000, 40, generator=g)
    w_narrow = w[:, :3].contiguous()
    before = torch.get_num_threads()
    try:
        out = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out[threads] = (pb.matmul(w), pb.rmatmul(gr), pb.matmul(w_narrow))
            assert torch.get_num_threads() == threads  # numba's pool leaves torch's count
        for a, b in zip(out[1], out[2]):
            assert torch.equal(a, b)
    finally:
        torch.set_num_threads(before)


def test_workspace_reused_across_widths_and_dtypes():
    x = _binary(200, 30, 0.4, 6)
    pb = PackedBinary(x)
    xd = torch.from_numpy(x).to(F64)
    g = torch.Generator().manual_seed(7)
    for k, dtype in [(50, F64), (2, F64), (9, torch.float32), (120, F64), (1, torch.float32)]:
        w = torch.randn(30, k, generator=g, dtype=F64)
        gr = torch.randn(200, k, generator=g, dtype=F64)
        tol = 1e-10 if dtype == F64 else 1e-3
        torch.testing.assert_close(pb.matmul(w.to(dtype)).to(F64), xd @ w, rtol=0, atol=tol)
        torch.testing.assert_close(pb.rmatmul(gr.to(dtype)).to(F64), xd.T @ gr, rtol=0, atol=tol)


def test_products_are_differentiable():
    x = _binary(40, 19, 0.3, 8)
    pb = PackedBinary(x)
    g = torch.Generator().manual_seed(9)
    w = torch.randn(19, 3, generator=g, dtype=F64, requires_grad=True)
    gr = torch.randn(40, 8, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(pb.matmul, (w,))
    assert torch.autograd.gradcheck(pb.rmatmul, (gr,))


def test_packed_binary_accepts_bool_int_float_and_tensors():
    x = _binary(20, 11, 0.5, 10)
    ref = PackedBinary(x).bits
    for v in (x.astype(bool), x.astype(np.int64), x.astype(np.float32), torch.from_numpy(x)):
        assert np.array_equal(PackedBinary(v).bits, ref)
    assert PackedBinary(x).shape == (20, 11)


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (np.zeros(5), ValueError, "x must be"),
        (np.full((3, 4), 2), ValueError, "only 0 and 1"),
        (np.array([["a", "b"]]), TypeError, "x must hold 0/1"),
    ],
)
def test_packed_binary_refuses_bad_input(bad, error, match):
    with pytest.raises(error, match=match):
        PackedBinary(bad)


def test_products_refuse_bad_operands():
    pb = PackedBinary(_binary(10, 6, 0.5, 11))
    with pytest.raises(ValueError, match="w must have 6 rows"):
        pb.matmul(torch.zeros(5, 2))
    with pytest.raises(ValueError, match="g must have 10 rows"):
        pb.rmatmul(torch.zeros(6, 2))
    with pytest.raises(TypeError, match="float32 or float64"):
        pb.matmul(torch.zeros(6, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="must be a tensor"):
        pb.matmul(np.zeros((6, 2)))


def test_fit_engines_follow_the_same_path_in_float64():
    """Same objective, same L-BFGS: the iterates agree to rounding."""
    g = torch.Generator().manual_seed(12)
    x = (torch.rand(400, 21, generator=g) < 0.3).to(torch.int64)
    x[:, 3] = 0  # a constant feature: dropped by the packed engine, zero gradient in dense
    y = torch.stack([(x[:, :4].sum(1) > 1).to(F64), torch.rand(400, generator=g, dtype=F64)], 1)
    dense = fit_exp_sum(x, y, 3, iterations=40, dtype=F64, engine="dense")
    packed = fit_exp_sum(x, y, 3, iterations=40, dtype=F64, engine="packed")
    assert dense.iterations == packed.iterations
    torch.testing.assert_close(packed.train_loss, dense.train_loss, rtol=1e-9, atol=0)
    torch.testing.assert_close(
        packed.predictor.weights, dense.predictor.weights, rtol=1e-6, atol=1e-9
    )
    assert torch.equal(packed.predictor.weights[:, :, 3], dense.predictor.weights[:, :, 3])
    auto = fit_exp_sum(x, y, 3, iterations=40, dtype=F64)  # CPU: the packed engine
    assert torch.equal(auto.train_loss, packed.train_loss)


def test_fit_engine_is_checked():
    x = torch.zeros(10, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="engine must be one of"):
        fit_exp_sum(x, torch.rand(10), 1, engine="sparse")
    with pytest.raises(ValueError, match="at least one sample"):
        fit_exp_sum(x[:0], torch.rand(0), 1)


def test_narrow_and_wide_forward_agree_bitwise_with_themselves():
    """The two forward kernels sum a row's bytes in the same order: equal results."""
    x = _binary(500, 64, 0.3, 13)
    pb = PackedBinary(x)
    w = torch.randn(64, NARROW + 1, generator=torch.Generator().manual_seed(14))
    wide = pb.matmul(w)
    narrow = torch.cat([pb.matmul(w[:, i : i + 1].contiguous()) for i in range(NARROW + 1)], 1)
    assert torch.equal(wide, narrow)
    assert bp.NARROW_BLOCK > 0


def test_forward_into_a_kept_buffer_equals_a_fresh_product():
    x = _binary(70, 21, 0.4, 12)
    pb = PackedBinary(x)
    g = torch.Generator().manual_seed(13)
    buf = torch.full((70 * 40,), float("nan"), dtype=F64)
    for k in (40, 3, 17):  # wide, narrow, wide again: the same buffer, every entry written
        w = torch.randn(21, k, generator=g, dtype=F64)
        out = buf[: 70 * k].view(70, k)
        got = pb.matmul(w, out=out)
        assert got.data_ptr() == out.data_ptr()
        assert torch.equal(got, pb.matmul(w))


def test_forward_into_refuses_bad_buffers():
    pb = PackedBinary(_binary(10, 6, 0.5, 14))
    w = torch.zeros(6, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"out must be a contiguous CPU tensor of shape \(10, 2\)"):
        pb.matmul(w, out=torch.zeros(10, 3, dtype=F64))
    with pytest.raises(ValueError, match="dtype torch.float64"):
        pb.matmul(w, out=torch.zeros(10, 2, dtype=torch.float32))
    with pytest.raises(ValueError, match="contiguous"):
        pb.matmul(w, out=torch.zeros(2, 10, dtype=F64).T)
    with pytest.raises(TypeError, match="out must be a tensor"):
        pb.matmul(w, out=np.zeros((10, 2)))
    with pytest.raises(ValueError, match="requires a gradient"):
        pb.matmul(w.clone().requires_grad_(), out=torch.zeros(10, 2, dtype=F64))
    with pytest.raises(ValueError, match="w must have 6 rows"):
        pb.matmul(torch.zeros(5, 2, dtype=F64), out=torch.zeros(10, 2, dtype=F64))
