"""Deep matrix factorization ``W_e = W_N ... W_1`` (Arora, Cohen, Hu & Luo 2019).

Implements the model of Arora et al., "Implicit Regularization in Deep Matrix
Factorization" (NeurIPS 2019): a depth-``N`` linear
network whose end-to-end matrix ``W_e`` is fit to observed entries
(completion) or to linear measurements ``<A_i, W_e>`` (sensing).

Conventions
-----------
Layers are a list of ``N`` tensors; layer ``j`` (0-based) has shape
``(B, d_{j+1}, d_j)`` with ``d_0 = n_cols`` and ``d_N = n_rows``, so that
``W_e = layers[N-1] @ ... @ layers[0]`` has shape ``(B, n_rows, n_cols)``.
``B`` indexes independent runs (for example one per initialization scale)
that share every vectorized pass, as in :mod:`implreg.factorizations.cp`.
Matrices are vectorized row-major (``W.reshape(-1)``), entry ``(i, k)`` at
linear index ``i * n_cols + k``.

Engines (:class:`MatrixCompletion`, :class:`MatrixSensing`) follow the
interface of :mod:`implreg.factorizations.cp_engine`:
``loss_and_grad(layers, loss) -> (loss (B,), grads)`` and
``predict(layers) -> (B, m)``; the objective is
``1/m sum_i l(pred_i - y_i)`` and gradients are analytic (no autograd).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from implreg.factorizations.cp import (
    _check_finite,
    _check_float_dtype,
    _check_generator,
    _check_int,
    _check_positive_list,
    _check_same_device,
    _check_targets,
    _check_tensor,
)
from implreg.losses import PointwiseLoss

Tensor = torch.Tensor

SCHEMES = ("gaussian", "balanced", "orthogonal", "identity")


def _check_shape(shape: Sequence[int]) -> tuple[int, int]:
    if isinstance(shape, (str, bytes, Tensor)) or not isinstance(shape, Sequence):
        raise TypeError(f"shape must be a pair (n_rows, n_cols), got {type(shape).__name__}")
    if len(shape) != 2:
        raise ValueError(f"shape must be two positive sizes (n_rows, n_cols), got {tuple(shape)}")
    return (
        _check_int("shape[0] (n_rows)", shape[0], minimum=1),
        _check_int("shape[1] (n_cols)", shape[1], minimum=1),
    )


def _check_layers(layers: Sequence[Tensor], name: str = "layers") -> int:
    """Layers ``(B, d_{j+1}, d_j)`` that chain, with one batch, floating dtype and device."""
    if isinstance(layers, Tensor) or not isinstance(layers, Sequence):
        raise TypeError(
            f"{name} must be a sequence of tensors (B, d_out, d_in), got {type(layers).__name__}"
        )
    if len(layers) < 1:
        raise ValueError(f"{name} must hold at least one layer (a depth >= 1), got none")
    for j, w in enumerate(layers):
        if not isinstance(w, Tensor):
            raise TypeError(
                f"{name}[{j}] must be a tensor (B, d_out, d_in), got {type(w).__name__}"
            )
        if not w.is_floating_point():
            raise TypeError(f"{name}[{j}] must be a floating-point tensor, got dtype {w.dtype}")
    batch = layers[0].shape[0] if layers[0].dim() == 3 else None
    for j, w in enumerate(layers):
        if w.dim() != 3 or w.shape[0] != batch:
            raise ValueError(
                "every layer must have shape (B, d_out, d_in) with the same B; "
                f"got {name} of shapes {[tuple(x.shape) for x in layers]}"
            )
        if j > 0 and w.shape[2] != layers[j - 1].shape[1]:
            raise ValueError(
                f"{name}[{j}] takes {w.shape[2]} inputs but {name}[{j - 1}] has "
                f"{layers[j - 1].shape[1]} outputs"
            )
        if w.dtype != layers[0].dtype:
            raise TypeError(f"{name}[{j}] has dtype {w.dtype} but {name}[0] has {layers[0].dtype}")
        _check_same_device(f"{name}[{j}]", w, f"{name}[0]", layers[0])
    return batch


def _check_engine_layers(layers: Sequence[Tensor], shape: tuple[int, int], y: Tensor) -> None:
    """Per-call check that ``layers`` map ``n_cols`` to ``n_rows`` with ``y``'s dtype and device.

    Runs on every step: the accepted case costs only shape, dtype and device compares.
    """
    try:
        if len(layers) >= 1:
            dtype, batch, width = y.dtype, layers[0].shape[0], shape[1]
            for w in layers:
                s = w.shape
                if len(s) != 3 or s[0] != batch or s[2] != width or w.dtype != dtype:
                    break
                width = s[1]
            else:
                if width == shape[0] and layers[0].device == y.device:
                    return
    except (AttributeError, TypeError, IndexError):
        pass
    _check_layers(layers)
    end = (layers[-1].shape[1], layers[0].shape[2])
    if end != shape:
        raise ValueError(
            f"layers must give a {shape[0]} x {shape[1]} end matrix (layers[0] taking {shape[1]} "
            f"inputs, layers[-1] giving {shape[0]} outputs), got {end[0]} x {end[1]}"
        )
    if layers[0].dtype != y.dtype:
        raise TypeError(
            f"layers have dtype {layers[0].dtype} but the observations y have dtype {y.dtype}; "
            "convert one to the other"
        )
    _check_same_device("layers", layers[0], "y", y)


def layer_sizes(shape: Sequence[int], depth: int, widths: Sequence[int] | None = None) -> list[int]:
    """Sizes ``[d_0, ..., d_N]`` with ``d_0 = n_cols``, ``d_N = n_rows``.

    Parameters
    ----------
    shape : sequence of int
        ``(n_rows, n_cols)`` of the end matrix.
    depth : int
        Number of layers ``N >= 1``.
    widths : sequence of int, optional
        The ``N - 1`` hidden widths ``d_1, ..., d_{N-1}``; default
        ``min(n_rows, n_cols)`` each ("full width", as in Arora et al. 2019).

    Returns
    -------
    list of int
        ``N + 1`` sizes.
    """
    n_rows, n_cols = _check_shape(shape)
    depth = _check_int("depth", depth, minimum=1)
    if widths is None:
        hidden = [min(n_rows, n_cols)] * (depth - 1)
    else:
        if isinstance(widths, (str, bytes, Tensor)) or not isinstance(widths, Sequence):
            raise TypeError(
                f"widths must be a sequence of hidden sizes, got {type(widths).__name__}"
            )
        if len(widths) != depth - 1:
            raise ValueError(
                f"widths must be {depth - 1} positive hidden sizes for depth {depth}, "
                f"got {list(widths)}"
            )
        hidden = [_check_int(f"widths[{j}]", w, minimum=1) for j, w in enumerate(widths)]
    return [n_cols, *hidden, n_rows]


def _random_orthogonal(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    """A ``rows x cols`` matrix with orthonormal columns (rows >= cols) or rows (rows < cols)."""
    big, small = max(rows, cols), min(rows, cols)
    z = torch.randn(big, small, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(z)
    sign = torch.sign(torch.diagonal(r))
    q = q * torch.where(sign == 0, 1.0, sign)  # Haar-distributed
    return q if rows >= cols else q.T


def mf_init(
    shape: Sequence[int],
    depth: int,
    *,
    scales: Sequence[float],
    scheme: str = "gaussian",
    widths: Sequence[int] | None = None,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
    positive_det: bool = False,
) -> list[Tensor]:
    """Initial layers of a deep matrix factorization, one batch entry per end-to-end scale.

    One random draw (float64) is shared by all batch entries; entry ``b`` multiplies
    every layer by ``scales[b] ** (1/N)``, so that runs differing only in scale start
    from the same direction (as :func:`implreg.factorizations.cp.cp_init`).

    Parameters
    ----------
    shape : sequence of int
        ``(n_rows, n_cols)`` of the end matrix.
    depth : int
        Number of layers ``N >= 1``.
    scales : sequence of float
        Positive finite end-to-end scales, one per batch entry.
    scheme : {"gaussian", "balanced", "orthogonal", "identity"}
        ``"gaussian"``: i.i.d. ``N(0, s^2)`` entries with
        ``s = scale^(1/N) / sqrt(d_in)`` (Arora et al. 2019; ``||W_e(0)||_F`` is about
        ``scale * sqrt(n_rows)``, ``scale * 10`` for 100 x 100).
        ``"balanced"``: a random Gaussian matrix rescaled to Frobenius norm
        ``scale * sqrt(min(n_rows, n_cols))`` and split through its SVD so that
        ``W_{j+1}^T W_{j+1} = W_j W_j^T`` for every ``j`` (Arora et al. 2019,
        balanced initialization; requires full width).
        ``"orthogonal"``: each layer ``scale^(1/N)`` times a random (semi-)orthogonal
        matrix.  ``"identity"``: each layer ``scale^(1/N)`` times a (rectangular)
        identity.
    widths : sequence of int, optional
        Hidden widths ``d_1, ..., d_{N-1}``; default ``min(n_rows, n_cols)``.
    generator : torch.Generator
        Source of randomness.
    dtype : torch.dtype
        Dtype of the returned layers.
    positive_det : bool
        Square end matrix only: flip the sign of the first column of the first
        layer (that is, of the first column of ``W_e``) when ``det(W_e) < 0``, so
        that every batch entry starts with ``det(W_e) > 0`` (Razin & Cohen 2020,
        Arora et al. 2019).  The sign is decided on the unscaled draw, so tiny scales
        whose determinant underflows are handled too.

    Returns
    -------
    list of Tensor
        ``N`` layers, layer ``j`` of shape ``(B, d_{j+1}, d_j)``.

    Raises
    ------
    ValueError
        On a non-positive depth or size, a non-positive or non-finite scale, an
        unknown scheme, balanced init with non-full widths, or ``positive_det``
        with a non-square end matrix.
    """
    n_rows, n_cols = _check_shape(shape)
    sizes = layer_sizes(shape, depth, widths)
    depth = len(sizes) - 1
    scale_list = _check_positive_list("scales", scales)
    _check_generator("generator", generator)
    _check_float_dtype("dtype", dtype)
    if scheme not in SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    if positive_det and n_rows != n_cols:
        raise ValueError(f"positive_det needs a square end matrix, got shape {(n_rows, n_cols)}")
    k = min(n_rows, n_cols)

    base: list[Tensor]
    if scheme == "gaussian":
        base = [
            torch.randn(sizes[j + 1], sizes[j], generator=generator, dtype=torch.float64)
            / math.sqrt(sizes[j])
            for j in range(depth)
        ]
    elif scheme == "balanced":
        if any(w != k for w in sizes[1:-1]):
            raise ValueError(
                f"balanced init needs every hidden width equal to min(n_rows, n_cols) = {k}, "
                f"got {sizes[1:-1]}"
            )
        z = torch.randn(n_rows, n_cols, generator=generator, dtype=torch.float64)
        z = z * (math.sqrt(k) / torch.linalg.matrix_norm(z))
        u, s, vh = torch.linalg.svd(z, full_matrices=False)  # u (n_rows, k), vh (k, n_cols)
        root = torch.diag(s.pow(1.0 / depth))
        # W_j = Q_{j+1} S^(1/N) Q_j^T with Q_0 = V, Q_N = U, Q_j random orthogonal (hidden).
        frames = [vh.T] + [_random_orthogonal(k, k, generator) for _ in range(depth - 1)] + [u]
        base = [frames[j + 1] @ root @ frames[j].T for j in range(depth)]
    elif scheme == "orthogonal":
        base = [_random_orthogonal(sizes[j + 1], sizes[j], generator) for j in range(depth)]
    else:  # identity
        base = [torch.eye(sizes[j + 1], sizes[j], dtype=torch.float64) for j in range(depth)]

    if positive_det:
        end = base[0]
        for w in base[1:]:
            end = w @ end
        sign, _ = torch.linalg.slogdet(end)
        if float(sign) < 0:
            base[0] = base[0].clone()
            base[0][:, 0] = -base[0][:, 0]

    factor = torch.tensor(scale_list, dtype=torch.float64).pow(1.0 / depth).view(-1, 1, 1)
    return [(factor * w.unsqueeze(0)).to(dtype) for w in base]


def _prefix_products(layers: Sequence[Tensor]) -> list[Tensor]:
    """``[W_1, W_2 W_1, ..., W_N ... W_1]`` (1-based layer names, as in the paper)."""
    prefix = [layers[0]]
    for w in layers[1:]:
        prefix.append(torch.bmm(w, prefix[-1]))
    return prefix


def mf_product(layers: Sequence[Tensor]) -> Tensor:
    """End-to-end matrix ``W_e = W_N ... W_1`` (Arora et al. 2019), shape ``(B, n_rows, n_cols)``.

    Parameters
    ----------
    layers : sequence of Tensor
        Layer ``j`` of shape ``(B, d_{j+1}, d_j)``.

    Returns
    -------
    Tensor
        ``(B, d_N, d_0)``.
    """
    _check_layers(layers)
    return _prefix_products(layers)[-1]


def _layer_grads(layers: Sequence[Tensor], prefix: Sequence[Tensor], g_end: Tensor) -> list[Tensor]:
    n = len(layers)
    grads: list[Tensor] = [g_end] * n
    h = g_end  # (W_N ... W_{j+2})^T G, in 0-based terms H_j for layer j
    for j in range(n - 1, -1, -1):
        grads[j] = h if j == 0 else torch.bmm(h, prefix[j - 1].transpose(1, 2))
        if j > 0:
            h = torch.bmm(layers[j].transpose(1, 2), h)
    return grads


def mf_layer_grads(layers: Sequence[Tensor], g_end: Tensor) -> list[Tensor]:
    """Gradients of ``<G, W_e>`` with respect to every layer (Arora et al. 2019, eq. for dW_j).

    ``dW_j = (W_N ... W_{j+1})^T G (W_{j-1} ... W_1)^T`` (1-based), computed with
    prefix products of the layers and a running product from the top: ``O(N)``
    matrix products in all.

    Parameters
    ----------
    layers : sequence of Tensor
        Layer ``j`` of shape ``(B, d_{j+1}, d_j)``.
    g_end : Tensor
        ``(B, n_rows, n_cols)``: the gradient of the loss with respect to ``W_e``.

    Returns
    -------
    list of Tensor
        One gradient per layer, with the layer's shape.
    """
    batch = _check_layers(layers)
    expected = (batch, layers[-1].shape[1], layers[0].shape[2])
    _check_tensor("g_end", g_end, floating=True)
    if g_end.dtype != layers[0].dtype:
        raise TypeError(f"g_end has dtype {g_end.dtype} but layers have {layers[0].dtype}")
    if tuple(g_end.shape) != expected:
        raise ValueError(f"g_end must have shape {expected}, got {tuple(g_end.shape)}")
    return _layer_grads(layers, _prefix_products(layers), g_end)


class MatrixCompletion:
    """Matrix completion loss ``1/m sum_i l(W_e[r_i, c_i] - y_i)`` and its layer gradients.

    Parameters
    ----------
    shape : sequence of int
        ``(n_rows, n_cols)``.
    rows, cols : Tensor
        Integer tensors ``(m,)`` of observed positions (repeats allowed: each
        counts as one observation).
    y : Tensor
        Observed values ``(m,)``: finite, floating, on the device of ``rows``; the
        layers given to the methods must have its dtype and device.
    """

    def __init__(self, shape: Sequence[int], rows: Tensor, cols: Tensor, y: Tensor):
        self.shape = _check_shape(shape)
        _check_tensor("rows", rows, integer=True)
        _check_tensor("cols", cols, integer=True)
        _check_tensor("y", y, floating=True)
        if rows.dim() != 1 or rows.shape != cols.shape or y.shape != rows.shape:
            raise ValueError(
                "rows, cols and y must be 1-D of the same length, got "
                f"{tuple(rows.shape)}, {tuple(cols.shape)}, {tuple(y.shape)}"
            )
        if rows.numel() == 0:
            raise ValueError("matrix completion needs at least one observed entry")
        _check_same_device("cols", cols, "rows", rows)
        _check_same_device("y", y, "rows", rows)
        _check_finite("y", y)
        rows = rows.to(torch.int64)
        cols = cols.to(torch.int64)
        n_rows, n_cols = self.shape
        for name, pos, size in (("rows", rows, n_rows), ("cols", cols, n_cols)):
            low, high = int(pos.min()), int(pos.max())
            if low < 0 or high >= size:
                raise ValueError(
                    f"{name} must lie in [0, {size}) for a {n_rows} x {n_cols} matrix, "
                    f"got {low if low < 0 else high}"
                )
        self.rows, self.cols = rows, cols
        self.lin = rows * n_cols + cols
        self.y = y
        self.m = int(rows.numel())
        self.size = n_rows * n_cols

    def predict(self, layers: Sequence[Tensor]) -> Tensor:
        """Entries of ``W_e`` at the observations, ``(B, m)``."""
        _check_engine_layers(layers, self.shape, self.y)
        w = _prefix_products(layers)[-1]
        return w.reshape(w.shape[0], -1).index_select(1, self.lin)

    def loss_and_grad(
        self, layers: Sequence[Tensor], loss: PointwiseLoss
    ) -> tuple[Tensor, list[Tensor]]:
        """Mean loss per batch entry ``(B,)`` and the gradient for every layer."""
        _check_engine_layers(layers, self.shape, self.y)
        prefix = _prefix_products(layers)
        w = prefix[-1]
        batch = w.shape[0]
        pred = w.reshape(batch, -1).index_select(1, self.lin)
        val, dval = loss.pointwise(pred - self.y)
        g_end = w.new_zeros(batch, self.size)
        # no alpha=: index_add_ with alpha takes a much slower path on CPU
        g_end.index_add_(1, self.lin, dval / self.m)  # repeats accumulate
        g_end = g_end.view(batch, *self.shape)
        return val.mean(-1), _layer_grads(layers, prefix, g_end)


class MatrixSensing:
    """Matrix sensing loss ``1/m sum_i l(<A_i, W_e> - y_i)`` and its layer gradients.

    Parameters
    ----------
    shape : sequence of int
        ``(n_rows, n_cols)``.
    A : Tensor
        ``(m, n_rows * n_cols)``: row ``i`` is the row-major vectorization of the
        measurement matrix ``A_i`` (one matrix for all measurements).
    y : Tensor
        Measurements ``(m,)``, finite, of ``A``'s dtype and device (which the layers
        given to the methods must share).
    """

    def __init__(self, shape: Sequence[int], A: Tensor, y: Tensor):
        self.shape = _check_shape(shape)
        self.size = self.shape[0] * self.shape[1]
        _check_tensor("A", A, floating=True)
        if A.dim() != 2 or A.shape[1] != self.size:
            raise ValueError(
                f"A must have shape (m, {self.size}) (one row per measurement), "
                f"got {tuple(A.shape)}"
            )
        if A.shape[0] < 1:
            raise ValueError("A must hold at least one measurement (row), got 0")
        _check_finite("A", A)
        _check_targets("y", y, int(A.shape[0]), like=A, like_name="A")
        self.A = A
        self.y = y
        self.m = int(A.shape[0])

    def predict(self, layers: Sequence[Tensor]) -> Tensor:
        """Measurements ``<A_i, W_e>`` of the end matrix, ``(B, m)``."""
        _check_engine_layers(layers, self.shape, self.y)
        w = _prefix_products(layers)[-1]
        return w.reshape(w.shape[0], -1) @ self.A.T

    def loss_and_grad(
        self, layers: Sequence[Tensor], loss: PointwiseLoss
    ) -> tuple[Tensor, list[Tensor]]:
        """Mean loss per batch entry ``(B,)`` and the gradient for every layer."""
        _check_engine_layers(layers, self.shape, self.y)
        prefix = _prefix_products(layers)
        w = prefix[-1]
        batch = w.shape[0]
        pred = w.reshape(batch, -1) @ self.A.T
        val, dval = loss.pointwise(pred - self.y)
        g_end = ((dval / self.m) @ self.A).view(batch, *self.shape)
        return val.mean(-1), _layer_grads(layers, prefix, g_end)
