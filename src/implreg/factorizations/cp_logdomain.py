"""CP predictors of very high order in the log domain (Razin et al. 2021, Section 5.2).

At order 784 (a binarized 28 x 28 image) the value of a CP factorization at
an input ``x`` is ``sum_r prod_{n=1}^{784} A_n[x_n, r]``: a product of 784 numbers,
which overflows or underflows in any floating-point type unless every factor
is kept near 1.  Here each term is carried as a sign and a log-magnitude:

    log|term_r| = sum_n log|A_n[x_n, r]|,   sign_r = prod_n sign(A_n[x_n, r]),

both of which are matrix products of the one-hot inputs with ``log|A|`` and with
the indicator of negative entries (its parity gives the sign).  The sum over
``r`` is then taken relative to ``max_r log|term_r|``, so it is exact up to
rounding whatever the scale.  Every operation is differentiable: autograd gives
``d/dA = (d/dlog|A|) / A``, the same as the plain product's gradient.

Factors are one tensor ``A`` of shape ``(N, L, R)``: ``N`` modes (pixels), ``L``
values per mode (2 for binary images), ``R`` components.
"""

from __future__ import annotations

import torch

from implreg.factorizations.cp import _check_tensor

Tensor = torch.Tensor


def _check_inputs(factors: Tensor, x: Tensor) -> None:
    """``factors`` floating ``(N, L, R)``; ``x`` integer ``(n, N)`` with values in ``0..L-1``."""
    _check_tensor("factors", factors, floating=True)
    _check_tensor("x", x, integer=True)
    if factors.dim() != 3 or x.dim() != 2 or x.shape[1] != factors.shape[0]:
        raise ValueError(
            f"factors must be (N, L, R) and x (n, N); got {tuple(factors.shape)}, {tuple(x.shape)}"
        )
    levels = factors.shape[1]
    if x.numel():
        low, high = int(x.min()), int(x.max())
        if low < 0 or high >= levels:
            raise ValueError(
                f"x must hold values in 0..{levels - 1} (the L = {levels} rows of each factor), "
                f"got {low if low < 0 else high}"
            )


def _one_hot_sums(x: Tensor, table: Tensor) -> Tensor:
    """``out[i, r] = sum_n table[n, x[i, n], r]`` as ``L`` matrix products, ``(n, R)``."""
    levels = table.shape[1]
    out = None
    for v in range(levels):
        term = (x == v).to(table.dtype) @ table[:, v, :]
        out = term if out is None else out + term
    assert out is not None
    return out


def log_terms(factors: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(log|term_r|, sign_r)`` for each row of ``x`` (``(n, N)`` integers), each ``(n, R)``."""
    _check_inputs(factors, x)
    log_abs = _one_hot_sums(x, torch.log(factors.abs()))
    negatives = _one_hot_sums(x, (factors < 0).to(factors.dtype)).detach()
    sign = 1.0 - 2.0 * torch.remainder(negatives, 2.0)
    return log_abs, sign


def log_abs_values(factors: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(log|value|, sign(value))`` of the CP predictor at each input, each ``(n,)``.

    Exact at any scale: values far beyond the floating-point range are represented.
    """
    log_abs, sign = log_terms(factors, x)
    top = log_abs.max(dim=1, keepdim=True).values.detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    rel = (sign * torch.exp(log_abs - top)).sum(1)
    return torch.log(rel.abs()) + top.squeeze(1), torch.sign(rel)


def values(factors: Tensor, x: Tensor) -> Tensor:
    """Values of the CP predictor at each input, ``(n,)`` (inf only where the value itself is)."""
    log_abs, sign = log_terms(factors, x)
    top = log_abs.max(dim=1, keepdim=True).values.detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return torch.exp(top.squeeze(1)) * (sign * torch.exp(log_abs - top)).sum(1)


def plain_values(factors: Tensor, x: Tensor) -> Tensor:
    """The obvious product ``sum_r prod_n A_n[x_n, r]`` (over/underflows at high order)."""
    _check_inputs(factors, x)
    n_idx = torch.arange(factors.shape[0])
    picked = factors[n_idx.unsqueeze(0), x.long(), :]  # (n, N, R)
    return picked.prod(dim=1).sum(dim=1)
