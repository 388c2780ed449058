"""Sampled matrix products for completion gradients (numba, CPU, one thread).

The objective is Razin, Yadin & Cohen 2021, eq. (1)-(2) with completion
measurements: a mean pointwise loss over the observed entries of the CP end
tensor.

The dense completion step (:class:`~implreg.factorizations.cp_engine.DenseCompletion`)
forms the whole end matrix ``T_1 T_2^T`` and two more ``P1 x P2 x R`` GEMMs
with the residual matrix, although only the ``m`` observed entries carry a
residual.  At the densities of the papers' completion problems (Figure 3:
2000 of 10^4 entries) it is cheaper to compute exactly the ``m`` needed dot
products and the two sparse-times-dense products:

- :func:`sampled_dots`: ``out[b, k] = <left[b, i], right[b, cols[k]]>`` for the
  entries ``k`` of row ``i`` (a sampled dense-dense product, SDDMM);
- :func:`row_sums`: ``out[b, i] = sum_k w[b, k] right[b, cols[k]]`` over row ``i``'s
  entries (a sparse-times-dense product, SpMM; with the transposed layout it
  gives the other side's gradient); :func:`row_sums_pairs` goes on to the
  gradients of a two-mode Khatri-Rao half without storing the row sums.

Rows are visited in order and each row's entries are contiguous, so one operand
row stays in L1 while the other streams from L2; the summation order is fixed
by the layout, so results do not depend on the thread count.
``bench/bench_cp_step.py`` measures them against the GEMMs they replace.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, fastmath=True)
def _sampled_dots(left, right, ptr, cols, out):  # pragma: no cover - numba-compiled
    batch, n_rows, rank = left.shape
    for b in range(batch):
        for i in range(n_rows):
            a = left[b, i]
            k, end = ptr[i], ptr[i + 1]
            while k + 4 <= end:  # four entries of the row per pass: a[r] loaded once
                c0, c1 = right[b, cols[k]], right[b, cols[k + 1]]
                c2, c3 = right[b, cols[k + 2]], right[b, cols[k + 3]]
                s0 = s1 = s2 = s3 = np.float32(0.0)  # unify to float64 for float64 operands
                for r in range(rank):
                    x = a[r]
                    s0 += x * c0[r]
                    s1 += x * c1[r]
                    s2 += x * c2[r]
                    s3 += x * c3[r]
                out[b, k], out[b, k + 1], out[b, k + 2], out[b, k + 3] = s0, s1, s2, s3
                k += 4
            while k < end:
                c = right[b, cols[k]]
                s = np.float32(0.0)
                for r in range(rank):
                    s += a[r] * c[r]
                out[b, k] = s
                k += 1


@njit(cache=True, fastmath=True)
def _accumulate_row(acc, right, b, cols, w, order, start, end):  # pragma: no cover
    """``acc = sum_{k in [start, end)} w[b, order[k]] right[b, cols[k]]`` (four entries a pass)."""
    rank = acc.shape[0]
    for r in range(rank):
        acc[r] = 0.0
    k = start
    while k + 4 <= end:
        c0, c1 = right[b, cols[k]], right[b, cols[k + 1]]
        c2, c3 = right[b, cols[k + 2]], right[b, cols[k + 3]]
        w0, w1 = w[b, order[k]], w[b, order[k + 1]]
        w2, w3 = w[b, order[k + 2]], w[b, order[k + 3]]
        for r in range(rank):
            acc[r] += w0 * c0[r] + w1 * c1[r] + w2 * c2[r] + w3 * c3[r]
        k += 4
    while k < end:
        c = right[b, cols[k]]
        wk = w[b, order[k]]
        for r in range(rank):
            acc[r] += wk * c[r]
        k += 1


@njit(cache=True, fastmath=True)
def _row_sums(right, ptr, cols, w, order, out):  # pragma: no cover - numba-compiled
    batch, n_rows, _ = out.shape
    for b in range(batch):
        for i in range(n_rows):
            _accumulate_row(out[b, i], right, b, cols, w, order, ptr[i], ptr[i + 1])


@njit(cache=True, fastmath=True)
def _row_sums_pairs(right, ptr, cols, w, order, first, second, d_first, d_second):
    batch, d1, rank = first.shape
    d2 = second.shape[1]
    acc = np.empty(rank, dtype=right.dtype)
    d_first[:] = 0.0
    d_second[:] = 0.0
    for b in range(batch):
        for i in range(d1 * d2):
            if ptr[i] == ptr[i + 1]:
                continue
            _accumulate_row(acc, right, b, cols, w, order, ptr[i], ptr[i + 1])
            i1, i2 = i // d2, i % d2
            f, g = first[b, i1], second[b, i2]
            df, dg = d_first[b, i1], d_second[b, i2]
            for r in range(rank):
                df[r] += acc[r] * g[r]
                dg[r] += acc[r] * f[r]


def sampled_dots(left: np.ndarray, right: np.ndarray, ptr: np.ndarray, cols: np.ndarray):
    """``(B, nnz)`` dot products of ``left[b, i]`` with ``right[b, cols[k]]``, ``k`` in row ``i``.

    ``left`` ``(B, n1, R)`` and ``right`` ``(B, n2, R)`` are C-contiguous arrays of
    one float dtype; ``ptr`` (``n1 + 1`` int64) and ``cols`` (``nnz`` int64, values
    below ``n2``) are a CSR layout of the sampled entries.
    """
    out = np.empty((left.shape[0], cols.shape[0]), dtype=left.dtype)
    _sampled_dots(left, right, ptr, cols, out)
    return out


def row_sums(right, ptr, cols, w, order, n_rows: int):
    """``(B, n_rows, R)``: row ``i`` is ``sum_k w[b, order[k]] right[b, cols[k]]`` over its entries.

    ``ptr`` / ``cols`` are a CSR layout of the entries and ``order`` (int64,
    ``nnz``) maps each CSR position to its column of ``w`` (``(B, nnz)``), so one
    ``w`` serves a layout and its transpose; rows without entries are zero.
    """
    batch, _, rank = right.shape
    out = np.empty((batch, n_rows, rank), dtype=right.dtype)
    _row_sums(right, ptr, cols, w, order, out)
    return out


def row_sums_pairs(right, ptr, cols, w, order, first: np.ndarray, second: np.ndarray):
    """Gradients of ``first`` and ``second`` when the rows are their Khatri-Rao product.

    With ``S = row_sums(right, ptr, cols, w, order, d1 * d2)`` and rows ``(i1, i2)``
    (row-major) of ``khatri_rao([first, second])``, returns
    ``(sum_i2 S[(i1, i2)] * second[i2], sum_i1 S[(i1, i2)] * first[i1])`` without
    forming ``S``: each row's sum is used while it is in cache.
    """
    d_first, d_second = np.empty_like(first), np.empty_like(second)
    _row_sums_pairs(right, ptr, cols, w, order, first, second, d_first, d_second)
    return d_first, d_second
