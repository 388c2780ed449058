"""Float64 metrics of end matrices of deep matrix factorization (Arora et al. 2019).

Every metric accepts a batch of matrices ``(B, n, n')`` and returns one value per
batch entry (``(B,)``), or a single matrix ``(n, n')`` and returns a 0-d tensor.
Inputs are converted to float64 first, as Arora et al. 2019 compute the effective
rank; the quantities follow Arora, Cohen, Hu & Luo (2019) and Razin & Cohen (2020).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

import torch

Tensor = torch.Tensor


def _as_matrices(x: Tensor, name: str = "x") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor (n, n') or (B, n, n'), got {type(x).__name__}")
    if x.is_complex():
        raise TypeError(f"{name} must be real, got dtype {x.dtype}")
    if x.dim() not in (2, 3):
        raise ValueError(
            f"{name} must be a matrix (n, n') or a batch (B, n, n'), got shape {tuple(x.shape)}"
        )
    return x.to(torch.float64)


def singular_values(x: Tensor) -> Tensor:
    """Singular values in descending order, float64, ``(..., min(n, n'))``.

    Parameters
    ----------
    x : Tensor
        ``(n, n')`` or ``(B, n, n')``.

    Returns
    -------
    Tensor
        ``(min(n, n'),)`` or ``(B, min(n, n'))``.
    """
    return torch.linalg.svdvals(_as_matrices(x))


def effective_rank(x: Tensor) -> Tensor:
    """Effective rank of Roy & Vetterli (2007): ``exp(-sum_i p_i log p_i)``, ``p_i = s_i / sum s``.

    Zero singular values are dropped (``0 log 0 = 0``); a zero matrix has effective
    rank 0 (Arora et al. 2019).  Computed in float64.

    Parameters
    ----------
    x : Tensor
        ``(n, n')`` or ``(B, n, n')``.

    Returns
    -------
    Tensor
        0-d or ``(B,)``, float64.
    """
    sv = singular_values(x)
    total = sv.sum(-1, keepdim=True)
    p = sv / torch.where(total > 0, total, 1.0)
    safe = torch.where(p > 0, p, 1.0)
    entropy = -(torch.where(p > 0, p * safe.log(), 0.0)).sum(-1)
    return torch.where(total.squeeze(-1) > 0, entropy.exp(), 0.0)


def nuclear_norm(x: Tensor) -> Tensor:
    """Nuclear norm ``sum_i s_i`` (float64), 0-d or ``(B,)``."""
    return singular_values(x).sum(-1)


def frobenius_norm(x: Tensor) -> Tensor:
    """Frobenius norm ``sqrt(sum_ij x_ij^2)`` (float64), 0-d or ``(B,)``."""
    return torch.linalg.matrix_norm(_as_matrices(x), ord="fro")


def spectral_norm(x: Tensor) -> Tensor:
    """Spectral norm (largest singular value, float64), 0-d or ``(B,)``."""
    return singular_values(x).amax(-1)


def schatten_quasi_norm(x: Tensor, p: float) -> Tensor:
    """Schatten ``p``-(quasi-)norm ``(sum_i s_i^p)^(1/p)`` for ``p > 0`` (float64).

    ``p = 1`` is the nuclear norm, ``p = 2`` the Frobenius norm; ``p < 1`` gives the
    quasi-norms of Razin & Cohen (2020).

    Parameters
    ----------
    x : Tensor
        ``(n, n')`` or ``(B, n, n')``.
    p : float
        Positive finite exponent.

    Returns
    -------
    Tensor
        0-d or ``(B,)``.
    """
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"the Schatten exponent p must be a real number, got {type(p).__name__}")
    p = float(p)
    if not (math.isfinite(p) and p > 0):
        raise ValueError(f"the Schatten exponent p must be a positive finite number, got {p}")
    return singular_values(x).pow(p).sum(-1).pow(1.0 / p)


def determinant(x: Tensor) -> Tensor:
    """Determinant of a square matrix or batch of square matrices (float64)."""
    x = _as_matrices(x)
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"the determinant needs square matrices, got shape {tuple(x.shape)}")
    return torch.linalg.det(x)


def balancedness(layers: Sequence[Tensor]) -> Tensor:
    """``||W_{j+1}^T W_{j+1} - W_j W_j^T||_F`` for each consecutive pair of layers, ``(B, N-1)``.

    Zero for a balanced factorization (Arora et al. 2019); conserved by gradient flow.

    Parameters
    ----------
    layers : sequence of Tensor
        Layer ``j`` of shape ``(B, d_{j+1}, d_j)`` (see
        :mod:`implreg.factorizations.matrix`).

    Returns
    -------
    Tensor
        float64, ``(B, N - 1)`` (``(B, 0)`` for depth 1).
    """
    from implreg.factorizations.matrix import _check_layers

    _check_layers(layers)
    ls = [w.to(torch.float64) for w in layers]
    batch = ls[0].shape[0]
    out = [
        torch.linalg.matrix_norm(
            ls[j + 1].transpose(1, 2) @ ls[j + 1] - ls[j] @ ls[j].transpose(1, 2), ord="fro"
        )
        for j in range(len(ls) - 1)
    ]
    if not out:
        return torch.zeros(batch, 0, dtype=torch.float64)
    return torch.stack(out, dim=-1)


def reconstruction_errors(w: Tensor, truth: Tensor, observed_mask: Tensor) -> dict[str, Tensor]:
    """Mean squared errors of ``w`` against ``truth`` (float64).

    Parameters
    ----------
    w : Tensor
        ``(n, n')`` or ``(B, n, n')``.
    truth : Tensor
        ``(n, n')``.
    observed_mask : Tensor
        Boolean ``(n, n')``: the observed (training) entries.

    Returns
    -------
    dict
        ``"mse"``: over all entries; ``"test_mse"``: over unobserved entries only
        (NaN when every entry is observed); ``"train_mse"``: over observed entries
        only (NaN when none is).  Each 0-d or ``(B,)``.
    """
    w = _as_matrices(w, "w")
    if not isinstance(truth, Tensor) or truth.is_complex():
        raise TypeError(f"truth must be a real tensor (n, n'), got {type(truth).__name__}")
    if not isinstance(observed_mask, Tensor):
        raise TypeError(f"observed_mask must be a bool tensor, got {type(observed_mask).__name__}")
    if observed_mask.is_floating_point() or observed_mask.is_complex():
        raise TypeError(f"observed_mask must be a bool tensor, got dtype {observed_mask.dtype}")
    truth = truth.to(torch.float64)
    mask = observed_mask.to(torch.bool)
    if truth.shape != w.shape[-2:] or mask.shape != w.shape[-2:]:
        raise ValueError(
            f"truth and observed_mask must have shape {tuple(w.shape[-2:])}, "
            f"got {tuple(truth.shape)} and {tuple(mask.shape)}"
        )
    err = (w - truth).square()

    def masked_mean(m: Tensor) -> Tensor:
        count = int(m.sum())
        if count == 0:
            return torch.full(err.shape[:-2], math.nan, dtype=torch.float64)
        return (err * m).sum((-2, -1)) / count

    return {
        "mse": err.mean((-2, -1)),
        "test_mse": masked_mean(~mask),
        "train_mse": masked_mean(mask),
    }


def sign_changes(det_series: Iterable[float] | Tensor) -> list[int]:
    """Indices whose sign differs from the previous finite nonzero value of the series.

    Zeros and non-finite values are skipped: they neither count as a change nor
    become the reference for the next value.  Used to flag discrete GD crossing
    ``det(W_e) = 0`` (Razin & Cohen 2020).

    Parameters
    ----------
    det_series : iterable of float or Tensor
        1-D series, for example ``det(W_e)`` over iterations.

    Returns
    -------
    list of int
        Positions ``t`` with ``sign(x_t) != sign(x_s)``, ``s < t`` the last finite
        nonzero position before ``t``.
    """
    if isinstance(det_series, Tensor):
        values = det_series.detach().to(torch.float64).reshape(-1).tolist()
    else:
        values = [float(v) for v in det_series]
    out: list[int] = []
    previous = 0.0
    for t, v in enumerate(values):
        if not math.isfinite(v) or v == 0:
            continue
        if previous != 0 and (v > 0) != (previous > 0):
            out.append(t)
        previous = v
    return out
