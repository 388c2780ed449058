"""CP (CANDECOMP/PARAFAC) tensor factorization.

Implements the objects of Razin, Maman & Cohen, "Implicit Regularization in
Tensor Factorization" (ICML 2021):

* the end tensor ``W_e = sum_r w_r^1 (x) ... (x) w_r^N`` (paper eq. 3);
* component norms ``||w_r^1 (x) ... (x) w_r^N|| = prod_n ||w_r^n||``;
* the unbalancedness magnitude (paper Definition 1);
* ``gamma_r = <-grad L(W_e), (x)_n w_r^n / ||w_r^n||>`` (paper Theorem 1).

Conventions
-----------
Factors are a list of ``N`` tensors of shape ``(B, d_n, R)``: ``B`` independent
factorizations (for example one per initialization scale) are stored side by
side so that several runs share one vectorized pass.  Column ``r`` of factor
``n`` is the weight vector ``w_r^n`` of the paper.  Index tuples are integer
tensors of shape ``(m, N)``; entries are laid out row-major (the last mode
varies fastest), as in ``torch.reshape``.

The fast loss gradients live in :mod:`implreg.factorizations.cp_engine`.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence

import torch

Tensor = torch.Tensor


def _check_factors(factors: Sequence[Tensor]) -> tuple[int, int]:
    if len(factors) < 1:
        raise ValueError("a CP factorization needs at least one factor")
    batch, _, rank = factors[0].shape
    for f in factors:
        if f.dim() != 3 or f.shape[0] != batch or f.shape[2] != rank:
            raise ValueError(
                "every factor must have shape (B, d_n, R) with the same B and R; "
                f"got {[tuple(f.shape) for f in factors]}"
            )
    return batch, rank


def cp_init(
    dims: Sequence[int],
    rank: int,
    *,
    stds: Sequence[float],
    mean: float = 0.0,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
) -> list[Tensor]:
    """Random factors with i.i.d. entries ``N(mean, std^2)``, one batch entry per std.

    One standard-normal draw ``Z`` is shared by all batch entries, which are
    ``mean + std_b * Z``: runs that differ only in initialization scale then
    start from the same direction, as in the paper's Figure 3 comparison.
    """
    dims = [int(d) for d in dims]
    if any(d < 1 for d in dims) or rank < 1:
        raise ValueError(f"mode sizes and rank must be positive, got dims={dims}, rank={rank}")
    scale = torch.tensor([float(s) for s in stds], dtype=torch.float64).view(-1, 1, 1)
    out = []
    for d in dims:
        z = torch.randn(1, d, rank, generator=generator, dtype=torch.float64)
        out.append((mean + scale * z).to(dtype))
    return out


def cp_to_tensor(factors: Sequence[Tensor]) -> Tensor:
    """End tensor ``sum_r w_r^1 (x) ... (x) w_r^N`` (paper eq. 3), shape ``(B, d_1, ..., d_N)``.

    Materializes ``prod_n d_n`` entries per batch entry: use only when that is small.
    Computed as one matrix product between the Khatri-Rao products of the two
    halves of the modes.
    """
    batch, rank = _check_factors(factors)
    dims = [f.shape[1] for f in factors]
    n = len(factors)
    k = balanced_split(dims)
    left = khatri_rao(factors[:k])
    if k == n:
        return left.sum(-1).reshape(batch, *dims)
    right = khatri_rao(factors[k:])
    return torch.matmul(left, right.transpose(1, 2)).reshape(batch, *dims)


def khatri_rao(factors: Sequence[Tensor]) -> Tensor:
    """Column-wise Khatri-Rao product of ``(B, d_n, R)`` factors: ``(B, prod d_n, R)``.

    Row ``(i_1, ..., i_k)`` (row-major, last mode fastest) of column ``r`` holds
    ``prod_n factors[n][i_n, r]``.
    """
    out = factors[0]
    batch, _, rank = out.shape
    for f in factors[1:]:
        out = (out.unsqueeze(2) * f.unsqueeze(1)).reshape(batch, -1, rank)
    return out


def khatri_rao_backward(factors: Sequence[Tensor], grad: Tensor) -> list[Tensor]:
    """Gradients with respect to ``factors`` of ``<grad, khatri_rao(factors)>``.

    ``grad`` has shape ``(B, prod d_n, R)``.  For mode ``n`` this is the partial
    MTTKRP ``sum_{i_k, k != n} grad[(i_1..i_K), r] prod_{k != n} factors[k][i_k, r]``.
    """
    batch, _, rank = grad.shape
    dims = [f.shape[1] for f in factors]
    k = len(factors)
    if k == 1:
        return [grad]
    g = grad.reshape(batch, *dims, rank)
    if k == 2:
        a, b = factors
        return [(g * b.unsqueeze(1)).sum(2), (g * a.unsqueeze(2)).sum(1)]
    letters = string.ascii_letters[:k]
    out = []
    for n in range(k):
        operands = [g] + [factors[j] for j in range(k) if j != n]
        spec = (
            "Z"
            + letters
            + "Y,"
            + ",".join("Z" + letters[j] + "Y" for j in range(k) if j != n)
            + "->Z"
            + letters[n]
            + "Y"
        )
        out.append(torch.einsum(spec, *operands))
    return out


def balanced_split(dims: Sequence[int]) -> int:
    """Number ``k`` of leading modes whose size product is closest to ``sqrt(prod dims)``.

    Used to lay the end tensor out as a ``prod(dims[:k]) x prod(dims[k:])`` matrix
    so that it is the product of two Khatri-Rao matrices.
    """
    n = len(dims)
    if n == 1:
        return 1
    logs = [math.log(d) for d in dims]
    total = sum(logs)
    best, best_cost = 1, math.inf
    acc = 0.0
    for k in range(1, n):
        acc += logs[k - 1]
        cost = abs(acc - total / 2)
        if cost < best_cost - 1e-12:
            best, best_cost = k, cost
    return best


def cp_values(factors: Sequence[Tensor], idx: Tensor, *, chunk: int = 65536) -> Tensor:
    """Entries of the end tensor at index tuples ``idx`` (``(m, N)``), shape ``(B, m)``.

    Never builds the end tensor: each entry is ``sum_r prod_n W^n[i_n, r]``,
    evaluated over chunks of ``chunk`` tuples.
    """
    batch, rank = _check_factors(factors)
    if idx.dim() != 2 or idx.shape[1] != len(factors):
        raise ValueError(f"idx must have shape (m, {len(factors)}), got {tuple(idx.shape)}")
    outs = []
    for start in range(0, idx.shape[0], chunk):
        sub = idx[start : start + chunk]
        prod = factors[0][:, sub[:, 0], :]
        for n in range(1, len(factors)):
            prod = prod * factors[n][:, sub[:, n], :]
        outs.append(prod.sum(-1))
    if not outs:
        return factors[0].new_zeros(batch, 0)
    return torch.cat(outs, dim=1)


def cp_component_norms(factors: Sequence[Tensor]) -> Tensor:
    """Norms ``||w_r^1 (x) ... (x) w_r^N|| = prod_n ||w_r^n||`` of all components, ``(B, R)``."""
    _check_factors(factors)
    out = torch.linalg.vector_norm(factors[0], dim=1)
    for f in factors[1:]:
        out = out * torch.linalg.vector_norm(f, dim=1)
    return out


def cp_unbalancedness(factors: Sequence[Tensor]) -> Tensor:
    """Unbalancedness magnitude (paper Definition 1), one value per batch entry, ``(B,)``.

    ``max_{r, n, n'} | ||w_r^n||^2 - ||w_r^{n'}||^2 |``; conserved by gradient flow (Lemma 1).
    """
    _check_factors(factors)
    sq = torch.stack([(f * f).sum(1) for f in factors], dim=0)  # (N, B, R)
    return (sq.amax(0) - sq.amin(0)).amax(-1)


def cp_frobenius_norm(factors: Sequence[Tensor]) -> Tensor:
    """Frobenius norm of the end tensor without building it, ``(B,)``.

    ``||W_e||^2 = sum_{r,s} prod_n <w_r^n, w_s^n>`` (Hadamard product of Gram matrices).
    """
    _check_factors(factors)
    gram = None
    for f in factors:
        g = f.transpose(1, 2) @ f
        gram = g if gram is None else gram * g
    assert gram is not None
    return gram.sum((1, 2)).clamp_min(0).sqrt()


def cp_gammas(factors: Sequence[Tensor], grad_end: Tensor) -> Tensor:
    """``gamma_r = <-grad L(W_e), (x)_n w_r^n/||w_r^n||>`` of paper Theorem 1, ``(B, R)``.

    ``grad_end`` is the gradient of the loss with respect to the end tensor,
    shape ``(B, d_1, ..., d_N)``.  Components with a zero factor get gamma 0.
    """
    batch, rank = _check_factors(factors)
    unit = []
    for f in factors:
        nrm = torch.linalg.vector_norm(f, dim=1, keepdim=True)
        unit.append(torch.where(nrm > 0, f / nrm.clamp_min(torch.finfo(f.dtype).tiny), 0.0))
    kr = khatri_rao(unit)  # (B, P, R)
    return -(grad_end.reshape(batch, 1, -1) @ kr).squeeze(1)


def cp_gammas_sparse(factors: Sequence[Tensor], idx: Tensor, grad_values: Tensor) -> Tensor:
    """``gamma_r`` for a loss gradient supported on the index tuples ``idx`` only.

    ``grad_values`` (``(B, m)``) are the entries of ``grad L(W_e)`` at ``idx``; this is
    the completion case, where the end tensor need not be built.
    """
    _check_factors(factors)
    prod = None
    for n, f in enumerate(factors):
        nrm = torch.linalg.vector_norm(f, dim=1, keepdim=True)
        u = torch.where(nrm > 0, f / nrm.clamp_min(torch.finfo(f.dtype).tiny), 0.0)
        g = u[:, idx[:, n], :]
        prod = g if prod is None else prod * g
    assert prod is not None
    return -(grad_values.unsqueeze(1) @ prod).squeeze(1)
