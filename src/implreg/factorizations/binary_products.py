"""Products with a binary matrix by table look-up (the "four Russians" method), numba, CPU.

The Figure 4 fits (Razin, Maman & Cohen, ICML 2021, Section 5.2; the exp-sum form of
:mod:`implreg.factorizations.cp_exp`) spend nearly all their time in two products with
the same binary feature matrix ``X`` ``(n, D)`` (MNIST: 60000 x 676 after dropping the
constant pixels): the log-terms ``X @ W`` and the gradient ``X.T @ G``, with ``W``
``(D, K)`` and ``G`` ``(n, K)`` for ``K`` = tasks x rank columns (5 for one task at
rank 5, 300 for twenty tasks at rank 15).  A dense GEMM does ``n D K`` multiply-adds
and, for a narrow ``W``, reads the 160 MB float32 ``X`` from memory at every call.

Here ``X`` is stored as bits, eight features to a byte and byte-major (``(D/8, n)``
uint8: 5 MB for MNIST).  For a byte position ``b`` the 256 possible sums of the rows
``8b .. 8b+7`` of ``W`` are tabulated once per call (``T[b, v] = T[b, v - lowbit(v)] +
W[8b + bit]``, 255 row additions), and a row of ``X @ W`` is the sum of ``D/8`` table rows:
``(X @ W)[i] = sum_b T[b, byte(i, b)]``.  The transpose product accumulates, for every
byte position, the rows of ``G`` into 256 bins by byte value (a histogram), and the
gradient row ``8b + t`` is the sum of the bins whose value has bit ``t`` set.  Both do
``n (D/8) K`` additions instead of ``n D K`` multiply-adds, on operands that stay in
cache: columns are taken ``TILE`` at a time, rows ``BLOCK`` at a time.

Summation order: a row of ``X @ W`` adds its ``D/8`` table rows in byte order; a bin of
``X.T @ G`` adds its rows in row order.  Neither depends on the thread count (the forward
product is parallel over row blocks, the transpose over byte positions), so results are
bit-identical on any number of threads.  They differ from a GEMM's only by rounding
(tested against float64 products).  ``bench/bench_binary_products.py`` measures both
against torch's GEMM on the same matrices.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange

Tensor = torch.Tensor

TILE = 320
"""Columns per pass, at most (a wider ``K`` is split into equal tiles).  Measured on MNIST,
one thread, ``X @ W`` at ``K`` = 300: 142 ms in tiles of 64 columns, 107 ms in tiles of
100, 98 ms in tiles of 150, 67 ms in one tile; at ``K`` = 128, 56 ms in tiles of 64 and
31-39 ms in one tile."""

BLOCK = 256
"""Rows per block of the forward product (a block's outputs stay in cache across bytes)."""

NARROW = 6
"""Up to this many columns the forward product gathers column by column (measured on MNIST,
one thread: 1.9 ms against 11 ms at one column, 8.8 against 12.7 at five, 17.7 against
12.1 at ten)."""

NARROW_BLOCK = 1024


@njit(cache=True)
def _tile_width(k):  # pragma: no cover - numba-compiled
    tiles = (k + TILE - 1) // TILE  # equal tiles of at most TILE columns
    return (k + tiles - 1) // tiles


@njit(parallel=True, cache=True, fastmath=True)
def _forward(xpt, w, out, table):  # pragma: no cover - numba-compiled
    nb, n = xpt.shape
    d, k = w.shape
    nblk = (n + BLOCK - 1) // BLOCK
    width = _tile_width(k)
    for c0 in range(0, k, width):
        t = min(width, k - c0)
        for b in prange(nb):  # table[b, v] = the sum of the rows 8b + bit of w over v's bits
            for c in range(t):
                table[b, 0, c] = 0.0
            for v in range(1, 256):
                bit = 0
                while not (v >> bit) & 1:
                    bit += 1
                prev = v & (v - 1)
                j = 8 * b + bit
                if j < d:
                    for c in range(t):
                        table[b, v, c] = table[b, prev, c] + w[j, c0 + c]
                else:
                    for c in range(t):
                        table[b, v, c] = table[b, prev, c]
        for blk in prange(nblk):
            r0 = blk * BLOCK
            r1 = min(n, r0 + BLOCK)
            acc = np.zeros((r1 - r0, t), dtype=out.dtype)
            for b in range(nb):
                for i in range(r0, r1):
                    v = xpt[b, i]
                    if v == 0:  # table[b, 0] is zero (most bytes of a sparse image)
                        continue
                    for c in range(t):
                        acc[i - r0, c] += table[b, v, c]
            for i in range(r0, r1):
                for c in range(t):
                    out[i, c0 + c] = acc[i - r0, c]


@njit(parallel=True, cache=True, fastmath=True)
def _forward_narrow(xpt, w, out, table):  # pragma: no cover - numba-compiled
    # Few columns: a column's 256-entry table per byte and a gather over the rows of a
    # block (no branch, vectorizable), instead of table rows added row by row.
    nb, n = xpt.shape
    d, k = w.shape
    for b in prange(nb):
        for c in range(k):
            table[b, c, 0] = 0.0
            for v in range(1, 256):
                bit = 0
                while not (v >> bit) & 1:
                    bit += 1
                j = 8 * b + bit
                table[b, c, v] = table[b, c, v & (v - 1)] + (w[j, c] if j < d else 0.0)
    nblk = (n + NARROW_BLOCK - 1) // NARROW_BLOCK
    for blk in prange(nblk):
        r0 = blk * NARROW_BLOCK
        r1 = min(n, r0 + NARROW_BLOCK)
        acc = np.zeros((k, r1 - r0), dtype=out.dtype)
        for b in range(nb):
            xb = xpt[b, r0:r1]
            for c in range(k):
                tc = table[b, c]
                a = acc[c]
                for i in range(r1 - r0):
                    a[i] += tc[xb[i]]
        for i in range(r0, r1):
            for c in range(k):
                out[i, c] = acc[c, i - r0]


@njit(parallel=True, cache=True, fastmath=True)
def _transpose(xpt, g, d, out, hist, groups):  # pragma: no cover - numba-compiled
    nb, n = xpt.shape
    k = g.shape[1]
    per = (nb + groups - 1) // groups
    width = _tile_width(k)
    for c0 in range(0, k, width):
        t = min(width, k - c0)
        for grp in prange(groups):  # each byte position's bins belong to one group
            b0 = grp * per
            b1 = min(nb, b0 + per)
            gb = np.empty((BLOCK, t), dtype=g.dtype)
            for b in range(b0, b1):
                for v in range(1, 256):
                    for c in range(t):
                        hist[b, v, c] = 0.0
            for r0 in range(0, n, BLOCK):  # rows in order: a bin's sum does not depend on groups
                r1 = min(n, r0 + BLOCK)
                for i in range(r0, r1):
                    for c in range(t):
                        gb[i - r0, c] = g[i, c0 + c]
                for b in range(b0, b1):
                    for i in range(r0, r1):
                        v = xpt[b, i]
                        if v == 0:  # bin 0 has no bit set: it never reaches the result
                            continue
                        for c in range(t):
                            hist[b, v, c] += gb[i - r0, c]
            for b in range(b0, b1):
                h = hist[b]
                for bit in range(8):
                    j = 8 * b + bit
                    if j >= d:
                        break
                    acc = np.zeros(t, dtype=out.dtype)
                    for v in range(1, 256):
                        if (v >> bit) & 1:
                            hv = h[v]
                            for c in range(t):
                                acc[c] += hv[c]
                    for c in range(t):
                        out[j, c0 + c] = acc[c]


def _threads() -> int:
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


class PackedBinary:
    """A binary matrix ``(n, D)`` stored as bits, with ``X @ W`` and ``X.T @ G`` by look-up.

    ``x`` is a 0/1 array or tensor (any integer, bool or float dtype holding only 0 and 1).
    Products take and return CPU tensors of dtype float32 or float64 and run on the
    current torch thread count.
    """

    def __init__(self, x):
        arr = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
        if arr.ndim != 2:
            raise ValueError(f"x must be (samples, features), got shape {arr.shape}")
        if arr.dtype != np.bool_:
            if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
                raise TypeError(f"x must hold 0/1 values, got dtype {arr.dtype}")
            if arr.size and not bool(((arr == 0) | (arr == 1)).all()):
                raise ValueError("x must hold only 0 and 1")
        self.n, self.d = arr.shape
        nb = (self.d + 7) // 8
        padded = np.zeros((self.n, nb * 8), dtype=np.uint8)
        padded[:, : self.d] = arr != 0
        self.bits = np.ascontiguousarray(np.packbits(padded, axis=1, bitorder="little").T)
        self._work: dict[np.dtype, np.ndarray] = {}

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.d)

    def _workspace(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """A scratch array of ``shape``, a view of one buffer per dtype kept between calls
        (a fresh one per call would cost page faults as large as the products)."""
        size = int(np.prod(shape))
        buf = self._work.get(dtype)
        if buf is None or buf.size < size:
            buf = np.empty(size, dtype=dtype)
            self._work[dtype] = buf
        return buf[:size].reshape(shape)

    def _operand(self, name: str, a: Tensor, rows: int) -> np.ndarray:
        if not isinstance(a, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(a).__name__}")
        if a.dtype not in (torch.float32, torch.float64) or a.device.type != "cpu":
            raise TypeError(
                f"{name} must be a float32 or float64 CPU tensor, got {a.dtype} on {a.device}"
            )
        if a.dim() != 2 or a.shape[0] != rows:
            raise ValueError(f"{name} must have {rows} rows (2-d), got shape {tuple(a.shape)}")
        return a.detach().contiguous().numpy()

    def matmul(self, w: Tensor, out: Tensor | None = None) -> Tensor:
        """``X @ w`` for ``w`` ``(D, K)``: ``(n, K)`` (differentiable in ``w``).

        ``out``, a contiguous CPU tensor ``(n, K)`` of ``w``'s dtype, receives the product
        and is returned (no autograd then: ``w`` must not require a gradient).  A caller
        that keeps one such buffer saves the page faults of a fresh ``(n, K)`` array per
        call: 35 ms per 72 MB measured here (60000 x 300 float32, one thread).
        """
        if out is None:
            return _Product.apply(w, self, False)
        wn = self._operand("w", w, self.d)
        if w.requires_grad and torch.is_grad_enabled():
            raise ValueError("out cannot be given when w requires a gradient")
        if not isinstance(out, Tensor):
            raise TypeError(f"out must be a tensor, got {type(out).__name__}")
        if (
            out.device.type != "cpu"
            or out.dtype != w.dtype
            or tuple(out.shape) != (self.n, wn.shape[1])
            or not out.is_contiguous()
        ):
            raise ValueError(
                f"out must be a contiguous CPU tensor of shape ({self.n}, {wn.shape[1]}) and "
                f"dtype {w.dtype}, got shape {tuple(out.shape)}, {out.dtype} on {out.device}"
            )
        self._forward_into(wn, out.numpy())
        return out

    def rmatmul(self, g: Tensor) -> Tensor:
        """``X.T @ g`` for ``g`` ``(n, K)``: ``(D, K)`` (differentiable in ``g``)."""
        return _Product.apply(g, self, True)

    def _matmul(self, w: Tensor) -> Tensor:
        wn = self._operand("w", w, self.d)
        out = np.empty((self.n, wn.shape[1]), dtype=wn.dtype)
        self._forward_into(wn, out)
        return torch.from_numpy(out)

    def _forward_into(self, wn: np.ndarray, out: np.ndarray) -> None:
        """``out[:] = X @ wn`` (every entry written)."""
        if self.n and wn.shape[1]:
            with _numba_threads():
                nb, k = self.bits.shape[0], wn.shape[1]
                if k <= NARROW:
                    _forward_narrow(self.bits, wn, out, self._workspace(wn.dtype, (nb, k, 256)))
                else:
                    table = self._workspace(wn.dtype, (nb, 256, _tile_width(k)))
                    _forward(self.bits, wn, out, table)

    def _rmatmul(self, g: Tensor) -> Tensor:
        gn = self._operand("g", g, self.n)
        out = np.zeros((self.d, gn.shape[1]), dtype=gn.dtype)
        if self.n and self.d and gn.shape[1]:
            with _numba_threads():
                width = _tile_width(gn.shape[1])
                hist = self._workspace(gn.dtype, (self.bits.shape[0], 256, width))
                _transpose(self.bits, gn, self.d, out, hist, _threads())
        return torch.from_numpy(out)


class _Product(torch.autograd.Function):
    """``X @ w`` with its gradient ``X.T @ grad`` (and the transpose product's, ``X @ grad``)."""

    @staticmethod
    def forward(ctx, w, packed, transpose):
        ctx.packed, ctx.transpose = packed, transpose
        return packed._rmatmul(w) if transpose else packed._matmul(w)

    @staticmethod
    def backward(ctx, grad):
        p = ctx.packed
        return (p._matmul(grad) if ctx.transpose else p._rmatmul(grad)), None, None


class _numba_threads:
    """Run numba's parallel loops on the current torch thread count, and keep torch's.

    With numba's OpenMP layer both libraries share the OpenMP settings: starting numba's
    thread pool set torch's count to numba's default (measured: a product called under
    ``torch.set_num_threads(1)`` left torch on two threads), so torch's count is put back.
    """

    def __enter__(self):
        self.torch_threads = torch.get_num_threads()
        numba.set_num_threads(_threads())

    def __exit__(self, *exc):
        if torch.get_num_threads() != self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        return False
