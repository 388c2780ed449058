"""Least-squares linear baseline (Razin et al. 2021 Appendix B); data from ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from implreg.baselines.linear import LinearFit, fit_linear, mse
from implreg.problems.images import discretize, load_dataset

DATA = Path(
    os.environ.get("IMPLREG_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
needs_data = pytest.mark.skipif(
    not (DATA / "mnist").is_dir(),
    reason="no MNIST: ../shared/data and $IMPLREG_DATA_DIR are absent",
)


def _design(x: np.ndarray) -> np.ndarray:
    return np.hstack([x, np.ones((x.shape[0], 1))])


def _problem(seed: int, n: int, d: int, t: int, rank: int | None):
    """Features ``(n, d)`` (of rank ``rank`` when given, with a zero and a repeated column)."""
    rng = np.random.default_rng(seed)
    if rank is None:
        x = rng.standard_normal((n, d))
    else:
        x = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d))
        x[:, 0] = 0.0
        if d > 2:
            x[:, -1] = x[:, 1]
    return x, rng.standard_normal((n, t))


def _check_against_numpy(x, y, rcond):
    fit = fit_linear(torch.from_numpy(x), torch.from_numpy(y), rcond=rcond)
    ref, *_ = np.linalg.lstsq(_design(x), y, rcond=rcond)
    assert fit.weights.shape == (y.shape[1], x.shape[1]) and fit.bias.shape == (y.shape[1],)
    assert fit.weights.dtype == torch.float64
    got = torch.cat([fit.weights, fit.bias[:, None]], dim=1).T.numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-7, atol=1e-9 * max(1.0, np.abs(ref).max()))
    return fit


@given(
    seed=st.integers(0, 2**31),
    d=st.integers(1, 6),
    extra=st.integers(0, 8),
    t=st.integers(1, 3),
)
def test_full_rank_matches_numpy(seed, d, extra, t):
    x, y = _problem(seed, d + 1 + extra, d, t, None)
    fit = _check_against_numpy(x, y, None)
    assert fit.rank == d + 1


@given(
    seed=st.integers(0, 2**31),
    d=st.integers(2, 8),
    n=st.integers(1, 12),
    rank=st.integers(1, 3),
    t=st.integers(1, 3),
)
def test_rank_deficient_matches_numpy(seed, d, n, rank, t):
    # Zero and duplicated columns, low-rank products and n < D + 1 (underdetermined).
    x, y = _problem(seed, n, d, t, min(rank, d))
    _check_against_numpy(x, y, 1e-10)


def test_minimum_norm_is_the_pseudo_inverse_solution():
    x, y = _problem(3, 9, 7, 2, 2)
    fit = fit_linear(torch.from_numpy(x), torch.from_numpy(y))
    got = torch.cat([fit.weights, fit.bias[:, None]], dim=1).T.numpy()
    np.testing.assert_allclose(got, np.linalg.pinv(_design(x)) @ y, rtol=1e-8, atol=1e-10)
    assert np.all(got[0] == 0) or np.abs(got[0]).max() < 1e-12  # the zero column gets no weight
    assert fit.rank == 3  # two random directions plus the bias


@given(seed=st.integers(0, 2**31), deficient=st.booleans())
def test_residual_is_orthogonal_to_the_column_space(seed, deficient):
    x, y = _problem(seed, 30, 6, 3, 3 if deficient else None)
    fit = fit_linear(torch.from_numpy(x), torch.from_numpy(y))
    resid = y - fit.predict(torch.from_numpy(x)).numpy()
    a = _design(x)
    scale = np.linalg.norm(a) * np.linalg.norm(y)
    assert np.abs(a.T @ resid).max() < 1e-12 * scale


def test_exact_recovery_of_a_noiseless_linear_target():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, size=(200, 12)).astype(np.float32)  # binary pixels, as in Figure 4
    w = rng.standard_normal((3, 12))
    b = rng.standard_normal(3)
    y = x.astype(np.float64) @ w.T + b
    fit = fit_linear(torch.from_numpy(x), torch.from_numpy(y))
    np.testing.assert_allclose(fit.weights.numpy(), w, atol=1e-10)
    np.testing.assert_allclose(fit.bias.numpy(), b, atol=1e-10)
    assert float(mse(fit.predict(torch.from_numpy(x)), torch.from_numpy(y)).max()) < 1e-20
    # The returned dataclass predicts with plain float64 algebra.
    manual = LinearFit(torch.from_numpy(w), torch.from_numpy(b)).predict(x)
    np.testing.assert_allclose(manual.numpy(), y, atol=1e-12)


def test_mse_and_clipping_match_the_definition():
    rng = np.random.default_rng(1)
    pred = rng.normal(0.5, 1.0, size=(50, 4))
    y = rng.integers(0, 2, size=(50, 4)).astype(np.float64)
    sq = (pred - y) ** 2
    assert (sq > 1).any() and (sq < 1).any()
    np.testing.assert_allclose(mse(torch.from_numpy(pred), torch.from_numpy(y)), sq.mean(0))
    for clip in (1.0, 0.25):
        got = mse(torch.from_numpy(pred), torch.from_numpy(y), clip=clip)
        np.testing.assert_allclose(got.numpy(), np.minimum(sq, clip).mean(0), rtol=1e-14)
    assert mse(torch.from_numpy(pred), torch.from_numpy(y), clip=1.0).shape == (4,)
    # float32 inputs are accumulated in float64; vectors give a scalar.
    one = mse(torch.tensor([0.0, 2.0], dtype=torch.float32), torch.tensor([1.0, 0.0]), clip=1.0)
    assert one.dtype == torch.float64 and one.ndim == 0 and float(one) == 1.0


def test_shape_errors_raise_value_error():
    x, y = torch.zeros(5, 3), torch.zeros(5, 2)
    with pytest.raises(ValueError, match="matrix"):
        fit_linear(torch.zeros(5), y)
    with pytest.raises(ValueError, match="matrix"):
        fit_linear(x, torch.zeros(5))
    with pytest.raises(ValueError, match="5 rows but targets have 4"):
        fit_linear(x, torch.zeros(4, 2))
    with pytest.raises(ValueError, match="at least one"):
        fit_linear(torch.zeros(0, 3), torch.zeros(0, 2))
    with pytest.raises(ValueError, match="finite"):
        fit_linear(torch.full((5, 3), float("nan")), y)
    fit = fit_linear(torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2))
    with pytest.raises(ValueError, match="4 columns but the fit has 3"):
        fit.predict(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="differ in shape"):
        mse(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"\(n,\) or \(n, T\)"):
        mse(torch.zeros(2, 2, 2), torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="clip must be positive"):
        mse(torch.zeros(5, 2), torch.zeros(5, 2), clip=0.0)


@needs_data
def test_linear_predictors_cannot_fit_mnist():
    # Appendix B: no linear predictor fits MNIST accurately.  Measured (torch 2.13, gelsd):
    # first 10000 binarized train images, mean train MSE over the ten one-vs-all tasks 0.0358
    # (per class 0.024 ... 0.045; numerical rank 636 of 785); on all 60000 images 0.0390, while
    # the paper's CP predictors reach 0.023 at tensor rank 1 and 0.002 at rank 15.
    train = load_dataset("mnist", DATA)["train"]
    x = torch.from_numpy(discretize(train.images[:10000]))
    labels = train.labels[:10000]
    y = torch.from_numpy((labels[:, None] == np.arange(10)[None, :]).astype(np.float64))
    # One thread: MKL's multithreaded gelsd was seen to take 17 s instead of 0.3 s here while
    # other processes loaded both cores (1 thread: 0.4 s idle, at most 1.6 s loaded).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit = fit_linear(x, y)
    finally:
        torch.set_num_threads(threads)
    err = mse(fit.predict(x), y)
    assert err.shape == (10,)
    assert fit.rank is not None and fit.rank < 785  # always-zero border pixels
    assert float(err.mean()) > 0.03
    assert float(err.min()) > 0.02
    # Least squares with a bias always beats the constant predictor (the label variance).
    variance = y.var(dim=0, unbiased=False)
    assert torch.all(err < variance)
