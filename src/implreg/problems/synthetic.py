"""Low-CP-rank ground truths, completion and sensing observations (Razin et al. 2021, Sec. 5.1).

Every random draw goes through an explicit ``torch.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from implreg.factorizations.cp import (
    _check_dims,
    _check_factors,
    _check_float_dtype,
    _check_generator,
    _check_int,
    _check_real,
    cp_frobenius_norm,
    cp_to_tensor,
    cp_values,
)

Tensor = torch.Tensor


@dataclass
class CPTensor:
    """A tensor held in CP form: factors of shape ``(1, d_n, rank)``."""

    factors: list[Tensor]

    def __post_init__(self) -> None:
        batch, _ = _check_factors(self.factors)
        if batch != 1:
            raise ValueError(
                f"factors of a CPTensor must have shape (1, d_n, rank), got batch {batch}"
            )

    @property
    def dims(self) -> list[int]:
        return [f.shape[1] for f in self.factors]

    @property
    def size(self) -> int:
        return math.prod(self.dims)

    def values(self, idx: Tensor) -> Tensor:
        """Entries at index tuples ``idx`` (``(m, N)``), shape ``(m,)``."""
        return cp_values(self.factors, idx)[0]

    def dense(self) -> Tensor:
        """The full tensor, shape ``dims``."""
        return cp_to_tensor(self.factors)[0]

    def norm(self) -> float:
        return float(cp_frobenius_norm(self.factors)[0])


def low_cp_rank_tensor(
    dims: Sequence[int],
    rank: int,
    *,
    norm: float,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
) -> CPTensor:
    """Ground truth of CP rank ``rank``: factors i.i.d. N(0, 1), rescaled to norm ``norm``.

    Razin et al. 2021, Figure 3 (order 4, modes of size 10, rank 5, norm 1).  The rescaling is
    spread evenly over the factors and computed without building the tensor.
    """
    dims = _check_dims("dims", dims)
    rank = _check_int("rank", rank, minimum=1)
    norm = _check_real("norm", norm, positive=True)
    _check_generator("generator", generator)
    _check_float_dtype("dtype", dtype)
    factors = [torch.randn(1, d, rank, generator=generator, dtype=torch.float64) for d in dims]
    current = float(cp_frobenius_norm(factors)[0])
    scale = (norm / current) ** (1.0 / len(dims))
    return CPTensor([(f * scale).to(dtype) for f in factors])


def sample_indices(dims: Sequence[int], m: int, *, generator: torch.Generator) -> Tensor:
    """``m`` distinct index tuples drawn uniformly without replacement, shape ``(m, N)``.

    Refuses ``m`` larger than the number of entries.  For small tensors a
    permutation is drawn; for large ones tuples are drawn and de-duplicated
    until ``m`` distinct ones remain (order of first draw kept).
    """
    dims = _check_dims("dims", dims)
    size = math.prod(dims)
    m = _check_int("m", m)
    if m < 1:
        raise ValueError(f"m, the number of observations, must be positive, got {m}")
    _check_generator("generator", generator)
    if m > size:
        raise ValueError(
            f"cannot observe {m} distinct entries of a tensor with only {size} entries"
        )
    if size <= 1 << 24:
        lin = torch.randperm(size, generator=generator)[:m]
        return torch.stack(torch.unravel_index(lin, dims), dim=1)
    chosen = torch.empty(0, len(dims), dtype=torch.int64)
    while chosen.shape[0] < m:
        need = m - chosen.shape[0]
        draw = torch.stack(
            [torch.randint(0, d, (need + need // 8 + 16,), generator=generator) for d in dims],
            dim=1,
        )
        allx = torch.cat([chosen, draw])
        _, inverse = torch.unique(allx, dim=0, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1,), allx.shape[0], dtype=torch.int64)
        first.scatter_reduce_(0, inverse, torch.arange(allx.shape[0]), reduce="amin")
        keep = torch.sort(first).values
        chosen = allx[keep][:m]
    return chosen


@dataclass
class Completion:
    """Tensor completion: values ``y`` of the ground truth at index tuples ``idx``."""

    truth: CPTensor
    idx: Tensor
    y: Tensor

    @property
    def m(self) -> int:
        return self.idx.shape[0]


def completion_problem(truth: CPTensor, m: int, *, generator: torch.Generator) -> Completion:
    """Observe ``m`` entries of ``truth`` drawn uniformly without replacement."""
    if not isinstance(truth, CPTensor):
        raise TypeError(f"truth must be a CPTensor, got {type(truth).__name__}")
    idx = sample_indices(truth.dims, m, generator=generator)
    return Completion(truth, idx, truth.values(idx))


@dataclass
class Sensing:
    """Tensor sensing ``y_i = <X_i, W*>``.

    ``measurements`` is the ``m x prod(dims)`` matrix whose rows are the
    flattened ``X_i`` (kind ``gaussian``), or ``vectors`` holds ``N`` matrices
    ``(m, d_n)`` with ``X_i = x_i^1 (x) ... (x) x_i^N`` (kind ``rank_one``).
    """

    truth: CPTensor
    kind: str
    y: Tensor
    measurements: Tensor | None = None
    vectors: list[Tensor] | None = None

    @property
    def m(self) -> int:
        return self.y.shape[0]


def sensing_problem(truth: CPTensor, m: int, *, kind: str, generator: torch.Generator) -> Sensing:
    """Gaussian sensing: ``X_i`` entries i.i.d. of variance ``1 / #entries`` (Razin et al. 2021).

    ``kind='gaussian'``: dense ``X_i`` (needs ``m x #entries`` numbers).
    ``kind='rank_one'``: ``X_i = x_i^1 (x) ... (x) x_i^N`` with ``x_i^n ~ N(0, I/d_n)``,
    so each entry of ``X_i`` also has variance ``1/#entries``; never built.
    """
    if not isinstance(truth, CPTensor):
        raise TypeError(f"truth must be a CPTensor, got {type(truth).__name__}")
    m = _check_int("m", m)
    if m < 1:
        raise ValueError(f"m, the number of measurements, must be positive, got {m}")
    _check_generator("generator", generator)
    dtype = truth.factors[0].dtype
    if kind == "gaussian":
        size = truth.size
        x = torch.randn(m, size, generator=generator, dtype=dtype) / math.sqrt(size)
        y = x @ truth.dense().reshape(-1)
        return Sensing(truth, kind, y, measurements=x)
    if kind == "rank_one":
        vecs = [
            torch.randn(m, d, generator=generator, dtype=dtype) / math.sqrt(d) for d in truth.dims
        ]
        prod = None
        for v, f in zip(vecs, truth.factors):
            c = v @ f[0]
            prod = c if prod is None else prod * c
        assert prod is not None
        return Sensing(truth, kind, prod.sum(-1), vectors=vecs)
    raise ValueError(f"unknown measurement kind {kind!r}; use 'gaussian' or 'rank_one'")


def low_rank_matrix(
    shape: Sequence[int], rank: int, *, norm: float, generator: torch.Generator
) -> Tensor:
    """``U V^T`` with ``U, V`` i.i.d. N(0, 1) of width ``rank``, rescaled to Frobenius ``norm``.

    Arora et al. 2019: 100 x 100, rank 5, norm 100 (entries of RMS 1).
    Float64.
    """
    sizes = _check_dims("shape", shape)
    if len(sizes) != 2:
        raise ValueError(f"shape must be two sizes (n_rows, n_cols), got {tuple(sizes)}")
    n_rows, n_cols = sizes
    rank = _check_int("rank", rank, minimum=1)
    norm = _check_real("norm", norm, positive=True)
    _check_generator("generator", generator)
    u = torch.randn(n_rows, rank, generator=generator, dtype=torch.float64)
    v = torch.randn(n_cols, rank, generator=generator, dtype=torch.float64)
    w = u @ v.T
    return w * (norm / w.norm())
