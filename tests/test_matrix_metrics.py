"""Matrix metrics, each against its definition computed another way."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from implreg.factorizations.matrix import mf_init
from implreg.matrix_metrics import (
    balancedness,
    determinant,
    effective_rank,
    frobenius_norm,
    nuclear_norm,
    reconstruction_errors,
    schatten_quasi_norm,
    sign_changes,
    singular_values,
    spectral_norm,
)


@st.composite
def matrices(draw, max_dim: int = 6):
    batch = draw(st.sampled_from([1, 3]))
    n, k = draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, k, generator=g, dtype=torch.float64)


def gram_eigenvalues(w):
    """Eigenvalues of W^T W or W W^T (the smaller), clipped at 0: the squared singular values."""
    gram = w.transpose(-2, -1) @ w if w.shape[-1] <= w.shape[-2] else w @ w.transpose(-2, -1)
    return torch.linalg.eigvalsh(gram).clamp_min(0)


@given(matrices())
def test_singular_values_against_gram(w):
    sv = singular_values(w)
    expected = gram_eigenvalues(w).sqrt().flip(-1)
    torch.testing.assert_close(sv, expected, rtol=1e-7, atol=1e-7)
    assert sv.dtype == torch.float64


@given(matrices())
def test_norms_against_definitions(w):
    eig = gram_eigenvalues(w)
    torch.testing.assert_close(nuclear_norm(w), eig.sqrt().sum(-1), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(spectral_norm(w), eig.amax(-1).sqrt(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(frobenius_norm(w), (w * w).sum((-2, -1)).sqrt())
    torch.testing.assert_close(schatten_quasi_norm(w, 2.0), frobenius_norm(w))
    torch.testing.assert_close(schatten_quasi_norm(w, 1.0), nuclear_norm(w))
    torch.testing.assert_close(
        schatten_quasi_norm(w, 0.5), (eig.sqrt().sqrt().sum(-1)) ** 2, rtol=1e-7, atol=1e-7
    )


def test_nuclear_norm_is_trace_of_sqrtm():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(w.T @ w)
    sqrtm = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T
    torch.testing.assert_close(nuclear_norm(w), torch.trace(sqrtm))
    assert nuclear_norm(w).shape == ()


def test_single_matrix_and_float32_inputs():
    w = torch.diag(torch.tensor([3.0, 4.0]))
    assert float(frobenius_norm(w)) == pytest.approx(5.0)
    assert float(spectral_norm(w)) == pytest.approx(4.0)
    assert float(nuclear_norm(w)) == pytest.approx(7.0)
    assert float(determinant(w)) == pytest.approx(12.0)
    assert determinant(w).dtype == torch.float64


@pytest.mark.parametrize("rank", [1, 2, 5])
def test_effective_rank_of_equal_singular_values(rank):
    g = torch.Generator().manual_seed(rank)
    u, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    w = 3.0 * u[:, :rank] @ v[:, :rank].T
    assert float(effective_rank(w)) == pytest.approx(rank, rel=1e-9)


def test_effective_rank_edge_cases():
    assert float(effective_rank(torch.zeros(4, 3))) == 0.0
    batch = torch.stack([torch.zeros(3, 3), torch.eye(3), torch.diag(torch.tensor([2.0, 0, 0]))])
    torch.testing.assert_close(
        effective_rank(batch), torch.tensor([0.0, 3.0, 1.0], dtype=torch.float64)
    )
    # exact zero singular values are dropped: diag(1, 3, 0, 0) has p = (3/4, 1/4)
    w = torch.diag(torch.tensor([1.0, 3.0, 0.0, 0.0], dtype=torch.float64))
    p = np.array([0.75, 0.25])
    assert float(effective_rank(w)) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-12)
    assert not bool(torch.isnan(effective_rank(w)))


@given(matrices())
def test_effective_rank_against_definition(w):
    sv = np.linalg.svd(w.numpy(), compute_uv=False)
    expected = []
    for s in sv:
        s = s[s > 0]
        p = s / s.sum()
        expected.append(math.exp(-(p * np.log(p)).sum()))
    torch.testing.assert_close(
        effective_rank(w), torch.tensor(expected, dtype=torch.float64), rtol=1e-8, atol=1e-8
    )
    assert bool((effective_rank(w) >= 1 - 1e-9).all())


def test_schatten_rejects_bad_p():
    for p in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            schatten_quasi_norm(torch.eye(2), p)


def test_determinant():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 4, 4, generator=g)
    expected = torch.tensor([float(np.linalg.det(m)) for m in w.double().numpy()])
    torch.testing.assert_close(determinant(w), expected.double())
    with pytest.raises(ValueError):
        determinant(torch.zeros(3, 4))


def test_balancedness():
    g = torch.Generator().manual_seed(0)
    bal = mf_init((5, 5), 4, scales=[0.1, 1.0], scheme="balanced", generator=g)
    b = balancedness(bal)
    assert b.shape == (2, 3) and b.dtype == torch.float64
    assert float(b.abs().max()) < 1e-12
    gauss = mf_init((5, 5), 3, scales=[1.0], generator=g)
    b = balancedness(gauss)
    assert b.shape == (1, 2) and bool((b > 0).all())
    expected = torch.linalg.matrix_norm(gauss[1][0].T @ gauss[1][0] - gauss[0][0] @ gauss[0][0].T)
    torch.testing.assert_close(b[0, 0], expected)
    assert balancedness(gauss[:1]).shape == (1, 0)


def test_reconstruction_errors_ignore_observed_entries():
    truth = torch.arange(6, dtype=torch.float64).view(2, 3)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    w = truth.clone()
    w[mask] += 100.0  # errors on observed entries only
    w[0, 1] += 2.0  # one unobserved error of 2 among three unobserved entries
    out = reconstruction_errors(w, truth, mask)
    assert float(out["test_mse"]) == pytest.approx(4.0 / 3.0)
    assert float(out["train_mse"]) == pytest.approx(1e4)
    assert float(out["mse"]) == pytest.approx((3 * 1e4 + 4.0) / 6.0)
    batch = torch.stack([w, truth.float()])
    out = reconstruction_errors(batch, truth, mask)
    torch.testing.assert_close(out["test_mse"], torch.tensor([4.0 / 3.0, 0.0], dtype=torch.float64))
    full = reconstruction_errors(w, truth, torch.ones(2, 3, dtype=torch.bool))
    assert math.isnan(float(full["test_mse"]))
    with pytest.raises(ValueError):
        reconstruction_errors(w, truth, torch.ones(3, 2, dtype=torch.bool))


def test_sign_changes():
    series = [0.5, 0.2, 0.0, -0.1, float("nan"), -0.3, float("inf"), 0.0, 0.4, 0.4, -1e-30]
    assert sign_changes(series) == [3, 8, 10]
    assert sign_changes(torch.tensor(series)) == [3, 8, 10]
    assert sign_changes(np.array([0.0, -1.0, 2.0])) == [2]
    assert sign_changes([]) == []
    assert sign_changes([1.0, 2.0, 3.0]) == []
