"""Loss engines of hierarchical tensor factorization: predictions, mean loss and exact gradients.

Same protocol as :mod:`implreg.factorizations.cp_engine` (``m``, ``predict``,
``loss_and_grad(params, loss)`` with the batch of runs first), with analytic
gradients (tested against autograd in ``tests/test_htf.py`` and the engine
conformance tests).

Two ways to the same numbers, chosen by cost (:func:`choose_htf_method`):

* **dense** (:class:`DenseHTFCompletion`): build the end tensor each step up the
  tree as tables of every index combination of a node's modes, ``T_v = KR(T_c) W_v``
  (order 4, modes of 16, widths 512: two ``256 x 512 x 512`` products and the root's
  ``K_12 diag(w_out) K_34^T``, a 256 x 256 matrix), gather the observed entries,
  and back-propagate the sparse end-tensor gradient through the same products.
  The authors' code instead pushes every observed sample through the 512 x 512
  matrices (``m / P_v`` = 8 times the work at 2048 observations).
* **gather** (:class:`GatherHTFCompletion`): push chunks of observations up the
  tree (the network view), for tensors too large to build (order >= 8); memory is
  bounded by the chunk.

:class:`RankOneHTFSensing` measures ``y_i = <x_i1 (x) ... (x) x_iN, W>`` with the
``X_i`` kept as their ``N`` vectors: dense, through the end matrix and the two
Khatri-Rao halves of the vectors, or gathered, each leaf seeing ``x_in^T W_n``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from implreg.factorizations.cp import (
    _check_dims,
    _check_finite,
    _check_index_tuples,
    _check_int,
    _check_targets,
    _check_tensor,
)
from implreg.factorizations.htf import (
    ModeTree,
    check_params,
    dense_tables,
    khatri_rao_rows,
    layout_index,
)
from implreg.losses import PointwiseLoss

Tensor = torch.Tensor

__all__ = [
    "DenseHTFCompletion",
    "DenseHTFSensing",
    "GatherHTFCompletion",
    "GatherHTFSensing",
    "RankOneHTFSensing",
    "choose_htf_method",
    "htf_completion_engine",
    "htf_step_flops",
]

DENSE_MAX = 1 << 24  # largest end tensor built each step


# ------------------------------------------------------------------------------ helpers


def _kr_backward(tables: Sequence[Tensor], grad: Tensor) -> list[Tensor]:
    """Gradients of the tables of :func:`khatri_rao_rows` from the gradient of its output."""
    if len(tables) == 1:
        return [grad]
    prefix = [tables[0]]
    for t in tables[1:-1]:
        prefix.append(khatri_rao_rows([prefix[-1], t]))
    out: list[Tensor] = [grad] * len(tables)
    g = grad
    for j in range(len(tables) - 1, 0, -1):
        a, b = prefix[j - 1], tables[j]
        g4 = g.reshape(g.shape[0], a.shape[1], b.shape[1], g.shape[-1])
        out[j] = (g4 * a.unsqueeze(2)).sum(1)
        g = (g4 * b.unsqueeze(1)).sum(2)
    out[0] = g
    return out


def _hadamard_backward(h: Sequence[Tensor], grad: Tensor) -> list[Tensor]:
    """Gradients of the factors of an element-wise product from the gradient of the product."""
    if len(h) == 2:
        return [grad * h[1], grad * h[0]]
    out = []
    for k in range(len(h)):
        g = grad
        for j, x in enumerate(h):
            if j != k:
                g = g * x
        out.append(g)
    return out


def _check_tree_dims(tree: ModeTree, dims) -> list[int]:
    if not isinstance(tree, ModeTree):
        raise TypeError(f"tree must be a ModeTree, got {type(tree).__name__}")
    dims = _check_dims("dims", dims)
    if len(dims) != tree.order:
        raise ValueError(f"dims has {len(dims)} modes but the tree covers {tree.order}")
    return dims


class _Engine:
    """Shared parameter checks, ``predict`` and the loss."""

    tree: ModeTree
    dims: list[int]
    y: Tensor
    m: int

    def _check(self, params: Sequence[Tensor]) -> None:
        _, dims = check_params(params, self.tree)
        if dims != self.dims:
            raise ValueError(
                f"params have mode sizes {dims} but the engine was built for {self.dims}"
            )
        if params[0].dtype != self.y.dtype:
            raise TypeError(
                f"params have dtype {params[0].dtype} but the observations y have dtype "
                f"{self.y.dtype}; convert one to the other"
            )
        if params[0].device != self.y.device:
            raise ValueError(f"params are on {params[0].device} but y is on {self.y.device}")

    def _observe(self, tree: ModeTree, dims: Sequence[int], idx: Tensor, y: Tensor) -> None:
        """Checked observed entries ``idx (m, N)`` and targets ``y (m,)`` of a completion."""
        self.tree = tree
        self.dims = _check_tree_dims(tree, dims)
        _check_index_tuples("idx", idx, self.dims)
        self.m = int(idx.shape[0])
        if self.m < 1:
            raise ValueError("idx must hold at least one observation")
        self.y = _check_targets("y", y, self.m)
        self.idx = idx.to(y.device)

    def _loss(self, pred: Tensor, loss: PointwiseLoss) -> tuple[Tensor, Tensor]:
        value, slope = loss.pointwise(pred - self.y)
        return value.mean(1), slope / self.m


# ------------------------------------------------------------------------------ dense path


def _dense_forward(params: Sequence[Tensor], tree: ModeTree):
    tables = dense_tables(params, tree)
    kids = tree.children[tree.root]
    left = khatri_rao_rows([tables[c] for c in kids[:-1]])
    scaled = left * params[tree.root].unsqueeze(1)
    end = scaled @ tables[kids[-1]].transpose(1, 2)  # (B, P_left, P_last)
    return end, tables, left, scaled


def _dense_backward(
    params: Sequence[Tensor], tree: ModeTree, tables, left: Tensor, scaled: Tensor, grad: Tensor
) -> list[Tensor]:
    """Gradients of every parameter from the gradient ``(B, P_left, P_last)`` of the end matrix."""
    root, kids = tree.root, tree.children[tree.root]
    grads: list[Tensor | None] = [None] * len(tree.nodes)
    d_tables: dict[int, Tensor] = {}
    gr = grad @ tables[kids[-1]]  # (B, P_left, R_root)
    grads[root] = (left * gr).sum(1)
    d_tables[kids[-1]] = grad.transpose(1, 2) @ scaled
    for c, g in zip(
        kids[:-1], _kr_backward([tables[c] for c in kids[:-1]], gr * params[root].unsqueeze(1))
    ):
        d_tables[c] = g
    for v in reversed(tree.internal[:-1]):
        kr = khatri_rao_rows([tables[c] for c in tree.children[v]])
        dt = d_tables.pop(v)
        grads[v] = kr.transpose(1, 2) @ dt
        dz = dt @ params[v].transpose(1, 2)
        for c, g in zip(tree.children[v], _kr_backward([tables[c] for c in tree.children[v]], dz)):
            d_tables[c] = g
    for n in range(tree.order):
        grads[n] = d_tables[n]
    return grads  # type: ignore[return-value]


class DenseHTFCompletion(_Engine):
    """Completion from observed entries ``idx (m, N)``, ``y (m,)`` through the end tensor
    built each step (for end tensors up to about ``DENSE_MAX`` entries)."""

    def __init__(self, tree: ModeTree, dims: Sequence[int], idx: Tensor, y: Tensor):
        self._observe(tree, dims, idx, y)
        self.pos = layout_index(self.idx, tree, self.dims)
        kids = tree.children[tree.root]
        self.p_last = math.prod(self.dims[m] for m in tree.layout(kids[-1]))
        self.size = math.prod(self.dims)

    def predict(self, params: Sequence[Tensor]) -> Tensor:
        self._check(params)
        end, *_ = _dense_forward(params, self.tree)
        return end.reshape(end.shape[0], -1)[:, self.pos]

    def loss_and_grad(self, params: Sequence[Tensor], loss: PointwiseLoss):
        self._check(params)
        end, tables, left, scaled = _dense_forward(params, self.tree)
        flat = end.reshape(end.shape[0], -1)
        values, slope = self._loss(flat[:, self.pos], loss)
        grad = torch.zeros_like(flat).index_add_(1, self.pos, slope)
        grads = _dense_backward(params, self.tree, tables, left, scaled, grad.view_as(end))
        return values, grads


class DenseHTFSensing(_Engine):
    """Rank-one sensing ``y_i = <x_i1 (x) ... (x) x_iN, W>`` through the end matrix: the
    vectors are combined into two Khatri-Rao halves ``A (m, P_left)`` and ``C (m, P_last)``
    once, and ``y_i = A_i^T E C_i``; no measurement tensor is built."""

    def __init__(self, tree: ModeTree, dims: Sequence[int], vectors: Sequence[Tensor], y: Tensor):
        self.tree = tree
        self.dims = _check_tree_dims(tree, dims)
        self.m = _check_vectors(vectors, self.dims)
        self.y = _check_targets("y", y, self.m, like=vectors[0], like_name="vectors[0]")
        kids = tree.children[tree.root]
        left_modes = [m for c in kids[:-1] for m in tree.layout(c)]
        right_modes = list(tree.layout(kids[-1]))
        self.a = _row_kron([vectors[m] for m in left_modes])
        self.c = _row_kron([vectors[m] for m in right_modes])

    def predict(self, params: Sequence[Tensor]) -> Tensor:
        self._check(params)
        end, *_ = _dense_forward(params, self.tree)
        return ((self.a @ end) * self.c).sum(-1)

    def loss_and_grad(self, params: Sequence[Tensor], loss: PointwiseLoss):
        self._check(params)
        end, tables, left, scaled = _dense_forward(params, self.tree)
        values, slope = self._loss(((self.a @ end) * self.c).sum(-1), loss)
        grad = self.a.t() @ (slope.unsqueeze(-1) * self.c)
        return values, _dense_backward(params, self.tree, tables, left, scaled, grad)


def _row_kron(vectors: Sequence[Tensor]) -> Tensor:
    out = vectors[0]
    for v in vectors[1:]:
        out = (out.unsqueeze(2) * v.unsqueeze(1)).reshape(out.shape[0], -1)
    return out


def _check_vectors(vectors, dims: Sequence[int]) -> int:
    if isinstance(vectors, Tensor) or not isinstance(vectors, Sequence):
        raise TypeError("vectors must be a list of tensors (m, d_n), one per mode")
    if len(vectors) != len(dims):
        raise ValueError(
            f"vectors must hold {len(dims)} tensors (one per mode), got {len(vectors)}"
        )
    m = None
    for n, v in enumerate(vectors):
        _check_tensor(f"vectors[{n}]", v, floating=True)
        if v.dim() != 2 or v.shape[1] != dims[n] or (m is not None and v.shape[0] != m):
            raise ValueError(f"vectors[{n}] must have shape (m, {dims[n]}), got {tuple(v.shape)}")
        if v.dtype != vectors[0].dtype or v.device != vectors[0].device:
            raise ValueError(f"vectors[{n}] differs from vectors[0] in dtype or device")
        _check_finite(f"vectors[{n}]", v)
        m = int(v.shape[0])
    if not m:
        raise ValueError("vectors must hold at least one measurement")
    return m


# ----------------------------------------------------------------------------- gather path


class _GatherEngine(_Engine):
    """Chunks of observations pushed up the tree from a *frontier* of nodes.

    Nodes in ``self.table_nodes`` (leaves, and internal nodes all of whose children are
    tables and whose index combinations number at most ``table_max``) are built whole each
    step as dense tables ``T_v = KR(T_c) W_v`` (``(B, P_v, R_parent)``), as the dense
    engine does; the observations are then gathered from the frontier (table nodes whose
    parent is not one) and pushed up the rest of the tree in chunks.  The gradient flows
    back the same way: scattered into the frontier tables, then through the table
    products.  Subclasses give the frontier rows and their gradient.
    """

    chunk: int
    table_nodes: frozenset[int]

    def _setup_tables(self, table_max: int) -> None:
        tree = self.tree
        tables = _table_nodes(tree, self.dims, table_max)
        self.table_nodes = frozenset(tables)
        self.frontier = tuple(v for v in sorted(tables) if tree.parent(v) not in tables)
        self.gathered = tuple(v for v in tree.internal if v not in tables)

    def _rows(self, tables, v: int, s: int, e: int) -> Tensor: ...

    def _rows_grad(self, d_tables, v: int, s: int, e: int, dh: Tensor) -> None: ...

    def _tables(self, params):
        tables: dict[int, Tensor] = {n: params[n] for n in range(self.tree.order)}
        for v in self.tree.internal[:-1]:
            if v in self.table_nodes:
                kids = [tables[c] for c in self.tree.children[v]]
                tables[v] = khatri_rao_rows(kids) @ params[v]
        return tables

    def _forward(self, params, tables, s: int, e: int):
        tree = self.tree
        h = {v: self._rows(tables, v, s, e) for v in self.frontier}
        z = {}
        for v in self.gathered:
            kids = tree.children[v]
            prod = h[kids[0]]
            for c in kids[1:]:
                prod = prod * h[c]
            z[v] = prod
            if v != tree.root:
                h[v] = prod @ params[v]
        pred = (z[tree.root] * params[tree.root].unsqueeze(1)).sum(-1)
        return pred, h, z

    def predict(self, params: Sequence[Tensor]) -> Tensor:
        self._check(params)
        tables = self._tables(params)
        return torch.cat(
            [
                self._forward(params, tables, s, min(s + self.chunk, self.m))[0]
                for s in range(0, self.m, self.chunk)
            ],
            dim=1,
        )

    def loss_and_grad(self, params: Sequence[Tensor], loss: PointwiseLoss):
        self._check(params)
        tree, root = self.tree, self.tree.root
        tables = self._tables(params)
        grads: list[Tensor | None] = [None] * len(params)
        for v in self.gathered:
            grads[v] = torch.zeros_like(params[v])
        d_tables = {v: torch.zeros_like(tables[v]) for v in self.frontier}
        total = params[0].new_zeros(params[0].shape[0])
        for s in range(0, self.m, self.chunk):
            e = min(s + self.chunk, self.m)
            pred, h, z = self._forward(params, tables, s, e)
            value, slope = loss.pointwise(pred - self.y[s:e])
            total = total + value.sum(1)
            slope = slope / self.m
            grads[root] += (z[root] * slope.unsqueeze(-1)).sum(1)
            dh: dict[int, Tensor] = {}
            dz = slope.unsqueeze(-1) * params[root].unsqueeze(1)
            kids = tree.children[root]
            for c, g in zip(kids, _hadamard_backward([h[c] for c in kids], dz)):
                dh[c] = g
            for v in reversed(self.gathered[:-1]):
                d = dh.pop(v)
                grads[v] += z[v].transpose(1, 2) @ d
                dz = d @ params[v].transpose(1, 2)
                kids = tree.children[v]
                for c, g in zip(kids, _hadamard_backward([h[c] for c in kids], dz)):
                    dh[c] = g
            for v in self.frontier:
                self._rows_grad(d_tables, v, s, e, dh[v])
        # back through the table products (children before parents, so reversed)
        for v in reversed(tree.internal[:-1]):
            if v not in self.table_nodes:
                continue
            kids = tree.children[v]
            kr = khatri_rao_rows([tables[c] for c in kids])
            dt = d_tables.pop(v)
            grads[v] = kr.transpose(1, 2) @ dt
            for c, g in zip(
                kids, _kr_backward([tables[c] for c in kids], dt @ params[v].transpose(1, 2))
            ):
                d_tables[c] = g
        for n in range(tree.order):
            grads[n] = d_tables[n]
        return total / self.m, grads  # type: ignore[return-value]


class GatherHTFCompletion(_GatherEngine):
    """Completion by pushing ``chunk`` observations at a time up the tree (the network view)
    from dense tables of the nodes with at most ``table_max`` index combinations (default:
    the number of observations, so a table is never larger than the work it replaces;
    ``table_max=0`` gathers from the leaves).  The end tensor is never built; memory grows
    with ``chunk x widths`` and the tables, not the tensor."""

    def __init__(
        self,
        tree: ModeTree,
        dims: Sequence[int],
        idx: Tensor,
        y: Tensor,
        *,
        chunk: int = 4096,
        table_max: int | None = None,
    ):
        self._observe(tree, dims, idx, y)
        self.chunk = _check_int("chunk", chunk, minimum=1)
        table_max = self.m if table_max is None else _check_int("table_max", table_max, minimum=0)
        self._setup_tables(table_max)
        self.lin = {}
        for v in self.frontier:
            pos = torch.zeros(self.m, dtype=torch.int64, device=self.idx.device)
            for mode in tree.layout(v):
                pos = pos * self.dims[mode] + self.idx[:, mode]
            self.lin[v] = pos

    def _rows(self, tables, v, s, e):
        return tables[v][:, self.lin[v][s:e], :]

    def _rows_grad(self, d_tables, v, s, e, dh):
        d_tables[v].index_add_(1, self.lin[v][s:e], dh)


class GatherHTFSensing(_GatherEngine):
    """Rank-one sensing with each leaf seeing ``x_in^T W_n``, ``chunk`` measurements at a time."""

    def __init__(
        self,
        tree: ModeTree,
        dims: Sequence[int],
        vectors: Sequence[Tensor],
        y: Tensor,
        *,
        chunk: int = 4096,
    ):
        self.tree = tree
        self.dims = _check_tree_dims(tree, dims)
        self.m = _check_vectors(vectors, self.dims)
        self.y = _check_targets("y", y, self.m, like=vectors[0], like_name="vectors[0]")
        self.vectors = list(vectors)
        self.chunk = _check_int("chunk", chunk, minimum=1)
        self._setup_tables(0)  # a measurement touches every row: gather from the leaves

    def _rows(self, tables, v, s, e):
        return torch.matmul(self.vectors[v][s:e], tables[v])

    def _rows_grad(self, d_tables, v, s, e, dh):
        d_tables[v] += self.vectors[v][s:e].t() @ dh


# ------------------------------------------------------------------------------- choosing


# A gathered row element (gather, product, scatter-add) costs about this many multiply-adds of
# a matrix product: measured 2026-11-30, the order-4 width-512 root gathered for 2048
# observations took 16 ms against 2.5 ms for its three dense 65536 x 512 products
GATHER_PENALTY = 256


def _table_nodes(tree: ModeTree, dims: Sequence[int], table_max: int) -> set[int]:
    tables = set(range(tree.order))
    for v in tree.internal[:-1]:
        size = math.prod(dims[m] for m in tree.nodes[v])
        if size <= table_max and all(c in tables for c in tree.children[v]):
            tables.add(v)
    return tables


def htf_step_flops(
    tree: ModeTree,
    dims: Sequence[int],
    widths,
    m: int,
    method: str,
    *,
    penalty: float = 0.0,
    sensing: bool = False,
) -> float:
    """Multiply-adds of one loss-and-gradient step of one run (forward and backward): dense,
    or gather (tables of the nodes with at most ``m`` index combinations, the rest per
    observation; ``sensing`` gathers from the leaves).  ``penalty`` charges each gathered
    row element that many multiply-adds (:data:`GATHER_PENALTY` when choosing)."""
    dims = list(dims)
    shapes = tree.shapes(dims, widths)
    if method == "dense":
        flops = 0.0
        for v in tree.internal[:-1]:
            p = math.prod(dims[m] for m in tree.nodes[v])
            flops += 3 * p * shapes[v][0] * shapes[v][1]
        return flops + 3 * math.prod(dims) * shapes[tree.root][0]  # the root's three products
    tables = _table_nodes(tree, dims, 0 if sensing else m)
    flops = 0.0
    for v in tree.internal[:-1]:
        if v in tables:
            p = math.prod(dims[m] for m in tree.nodes[v])
            flops += 3 * p * shapes[v][0] * shapes[v][1]
        else:
            flops += 3.0 * m * shapes[v][0] * shapes[v][1]
    frontier = [v for v in tables if tree.parent(v) not in tables]
    rows = sum(shapes[v][-1] for v in frontier)
    if sensing:
        rows = sum(shapes[v][0] * shapes[v][1] for v in frontier)
    return flops + 3.0 * m * shapes[tree.root][0] + m * rows * (penalty + (3 if sensing else 0))


def choose_htf_method(
    tree: ModeTree, dims: Sequence[int], widths, m: int, *, dense_max: int = DENSE_MAX
) -> str:
    """``dense`` when the end tensor fits ``dense_max`` entries and costs less than gathering
    the ``m`` observations (:data:`GATHER_PENALTY` per gathered row element), else
    ``gather``."""
    if math.prod(dims) > dense_max:
        return "gather"
    dense = htf_step_flops(tree, dims, widths, m, "dense")
    gather = htf_step_flops(tree, dims, widths, m, "gather", penalty=GATHER_PENALTY)
    return "dense" if dense <= gather else "gather"


def htf_completion_engine(
    tree: ModeTree,
    dims: Sequence[int],
    idx: Tensor,
    y: Tensor,
    *,
    widths=None,
    method: str = "auto",
    chunk: int = 4096,
):
    """The completion engine ``method`` names (``auto``: :func:`choose_htf_method` given the
    ``widths``; without them, dense whenever the end tensor fits ``DENSE_MAX``)."""
    if method not in ("auto", "dense", "gather"):
        raise ValueError(f"method must be auto, dense or gather, got {method!r}")
    if method == "auto" and widths is None:
        method = "dense" if math.prod(_check_tree_dims(tree, dims)) <= DENSE_MAX else "gather"
    elif method == "auto":
        method = choose_htf_method(tree, dims, widths, int(idx.shape[0]))
    if method == "dense":
        return DenseHTFCompletion(tree, dims, idx, y)
    return GatherHTFCompletion(tree, dims, idx, y, chunk=chunk)


def RankOneHTFSensing(  # noqa: N802 - an engine chosen by size, named like the classes
    tree: ModeTree,
    dims: Sequence[int],
    vectors: Sequence[Tensor],
    y: Tensor,
    *,
    widths=None,
    method: str = "auto",
):
    """Rank-one sensing engine: dense through the end matrix when the tensor is small enough
    (and ``widths`` make it cheaper), else gathered."""
    if method not in ("auto", "dense", "gather"):
        raise ValueError(f"method must be auto, dense or gather, got {method!r}")
    if method == "auto":
        m = int(vectors[0].shape[0]) if len(vectors) else 0
        size = math.prod(_check_tree_dims(tree, dims))
        if widths is None or size > DENSE_MAX:
            method = "dense" if size <= DENSE_MAX else "gather"
        else:  # the dense sensing step adds two m x P products to the dense model's
            dense = htf_step_flops(tree, dims, widths, m, "dense") + 2.0 * m * size
            gather = htf_step_flops(tree, dims, widths, m, "gather", sensing=True)
            method = "dense" if dense <= gather else "gather"
    if method == "dense":
        return DenseHTFSensing(tree, dims, vectors, y)
    return GatherHTFSensing(tree, dims, vectors, y)
