"""Fast loss gradients of a CP factorization fit to observations.

The objective is paper eq. (1)-(2): ``phi(W) = 1/m sum_i l(pred_i - y_i)`` with
``pred_i`` the value of the end tensor at observation ``i`` (completion) or
``<X_i, W_e>`` (sensing).  Every engine returns the loss per batch entry and
the gradients with respect to all factors, computed analytically (no
autograd); :mod:`tests.test_cp_engine` checks each against autograd.

Formulations
------------
``dense``
    For small tensors.  Modes are split in two halves; with ``T_1`` and ``T_2``
    the Khatri-Rao products of the halves, the end tensor is the matrix
    ``T_1 T_2^T``.  The gradient with respect to the end tensor ``G`` (sparse
    residuals scattered into a dense array, or ``X^T dpred`` for sensing) gives
    ``dT_1 = G T_2`` and ``dT_2 = G^T T_1``: three GEMMs per step, then cheap
    partial MTTKRPs back to the factors.
``sampled``
    The dense layout on the CPU, but only the ``m`` observed entries of
    ``T_1 T_2^T`` are computed and ``G`` is used through its ``m`` nonzeros
    (:mod:`~implreg.factorizations.sparse_kernels`): ``6 m R`` flops instead of
    ``6 P R``, and no tensor of ``P`` entries; chosen by ``auto`` at densities
    ``m / P <= 1/4`` when the halves have at most ``4 m`` rows together.
``gather``
    For tensors too large to build.  Consecutive modes are grouped so that each
    group's Khatri-Rao table ``T_g`` (``prod_{n in g} d_n x R``) stays small;
    each observation gathers one row per group, products are formed with
    prefix/suffix products (no division, exact with zeros), and gradients are
    scattered back with ``index_add``.  Observations are processed in chunks,
    so memory is bounded by the chunk size, not by ``m``.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence

import torch

from implreg.factorizations.cp import (
    _check_dims,
    _check_finite,
    _check_index_tuples,
    _check_int,
    _check_same_device,
    _check_targets,
    _check_tensor,
    _factor_error,
    balanced_split,
    khatri_rao,
    khatri_rao_backward,
)
from implreg.factorizations.sparse_kernels import row_sums, row_sums_pairs, sampled_dots
from implreg.losses import PointwiseLoss

Tensor = torch.Tensor

GATHER_OPTIONS = ("table_max", "chunk")
COMPLETION_METHODS = ("auto", "dense", "sampled", "gather")
SAMPLED_MAX_ROWS = 1 << 16  # rows of the two Khatri-Rao halves together (auto's limit)
SAMPLED_MAX_OBSERVATIONS = 1 << 22  # observations (auto's limit)


def _linear_index(idx: Tensor, dims: Sequence[int]) -> Tensor:
    lin = torch.zeros(idx.shape[0], dtype=torch.int64, device=idx.device)
    for n, d in enumerate(dims):
        lin = lin * int(d) + idx[:, n].to(torch.int64)
    return lin


def linear_index(idx: Tensor, dims: Sequence[int]) -> Tensor:
    """Row-major linear index of index tuples ``idx`` (``(m, N)``) into a ``dims`` tensor.

    Raises TypeError for a non-integer ``idx`` and ValueError for a wrong shape or an
    index outside ``[0, dims[n])``.
    """
    dims = _check_dims("dims", dims)
    _check_index_tuples("idx", idx, dims)
    return _linear_index(idx, dims)


def group_modes(dims: Sequence[int], table_max: int) -> list[list[int]]:
    """Partition modes into consecutive groups whose size products stay ``<= table_max``."""
    dims = _check_dims("dims", dims)
    table_max = _check_int("table_max", table_max, minimum=1)
    groups: list[list[int]] = []
    current: list[int] = []
    size = 1
    for n, d in enumerate(dims):
        if current and size * d > table_max:
            groups.append(current)
            current, size = [], 1
        current.append(n)
        size *= d
    groups.append(current)
    return groups


class _Engine(abc.ABC):
    """Shared interface: ``loss_and_grad(factors, loss)`` and ``predict(factors)``."""

    m: int
    dims: list[int]
    y: Tensor

    def _check_factors(self, factors: Sequence[Tensor]) -> None:
        """Per-call check that ``factors`` are ``(B, d_n, R)`` of ``y``'s dtype and device.

        Runs on every step, so the accepted case costs only shape, dtype and device
        compares (about 2 microseconds at order 4: no tensor operation, no sync).
        """
        dims, y = self.dims, self.y
        try:
            if len(factors) == len(dims):
                first = factors[0].shape
                if len(first) == 3:
                    batch, rank, dtype = first[0], first[2], y.dtype
                    for f, d in zip(factors, dims):
                        if f.shape != (batch, d, rank) or f.dtype != dtype:
                            break
                    else:
                        if factors[0].device == y.device:
                            return
        except (AttributeError, TypeError, IndexError):
            pass
        err = _factor_error("factors", factors, dims, y.dtype)
        if err is None:
            err = ValueError(f"factors are on {factors[0].device} but y is on {y.device}")
        raise err

    @abc.abstractmethod
    def predict(self, factors: Sequence[Tensor]) -> Tensor:
        """Predictions at the observations, ``(B, m)``."""

    @abc.abstractmethod
    def loss_and_grad(
        self, factors: Sequence[Tensor], loss: PointwiseLoss
    ) -> tuple[Tensor, list[Tensor]]:
        """Mean loss per batch entry ``(B,)`` and the gradient for every factor."""


def _prefix_products(cols: list[Tensor]) -> list[Tensor]:
    prefix = [cols[0]]
    for c in cols[1:]:
        prefix.append(prefix[-1] * c)
    return prefix


def _leave_one_out(cols: list[Tensor], prefix: list[Tensor], weight: Tensor):
    """Yield ``(g, weight * prod_{g' != g} cols[g'])`` for ``g = G-1, ..., 0``.

    Uses the stored prefix products and a running suffix product: exact (no
    division) and ``O(G)`` products.
    """
    rank = cols[0].shape[-1]
    suffix = weight  # (B, c, 1) then (B, c, R)
    for g in range(len(cols) - 1, -1, -1):
        contrib = suffix if g == 0 else prefix[g - 1] * suffix
        if contrib.shape[-1] != rank:
            contrib = contrib.expand(-1, -1, rank)
        yield g, contrib
        if g > 0:
            suffix = suffix * cols[g]


def _chunked_loss(m: int, chunk: int, y: Tensor, loss: PointwiseLoss, columns, scatter) -> Tensor:
    """Sum over chunks of observations of the loss, scattering leave-one-out gradients.

    ``columns(s, e)`` gives the per-group ``(B, c, R)`` factors of observations
    ``s:e``; ``scatter(g, s, e, contrib)`` accumulates group ``g``'s gradient
    contribution.  Returns the mean loss per batch entry.
    """
    total = None
    for s in range(0, m, chunk):
        e = min(s + chunk, m)
        cols = columns(s, e)
        prefix = _prefix_products(cols)
        val, dval = loss.pointwise(prefix[-1].sum(-1) - y[s:e])
        total = val.sum(-1) if total is None else total + val.sum(-1)
        weight = (dval / m).unsqueeze(-1)
        for g, contrib in _leave_one_out(cols, prefix, weight):
            scatter(g, s, e, contrib)
    assert total is not None
    return total / m


def _check_observations(dims: Sequence[int], idx, y) -> int:
    """Index tuples ``idx`` ``(m, N)`` inside ``dims`` and finite targets ``y`` ``(m,)``."""
    _check_index_tuples("idx", idx, dims)
    m = int(idx.shape[0])
    if m < 1:
        raise ValueError("idx must hold at least one observation, got shape (0, N)")
    _check_targets("y", y, m)
    _check_same_device("idx", idx, "y", y)
    return m


class DenseCompletion(_Engine):
    """Completion gradient through the dense ``T_1 T_2^T`` formulation (small tensors).

    ``idx`` is an integer tensor ``(m, N)`` of index tuples inside ``dims`` and ``y``
    a finite floating tensor ``(m,)`` on the same device; the factors given to
    :meth:`predict` and :meth:`loss_and_grad` must have ``y``'s dtype and device.
    """

    def __init__(self, dims: Sequence[int], idx: Tensor, y: Tensor):
        self._init_dense(dims)
        self.m = _check_observations(self.dims, idx, y)
        self.lin = _linear_index(idx, self.dims)
        self.y = y

    def _init_dense(self, dims: Sequence[int]) -> None:
        """Mode layout shared with :class:`DenseSensing`."""
        self.dims = _check_dims("dims", dims)
        self.k = balanced_split(self.dims)
        self.size = math.prod(self.dims)

    def _halves(self, factors: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
        left = khatri_rao(factors[: self.k])
        right = khatri_rao(factors[self.k :]) if self.k < len(self.dims) else None
        return left, right

    def _end_matrix(self, left: Tensor, right: Tensor | None) -> Tensor:
        if right is None:
            return left.sum(-1).unsqueeze(-1)
        return torch.matmul(left, right.transpose(1, 2))

    def predict(self, factors: Sequence[Tensor]) -> Tensor:
        self._check_factors(factors)
        left, right = self._halves(factors)
        w = self._end_matrix(left, right)
        return w.reshape(w.shape[0], -1)[:, self.lin]

    def grad_from_end_gradient(
        self, factors: Sequence[Tensor], left: Tensor, right: Tensor | None, g_end: Tensor
    ) -> list[Tensor]:
        """Factor gradients from ``g_end``, the loss gradient w.r.t. the end tensor (``(B, P)``)."""
        batch = g_end.shape[0]
        if right is None:  # order 1: contiguous, not a broadcast view (callers may update in place)
            d_left = g_end.reshape(batch, -1, 1).expand(-1, -1, left.shape[-1]).contiguous()
            return khatri_rao_backward(factors, d_left)
        gm = g_end.reshape(batch, left.shape[1], right.shape[1])
        d_left = torch.matmul(gm, right)
        d_right = torch.matmul(gm.transpose(1, 2), left)
        return khatri_rao_backward(factors[: self.k], d_left) + khatri_rao_backward(
            factors[self.k :], d_right
        )

    def loss_and_grad(self, factors: Sequence[Tensor], loss: PointwiseLoss):
        self._check_factors(factors)
        left, right = self._halves(factors)
        w = self._end_matrix(left, right)
        batch = w.shape[0]
        pred = w.reshape(batch, -1)[:, self.lin]
        val, dval = loss.pointwise(pred - self.y)
        g_end = w.new_zeros(batch, self.size)
        g_end.index_add_(1, self.lin, dval / self.m)  # accumulates repeated observations
        return val.mean(-1), self.grad_from_end_gradient(factors, left, right, g_end)


class SampledCompletion(DenseCompletion):
    """Completion gradient through sampled products of the halves (CPU, order >= 2).

    The formulation of :class:`DenseCompletion` (end tensor ``T_1 T_2^T``), but
    only the ``m`` observed entries of ``T_1 T_2^T`` are computed (sampled dot
    products) and ``dT_1 = G T_2``, ``dT_2 = G^T T_1`` are products of the
    residual matrix's ``m`` nonzeros with dense matrices
    (:mod:`~implreg.factorizations.sparse_kernels`): ``6 B m R`` flops per step
    instead of ``6 B P R``.  Arguments as :class:`DenseCompletion`; ``y`` must be
    on the CPU.
    """

    def __init__(self, dims: Sequence[int], idx: Tensor, y: Tensor):
        self._init_dense(dims)
        if len(self.dims) < 2:
            raise ValueError("the sampled completion engine needs order >= 2; use method='dense'")
        if isinstance(y, Tensor) and y.device.type != "cpu":
            raise ValueError(
                f"the sampled completion engine runs on the CPU but y is on {y.device}; "
                "use method='dense'"
            )
        self.m = _check_observations(self.dims, idx, y)
        self.lin = _linear_index(idx, self.dims)
        self.y = y
        self.n_right = math.prod(self.dims[self.k :])
        self.n_left = self.size // self.n_right
        order = torch.argsort(self.lin, stable=True)  # observations grouped by row
        self._inverse = torch.argsort(order)
        self._y_rows = y[order]
        rows, cols = self.lin[order] // self.n_right, self.lin[order] % self.n_right
        identity = torch.arange(self.m).numpy()
        self._row_layout = (_pointers(rows, self.n_left), cols.numpy())
        to_cols = torch.argsort(cols, stable=True)  # column-major position -> row-major entry
        self._col_layout = (_pointers(cols, self.n_right), rows[to_cols].numpy())
        self._orders = (identity, to_cols.numpy())

    def _sampled(self, factors: Sequence[Tensor]):
        left, right = self._halves(factors)
        left, right = left.detach().contiguous(), right.detach().contiguous()
        pred = sampled_dots(left.numpy(), right.numpy(), *self._row_layout)
        return left, right, torch.from_numpy(pred)

    def predict(self, factors: Sequence[Tensor]) -> Tensor:
        self._check_factors(factors)
        return self._sampled(factors)[2][:, self._inverse]

    def loss_and_grad(self, factors: Sequence[Tensor], loss: PointwiseLoss):
        self._check_factors(factors)
        left, right, pred = self._sampled(factors)
        val, dval = loss.pointwise(pred - self._y_rows)
        w = (dval / self.m).contiguous().numpy()
        left_order, right_order = self._orders
        return val.mean(-1), self._half_grads(
            factors[: self.k], right, (*self._row_layout, w, left_order)
        ) + self._half_grads(factors[self.k :], left, (*self._col_layout, w, right_order))

    @staticmethod
    def _half_grads(group: Sequence[Tensor], other: Tensor, entries) -> list[Tensor]:
        """Gradients of one half's factors from the other half and the residual
        ``entries`` ``(ptr, cols, w, order)`` laid out by this half's rows."""
        if len(group) == 2:
            first, second = (f.detach().contiguous() for f in group)
            d_first, d_second = row_sums_pairs(
                other.numpy(), *entries, first.numpy(), second.numpy()
            )
            return [torch.from_numpy(d_first), torch.from_numpy(d_second)]
        rows = math.prod(f.shape[1] for f in group)
        sums = torch.from_numpy(row_sums(other.numpy(), *entries, rows))
        return khatri_rao_backward(group, sums)


def _pointers(rows: Tensor, n_rows: int):
    """CSR row pointers (``n_rows + 1`` int64, numpy) of sorted row indices."""
    ptr = torch.zeros(n_rows + 1, dtype=torch.int64)
    ptr[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    return ptr.numpy()


class GatherCompletion(_Engine):
    """Completion gradient over observed entries only (tensors too large to build).

    Arguments as :class:`DenseCompletion`, plus positive integers ``table_max``
    (largest Khatri-Rao table of a mode group) and ``chunk`` (observations per pass).
    """

    def __init__(
        self,
        dims: Sequence[int],
        idx: Tensor,
        y: Tensor,
        *,
        table_max: int = 1024,
        chunk: int = 4096,
    ):
        self.dims = _check_dims("dims", dims)
        self.groups = group_modes(self.dims, table_max)
        self.chunk = _check_int("chunk", chunk, minimum=1)
        self.m = _check_observations(self.dims, idx, y)
        self.group_idx = [
            _linear_index(idx[:, g], [self.dims[n] for n in g]).contiguous() for g in self.groups
        ]
        self.y = y

    def _tables(self, factors: Sequence[Tensor]) -> list[Tensor]:
        return [khatri_rao([factors[n] for n in g]) for g in self.groups]

    def predict(self, factors: Sequence[Tensor]) -> Tensor:
        self._check_factors(factors)
        tables = self._tables(factors)
        outs = []
        for s in range(0, self.m, self.chunk):
            cols = [t[:, j[s : s + self.chunk], :] for t, j in zip(tables, self.group_idx)]
            outs.append(_prefix_products(cols)[-1].sum(-1))
        return torch.cat(outs, dim=1)

    def loss_and_grad(self, factors: Sequence[Tensor], loss: PointwiseLoss):
        self._check_factors(factors)
        tables = self._tables(factors)
        d_tables = [torch.zeros_like(t) for t in tables]

        def columns(s: int, e: int) -> list[Tensor]:
            return [t[:, j[s:e], :] for t, j in zip(tables, self.group_idx)]

        def scatter(g: int, s: int, e: int, contrib: Tensor) -> None:
            d_tables[g].index_add_(1, self.group_idx[g][s:e], contrib)

        mean = _chunked_loss(self.m, self.chunk, self.y, loss, columns, scatter)
        grads: list[Tensor] = []
        for g, dt in zip(self.groups, d_tables):
            grads.extend(khatri_rao_backward([factors[n] for n in g], dt))
        return mean, grads


class DenseSensing(DenseCompletion):
    """Sensing ``y_i = <X_i, W>`` with dense measurement tensors stored as one ``m x P`` matrix.

    ``measurements`` is a finite floating ``(m, prod(dims))`` tensor (row ``i`` the
    row-major ``X_i``) and ``y`` a finite ``(m,)`` tensor of the same dtype and device.
    """

    def __init__(self, dims: Sequence[int], measurements: Tensor, y: Tensor):
        self._init_dense(dims)
        _check_tensor("measurements", measurements, floating=True)
        if measurements.dim() != 2 or measurements.shape[1] != self.size:
            raise ValueError(
                f"measurements must have one column per tensor entry, shape (m, {self.size}), "
                f"got {tuple(measurements.shape)}"
            )
        self.m = int(measurements.shape[0])
        if self.m < 1:
            raise ValueError("measurements must hold at least one row (measurement), got 0")
        _check_finite("measurements", measurements)
        _check_targets("y", y, self.m, like=measurements, like_name="measurements")
        self.x = measurements
        self.y = y

    def predict(self, factors: Sequence[Tensor]) -> Tensor:
        self._check_factors(factors)
        left, right = self._halves(factors)
        w = self._end_matrix(left, right)
        return w.reshape(w.shape[0], -1) @ self.x.T

    def loss_and_grad(self, factors: Sequence[Tensor], loss: PointwiseLoss):
        self._check_factors(factors)
        left, right = self._halves(factors)
        w = self._end_matrix(left, right)
        batch = w.shape[0]
        pred = w.reshape(batch, -1) @ self.x.T
        val, dval = loss.pointwise(pred - self.y)
        g_end = (dval / self.m) @ self.x
        return val.mean(-1), self.grad_from_end_gradient(factors, left, right, g_end)


class RankOneSensing(_Engine):
    """Sensing with rank-one measurement tensors ``X_i = x_i^1 (x) ... (x) x_i^N``.

    ``<X_i, W_e> = sum_r prod_n <x_i^n, w_r^n>``: never builds a tensor, so it
    scales to orders where the dense formulation cannot.  ``vectors`` holds ``N``
    finite floating tensors ``(m, d_n)`` of one dtype and device, ``y`` ``(m,)`` alike.
    """

    def __init__(self, vectors: Sequence[Tensor], y: Tensor, *, chunk: int = 4096):
        if isinstance(vectors, Tensor) or not isinstance(vectors, Sequence):
            raise TypeError(
                "vectors must be a sequence of N tensors (m, d_n), one per mode, "
                f"got {type(vectors).__name__}"
            )
        self.vectors = list(vectors)  # each (m, d_n)
        if not self.vectors:
            raise ValueError("vectors must hold at least one tensor (m, d_n), got none")
        for n, v in enumerate(self.vectors):
            _check_tensor(f"vectors[{n}]", v, floating=True)
            first = self.vectors[0]
            if v.dim() != 2 or v.shape[0] != first.shape[0] or v.shape[1] < 1:
                raise ValueError(
                    f"vectors[{n}] must have shape (m, d_n) with the m = {first.shape[0]} rows "
                    f"of vectors[0], got {tuple(v.shape)}"
                )
            if v.dtype != first.dtype:
                raise TypeError(
                    f"vectors[{n}] has dtype {v.dtype} but vectors[0] has {first.dtype}"
                )
            _check_same_device(f"vectors[{n}]", v, "vectors[0]", first)
            _check_finite(f"vectors[{n}]", v)
        self.m = int(self.vectors[0].shape[0])
        if self.m < 1:
            raise ValueError("vectors must hold at least one measurement (row), got 0")
        _check_targets("y", y, self.m, like=self.vectors[0], like_name="vectors")
        self.y = y
        self.dims = [int(v.shape[1]) for v in self.vectors]
        self.chunk = _check_int("chunk", chunk, minimum=1)

    def predict(self, factors: Sequence[Tensor]) -> Tensor:
        self._check_factors(factors)
        outs = []
        for s in range(0, self.m, self.chunk):
            cols = [v[s : s + self.chunk] @ f for v, f in zip(self.vectors, factors)]
            outs.append(_prefix_products(cols)[-1].sum(-1))
        return torch.cat(outs, dim=1)

    def loss_and_grad(self, factors: Sequence[Tensor], loss: PointwiseLoss):
        self._check_factors(factors)
        grads = [torch.zeros_like(f) for f in factors]

        def columns(s: int, e: int) -> list[Tensor]:
            return [v[s:e] @ f for v, f in zip(self.vectors, factors)]

        def scatter(g: int, s: int, e: int, contrib: Tensor) -> None:
            grads[g] += self.vectors[g][s:e].T @ contrib

        mean = _chunked_loss(self.m, self.chunk, self.y, loss, columns, scatter)
        return mean, grads


def choose_completion_method(
    dims: Sequence[int], m: int, *, dense_max: int = 1 << 24, device: str = "cpu"
) -> str:
    """The completion engine that is fastest here for ``m`` observations of a ``dims`` tensor.

    ``sampled`` on the CPU (order >= 2) when the observations are sparse
    (``m / P <= 1/4``) and the two Khatri-Rao halves are small beside them
    (``P_1 + P_2 <= 4 m``), up to halves of :data:`SAMPLED_MAX_ROWS` rows and
    :data:`SAMPLED_MAX_OBSERVATIONS` observations (its memory is not chunked:
    the halves and ``m`` residuals stay whole); otherwise ``gather`` when the tensor is too large to
    build (``P > dense_max``) or when gathering ``m`` rows per mode group beats
    three ``P x R`` GEMMs; else ``dense``.  The constants come from
    ``bench/bench_cp_step.py`` and the side-by-side timings quoted in the README
    (2-core CPU, one thread): the sampled step is 1.5-2.4x the dense one at
    density 0.2 and 38x the gather one on the 16^4, R = 256, m = 2048 problem,
    while gathering wins when the halves dwarf ``m`` (10^7 entries, m = 50).
    """
    dims = _check_dims("dims", dims)
    m = _check_int("m", m, minimum=0)
    dense_max = _check_int("dense_max", dense_max, minimum=1)
    size = math.prod(dims)
    if torch.device(device).type == "cpu" and len(dims) >= 2 and 4 * m <= size:
        p1 = math.prod(dims[: balanced_split(dims)])
        if p1 + size // p1 <= min(4 * m, SAMPLED_MAX_ROWS) and m <= SAMPLED_MAX_OBSERVATIONS:
            return "sampled"
    if size > dense_max:
        return "gather"
    n_groups = len(group_modes(dims, 1024))
    return "dense" if size <= 13 * n_groups * max(m, 1) else "gather"


def completion_engine(
    dims: Sequence[int], idx: Tensor, y: Tensor, *, method: str = "auto", **kwargs
) -> _Engine:
    """The completion engine for ``method`` in ``{'auto', 'dense', 'sampled', 'gather'}``.

    ``idx`` is an integer tensor ``(m, N)`` of index tuples inside ``dims``, ``y`` a
    finite floating tensor ``(m,)``; ``kwargs`` (``table_max``, ``chunk``) reach the
    gather engine and are checked whichever method is used.
    """
    if method not in COMPLETION_METHODS:
        raise ValueError(
            f"unknown completion method {method!r}; use 'auto', 'dense', 'sampled' or 'gather'"
        )
    unknown = sorted(set(kwargs) - set(GATHER_OPTIONS))
    if unknown:
        raise TypeError(
            f"completion_engine got unexpected keyword argument(s) {unknown}; "
            f"the gather engine takes {', '.join(GATHER_OPTIONS)}"
        )
    for key, value in kwargs.items():
        _check_int(key, value, minimum=1)
    dims = _check_dims("dims", dims)
    _check_index_tuples("idx", idx, dims, check_range=False)  # the range: in the engine
    if method == "auto":
        device = y.device if isinstance(y, Tensor) else "cpu"
        method = choose_completion_method(dims, idx.shape[0], device=device)
    if method == "dense":
        return DenseCompletion(dims, idx, y)
    if method == "sampled":
        return SampledCompletion(dims, idx, y)
    return GatherCompletion(dims, idx, y, **kwargs)
