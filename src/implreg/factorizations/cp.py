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
import numbers
import operator
import string
from collections.abc import Iterable, Sequence

import torch

Tensor = torch.Tensor

# ---------------------------------------------------------------- argument checks
#
# Shared by the public entry points of the factorization, problem and optimizer
# modules.  Each raises a one-sentence TypeError (wrong kind of value) or
# ValueError (right kind, wrong value) that names the argument and what was given.


def _check_int(name: str, value, *, minimum: int | None = None) -> int:
    """``value`` as an ``int``: integral numbers only (``3``, ``3.0``; not ``2.5``, ``True``)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        out = operator.index(value)
    except TypeError:
        if not isinstance(value, numbers.Real):
            raise TypeError(
                f"{name} must be an integer, got {type(value).__name__} {value!r}"
            ) from None
        if not (math.isfinite(value) and float(value).is_integer()):
            raise ValueError(f"{name} must be an integer, got {value!r}") from None
        out = int(value)
    if minimum is not None and out < minimum:
        what = {0: "a non-negative integer", 1: "a positive integer"}.get(
            minimum, f"an integer >= {minimum}"
        )
        raise ValueError(f"{name} must be {what}, got {out}")
    return out


def _check_real(
    name: str,
    value,
    *,
    positive: bool = False,
    nonnegative: bool = False,
    finite: bool = True,
) -> float:
    """``value`` as a ``float``, refusing non-numbers, NaN and (by default) infinities."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    out = float(value)
    if math.isnan(out) or (finite and math.isinf(out)):
        raise ValueError(f"{name} must be a finite number, got {out}")
    if positive and not out > 0:
        raise ValueError(f"{name} must be positive, got {out}")
    if nonnegative and not out >= 0:
        raise ValueError(f"{name} must be non-negative, got {out}")
    return out


def _check_dims(name: str, dims) -> list[int]:
    """Mode sizes: a non-empty sequence of positive integers."""
    if isinstance(dims, (str, bytes)) or not isinstance(dims, Iterable):
        raise TypeError(
            f"{name} must be a sequence of mode sizes, got {type(dims).__name__} {dims!r}"
        )
    out = [_check_int(f"{name}[{n}]", d, minimum=1) for n, d in enumerate(dims)]
    if not out:
        raise ValueError(f"{name} must hold at least one mode size, got an empty sequence")
    return out


def _check_positive_list(name: str, values) -> list[float]:
    """A non-empty sequence (list, tuple, array, 1-D tensor) of positive finite numbers."""
    if isinstance(values, Tensor) or type(values).__module__ == "numpy":
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(
            f"{name} must be a sequence of numbers (one per batch entry), "
            f"got {type(values).__name__} {values!r}"
        )
    out = [_check_real(f"{name}[{b}]", v, positive=True) for b, v in enumerate(values)]
    if not out:
        raise ValueError(f"{name} must be a non-empty list of positive finite numbers, got []")
    return out


def _check_generator(name: str, generator) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator, got {type(generator).__name__}")
    return generator


def _check_float_dtype(name: str, dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point torch.dtype, got {dtype!r}")
    return dtype


def _check_tensor(name: str, x, *, floating: bool = False, integer: bool = False) -> Tensor:
    """``x`` must be a tensor, of a floating (or integer, not bool) dtype if asked."""
    if not isinstance(x, Tensor):
        kind = (
            "a floating-point tensor"
            if floating
            else "an integer tensor"
            if integer
            else "a tensor"
        )
        raise TypeError(f"{name} must be {kind}, got {type(x).__name__}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if integer and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got dtype {x.dtype}")
    return x


def _check_finite(name: str, x: Tensor) -> None:
    """All entries finite (one reduction and one device sync: for constructors only)."""
    if x.numel() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} must be finite, got {bad} non-finite value(s)")


def _check_index_tuples(name: str, idx, dims: Sequence[int], *, check_range: bool = True) -> Tensor:
    """Index tuples: an integer tensor ``(m, N)`` with ``0 <= idx[:, n] < dims[n]``."""
    _check_tensor(name, idx, integer=True)
    if idx.dim() != 2 or idx.shape[1] != len(dims):
        raise ValueError(
            f"{name} must have shape (m, {len(dims)}) (one column per mode), "
            f"got shape {tuple(idx.shape)}"
        )
    if check_range and idx.shape[0]:
        low, high = idx.amin(0).tolist(), idx.amax(0).tolist()
        for n, (lo, hi, d) in enumerate(zip(low, high, dims)):
            if lo < 0 or hi >= d:
                raise ValueError(
                    f"{name}[:, {n}] must lie in [0, {d}) (mode size {d}), "
                    f"got {lo if lo < 0 else hi}"
                )
    return idx


def _check_same_device(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.device != b.device:
        raise ValueError(
            f"{name_a} is on {a.device} but {name_b} is on {b.device}; put them on one device"
        )


def _check_targets(
    name: str, y, m: int, *, like: Tensor | None = None, like_name: str = ""
) -> Tensor:
    """Targets: a finite floating tensor ``(m,)``, of ``like``'s dtype and device if given."""
    _check_tensor(name, y, floating=True)
    if tuple(y.shape) != (m,):
        raise ValueError(
            f"{name} must have shape ({m},) (one value per observation), got {tuple(y.shape)}"
        )
    if like is not None:
        if like.is_floating_point() and y.dtype != like.dtype:
            raise TypeError(
                f"{name} has dtype {y.dtype} but {like_name} has dtype {like.dtype}; "
                "convert one to the other"
            )
        _check_same_device(name, y, like_name, like)
    _check_finite(name, y)
    return y


def _factor_error(name: str, factors, dims: Sequence[int] | None, dtype: torch.dtype | None):
    """The exception describing why ``factors`` do not fit (the slow path of a cheap check)."""
    if isinstance(factors, Tensor) or not isinstance(factors, Sequence):
        return TypeError(
            f"{name} must be a sequence of tensors (B, d_n, R), got {type(factors).__name__}"
        )
    if dims is not None and len(factors) != len(dims):
        return ValueError(
            f"{name} must hold {len(dims)} tensors (one per mode), got {len(factors)}"
        )
    if len(factors) < 1:
        return ValueError(f"{name} must hold at least one tensor (B, d_n, R), got none")
    for n, f in enumerate(factors):
        if not isinstance(f, Tensor):
            return TypeError(f"{name}[{n}] must be a tensor (B, d_n, R), got {type(f).__name__}")
        if not f.is_floating_point():
            return TypeError(f"{name}[{n}] must be a floating-point tensor, got dtype {f.dtype}")
        if f.dim() != 3:
            return ValueError(f"{name}[{n}] must have shape (B, d_n, R), got {tuple(f.shape)}")
    batch, _, rank = factors[0].shape
    for n, f in enumerate(factors):
        want = (batch, f.shape[1] if dims is None else dims[n], rank)
        if tuple(f.shape) != want:
            return ValueError(
                f"{name}[{n}] must have shape {want} (batch and rank of {name}[0]"
                + ("" if dims is None else f", mode size {dims[n]}")
                + f"), got {tuple(f.shape)}"
            )
        if f.dtype != factors[0].dtype:
            return TypeError(
                f"{name}[{n}] has dtype {f.dtype} but {name}[0] has dtype {factors[0].dtype}"
            )
        if f.device != factors[0].device:
            return ValueError(
                f"{name}[{n}] is on {f.device} but {name}[0] is on {factors[0].device}"
            )
    if dtype is not None and factors[0].dtype != dtype:
        return TypeError(
            f"{name} have dtype {factors[0].dtype} but the observations y have dtype {dtype}; "
            "convert one to the other"
        )
    return None


def _check_factors(factors: Sequence[Tensor], name: str = "factors") -> tuple[int, int]:
    """Factors ``(B, d_n, R)`` with a common ``B``, ``R``, floating dtype and device."""
    err = _factor_error(name, factors, None, None)
    if err is not None:
        raise err
    batch, _, rank = factors[0].shape
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
    dims = _check_dims("dims", dims)
    rank = _check_int("rank", rank, minimum=1)
    std_list = _check_positive_list("stds", stds)
    mean = _check_real("mean", mean)
    _check_generator("generator", generator)
    _check_float_dtype("dtype", dtype)
    scale = torch.tensor(std_list, dtype=torch.float64).view(-1, 1, 1)
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
    dims = _check_dims("dims", dims)
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
    _check_index_tuples("idx", idx, [f.shape[1] for f in factors])
    chunk = _check_int("chunk", chunk, minimum=1)
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
    out = column_norms(factors[0])
    for f in factors[1:]:
        out = out * column_norms(f)
    return out


def column_norms(f: Tensor, keepdim: bool = False) -> Tensor:
    """Euclidean norms of the columns of ``(B, d, R)`` factors along ``d``: ``(B, R)``.

    ``sqrt(sum(f * f))``: the same rounding as ``torch.linalg.vector_norm(f, dim=1)``
    up to the summation order (1 ulp apart), and on the CPU 17-33x faster on the
    Figure 3 factors (``(1-3, 10, 1000)``; vector_norm reduces the strided dimension
    without vectorizing), which made it most of the cost of a metrics record.
    """
    return (f * f).sum(1, keepdim=keepdim).sqrt()


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
    _check_tensor("grad_end", grad_end, floating=True)
    expected = (batch, *(f.shape[1] for f in factors))
    if tuple(grad_end.shape) != expected:
        raise ValueError(f"grad_end must have shape {expected}, got {tuple(grad_end.shape)}")
    unit = []
    for f in factors:
        nrm = column_norms(f, keepdim=True)
        unit.append(torch.where(nrm > 0, f / nrm.clamp_min(torch.finfo(f.dtype).tiny), 0.0))
    kr = khatri_rao(unit)  # (B, P, R)
    return -(grad_end.reshape(batch, 1, -1) @ kr).squeeze(1)


def cp_gammas_sparse(factors: Sequence[Tensor], idx: Tensor, grad_values: Tensor) -> Tensor:
    """``gamma_r`` for a loss gradient supported on the index tuples ``idx`` only.

    ``grad_values`` (``(B, m)``) are the entries of ``grad L(W_e)`` at ``idx``; this is
    the completion case, where the end tensor need not be built.
    """
    batch, _ = _check_factors(factors)
    _check_index_tuples("idx", idx, [f.shape[1] for f in factors])
    _check_tensor("grad_values", grad_values, floating=True)
    if tuple(grad_values.shape) != (batch, idx.shape[0]):
        raise ValueError(
            f"grad_values must have shape {(batch, idx.shape[0])} (B, m), "
            f"got {tuple(grad_values.shape)}"
        )
    prod = None
    for n, f in enumerate(factors):
        nrm = column_norms(f, keepdim=True)
        u = torch.where(nrm > 0, f / nrm.clamp_min(torch.finfo(f.dtype).tiny), 0.0)
        g = u[:, idx[:, n], :]
        prod = g if prod is None else prod * g
    assert prod is not None
    return -(grad_values.unsqueeze(1) @ prod).squeeze(1)
