"""Hierarchical tensor factorization (HTF) over any mode tree, batched over runs.

Razin, Maman & Cohen, "Implicit Regularization in Hierarchical Tensor Factorization and
Deep Convolutional Neural Networks" (ICML 2022), as described in Razin's 2022 blog post
on it: a mode tree over the ``N`` modes; each leaf ``n`` holds
a matrix ``W_n`` of shape ``d_n x R_parent``, each other non-root node ``v`` its own ``R_v
x R_parent`` matrix (nothing shared), the root an output vector ``w_out`` of length
``R_root``. An entry of the end tensor is computed up the tree::

    h_leaf(n) = W_n[i_n, :]
    h_v       = (prod_{c in children(v)} h_c) W_v        (Hadamard product)
    value     = (prod_{c in children(root)} h_c) . w_out

which is the network view of the blog post (a deep convolutional network): one-hot inputs, a
locally connected layer per leaf, product pooling over the tree.  The local
component ``r`` of an internal node ``v`` is the rank-one term formed by
column ``r`` of each child's matrix and row ``r`` of ``W_v``; its norm
``prod_c ||W_c[:, r]|| * ||W_v[r, :]||`` (``|w_out[r]|`` at the root) evolves
as ``dσ/dt ∝ σ^{2 - 2/K}`` with ``K`` = children + 1 (the blog post's informal theorem), and
the hierarchical tensor rank is read from the matricizations of the end tensor
over the modes of each tree node (hierarchical tensor rank, as in the blog post).

Parameters are one tensor per node, in node order, each with the batch of
runs as its first axis (like :mod:`implreg.factorizations.cp`):
leaf ``(B, d_n, R_parent)``, internal non-root ``(B, R_v, R_parent)``, root
``(B, R_root)``.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from implreg.factorizations.cp import (
    _check_dims,
    _check_float_dtype,
    _check_generator,
    _check_index_tuples,
    _check_int,
    _check_positive_list,
    _check_real,
)

Tensor = torch.Tensor

__all__ = [
    "ModeTree",
    "htf_init",
    "htf_local_norms",
    "htf_network",
    "htf_to_tensor",
    "htf_unbalancedness",
    "htf_values",
    "matricize",
]


# ----------------------------------------------------------------------------- the mode tree


def _nested_text(item) -> str:
    if isinstance(item, int):
        return str(item + 1)
    if len(item) == 1:  # a one-child node, written as Python writes a one-element tuple
        return "(" + _nested_text(item[0]) + ",)"
    return "(" + ",".join(_nested_text(c) for c in item) + ")"


@dataclass(frozen=True)
class ModeTree:
    """A tree over the modes ``0..order-1``.

    ``nodes[v]`` is the sorted tuple of modes under node ``v``: the leaves come
    first (node ``n`` is ``(n,)``), then the internal nodes with children
    before parents, and the root (every mode) last.  ``children[v]`` lists the
    children of ``v`` in order (empty for leaves).

    A non-root internal node may have a single child: it holds its own ``R_v x R_parent``
    matrix over the same modes, as the authors' implementation gives a mode left alone by
    the pooling at odd orders (order 3: ``((1,2),(3,))``, see :meth:`checkerboard`).  The
    root needs at least two children.
    """

    order: int
    nodes: tuple[tuple[int, ...], ...]
    children: tuple[tuple[int, ...], ...]

    # ---- construction
    @classmethod
    def from_nested(cls, nested) -> ModeTree:
        """From nested tuples of 0-based modes, e.g. ``((0, 1), (2, 3))``."""
        modes: list[int] = []

        def collect(item, depth: int) -> None:
            if isinstance(item, bool) or not isinstance(item, (int, tuple, list)):
                raise ValueError(f"a mode tree holds modes and groups, not {item!r}")
            if isinstance(item, int):
                modes.append(item)
                return
            if not item:
                raise ValueError("a group of a mode tree cannot be empty")
            if depth == 0 and len(item) < 2:
                raise ValueError(
                    f"the root of a mode tree needs at least two children, got {_nested_text(item)}"
                )
            for c in item:
                collect(c, depth + 1)

        if isinstance(nested, int):
            raise ValueError("a mode tree needs at least two modes under its root")
        collect(nested, 0)
        order = len(modes)
        if sorted(modes) != list(range(order)):
            seen = [m + 1 for m in modes]
            missing = sorted(set(range(1, order + 1)) - set(seen))
            twice = sorted({m for m in seen if seen.count(m) > 1})
            out = sorted(m for m in seen if not 1 <= m <= order)
            what = (
                f"mode {twice[0]} appears twice"
                if twice
                else f"mode {out[0]} is not one of 1..{order}"
                if out
                else f"mode {missing[0]} is missing"
            )
            raise ValueError(
                f"a mode tree must name every mode 1..{order} exactly once: {what} "
                f"in {_nested_text(nested)}"
            )
        nodes: list[tuple[int, ...]] = [(n,) for n in range(order)]
        children: list[tuple[int, ...]] = [() for _ in range(order)]

        def build(item) -> int:
            if isinstance(item, int):
                return item
            kids = tuple(build(c) for c in item)
            nodes.append(tuple(sorted(m for k in kids for m in nodes[k])))
            children.append(kids)
            return len(nodes) - 1

        build(nested)
        return cls(order, tuple(nodes), tuple(children))

    @classmethod
    def adjacent(cls, order: int, pool: int = 2) -> ModeTree:
        """Adjacent modes merged in groups of ``pool`` per level (the paper's default, pool 2).

        A short last group is kept; a lone node is passed up to the next level as it is."""
        order = _check_int("order", order, minimum=2)
        pool = _check_int("pool", pool, minimum=2)
        level: list = list(range(order))
        while len(level) > 1:
            nxt = []
            for s in range(0, len(level), pool):
                group = level[s : s + pool]
                nxt.append(group[0] if len(group) == 1 else tuple(group))
            level = nxt
        return cls.from_nested(level[0])

    @classmethod
    def checkerboard(cls, order: int, pool: int = 2) -> ModeTree:
        """The authors' default tree (asafmaman101/imp_reg_htf, pool pattern "checkerboard"):
        adjacent nodes merged in groups of ``pool`` per level, and a node left alone at a
        level kept as a one-child node with its own matrix (order 3: ``((1,2),(3,))``;
        order 5: ``(((1,2),(3,4)),((5,),))``).  Equal to :meth:`adjacent` when ``order``
        is a power of ``pool``."""
        order = _check_int("order", order, minimum=2)
        pool = _check_int("pool", pool, minimum=2)
        level: list = list(range(order))
        while len(level) > 1:
            level = [tuple(level[s : s + pool]) for s in range(0, len(level), pool)]
        return cls.from_nested(level[0])

    @classmethod
    def interleaved(cls, order: int) -> ModeTree:
        """Mode ``i`` paired with mode ``i + N/2`` at the first level, then adjacent pairs."""
        order = _check_int("order", order, minimum=2)
        if order % 2:
            raise ValueError(f"the interleaved tree needs an even order, got {order}")
        half = order // 2
        level: list = [(i, i + half) for i in range(half)]
        while len(level) > 1:
            level = [
                tuple(level[s : s + 2]) if s + 1 < len(level) else level[s]
                for s in range(0, len(level), 2)
            ]
        return cls.from_nested(level[0])

    @classmethod
    def parse(cls, spec: str, order: int) -> ModeTree:
        """``"adjacent"``, ``"adjacent:P"`` (pool ``P``), ``"checkerboard"``,
        ``"checkerboard:P"``, ``"interleaved"``, or nested 1-based groups such as
        ``"((1,2),(3,4))"``; a one-child node is written ``(3,)`` or ``[3]``."""
        if not isinstance(spec, str):
            raise TypeError(f"tree must be a string, got {type(spec).__name__}")
        order = _check_int("order", order, minimum=2)
        text = spec.strip()
        for kind, build in (("adjacent", cls.adjacent), ("checkerboard", cls.checkerboard)):
            if text == kind:
                return build(order)
            if text.startswith(f"{kind}:"):
                try:
                    pool = int(text.split(":", 1)[1])
                except ValueError:
                    raise ValueError(
                        f"tree {spec!r}: the pool after '{kind}:' must be an integer"
                    ) from None
                if pool < 2:
                    raise ValueError(f"tree {spec!r}: the pool must be at least 2")
                return build(order, pool)
        if text == "interleaved":
            return cls.interleaved(order)
        if not text:
            raise ValueError(
                "tree is empty; use adjacent, checkerboard, interleaved or nested groups like "
                "((1,2),(3,4))"
            )
        try:
            nested = ast.literal_eval(text)
        except (SyntaxError, ValueError, MemoryError, RecursionError):
            raise ValueError(
                f"tree {spec!r} is neither adjacent, adjacent:P, checkerboard, checkerboard:P, "
                "interleaved nor nested groups of 1-based modes like ((1,2),(3,4))"
            ) from None

        def shift(item):
            if isinstance(item, bool) or not isinstance(item, (int, tuple, list)):
                raise ValueError(f"tree {spec!r} holds {item!r}, which is not a mode number")
            return item - 1 if isinstance(item, int) else tuple(shift(c) for c in item)

        tree = cls.from_nested(shift(nested))
        if tree.order != order:
            raise ValueError(f"tree {spec!r} covers {tree.order} modes but the tensor has {order}")
        return tree

    # ---- structure
    @property
    def root(self) -> int:
        return len(self.nodes) - 1

    @cached_property
    def internal(self) -> tuple[int, ...]:
        return tuple(v for v in range(len(self.nodes)) if self.children[v])

    @cached_property
    def _parents(self) -> tuple[int | None, ...]:
        out: list[int | None] = [None] * len(self.nodes)
        for v, kids in enumerate(self.children):
            for c in kids:
                out[c] = v
        return tuple(out)

    def parent(self, v: int) -> int | None:
        return self._parents[v]

    @cached_property
    def _heights(self) -> tuple[int, ...]:
        h = [0] * len(self.nodes)
        for v in range(len(self.nodes)):  # children come before parents
            if self.children[v]:
                h[v] = 1 + max(h[c] for c in self.children[v])
        return tuple(h)

    def height(self, v: int) -> int:
        return self._heights[v]

    def layout(self, v: int) -> tuple[int, ...]:
        """The modes under ``v`` in depth-first order (the row order of its dense tables)."""
        if not self.children[v]:
            return self.nodes[v]
        return tuple(m for c in self.children[v] for m in self.layout(c))

    @property
    def leaf_order(self) -> tuple[int, ...]:
        return self.layout(self.root)

    def nested(self, v: int | None = None):
        v = self.root if v is None else v
        return v if not self.children[v] else tuple(self.nested(c) for c in self.children[v])

    def describe(self) -> str:
        """Nested 1-based groups, e.g. ``((1,2),(3,4))``; :meth:`parse` reads it back."""
        return _nested_text(self.nested())

    def node_text(self, v: int) -> str:
        """A node's modes as the paper writes them, e.g. ``{1,2}``; a one-child node gets a
        prime per one-child level below it (``{3}'`` above leaf ``{3}``), so labels stay
        distinct."""
        primes, u = 0, v
        while len(self.children[u]) == 1:
            primes, u = primes + 1, self.children[u][0]
        return "{" + ",".join(str(m + 1) for m in self.nodes[v]) + "}" + "'" * primes

    def resolve_widths(self, widths) -> tuple[int, ...]:
        """One width (number of local components) per internal node, in ``internal`` order.

        ``widths``: an int; a sequence indexed by height - 1 (``[512, 512]`` gives the
        order-4 tree's two middle nodes and its root 512 each); or a mapping from internal
        node index to width."""
        if isinstance(widths, Mapping):
            out = []
            for v in self.internal:
                if v not in widths:
                    raise ValueError(
                        f"widths has no entry for internal node {v} {self.node_text(v)}"
                    )
                out.append(_check_int(f"widths[{v}]", widths[v], minimum=1))
            extra = sorted(set(widths) - set(self.internal), key=str)
            if extra:
                raise ValueError(f"widths names {extra[0]!r}, which is not an internal node")
            return tuple(out)
        if isinstance(widths, (str, bytes)):
            raise TypeError(f"widths must be an int, a sequence or a mapping, got {widths!r}")
        if isinstance(widths, Sequence) or hasattr(widths, "tolist"):
            widths = list(widths.tolist() if hasattr(widths, "tolist") else widths)
            top = max(self.height(v) for v in self.internal)
            if len(widths) != top:
                raise ValueError(
                    f"widths must give one width per level of the tree ({top} levels for "
                    f"{self.describe()}), got {len(widths)}"
                )
            return tuple(
                _check_int(f"widths[{self.height(v) - 1}]", widths[self.height(v) - 1], minimum=1)
                for v in self.internal
            )
        w = _check_int("widths", widths, minimum=1)
        return tuple(w for _ in self.internal)

    def shapes(self, dims: Sequence[int], widths) -> list[tuple[int, ...]]:
        """The parameter shape of every node (without the batch axis)."""
        dims = _check_dims("dims", dims)
        if len(dims) != self.order:
            raise ValueError(f"dims has {len(dims)} modes but the tree covers {self.order}")
        width = dict(zip(self.internal, self.resolve_widths(widths)))
        out = []
        for v in range(len(self.nodes)):
            p = self.parent(v)
            if p is None:
                out.append((width[v],))
            elif not self.children[v]:
                out.append((dims[v], width[p]))
            else:
                out.append((width[v], width[p]))
        return out


def check_params(
    params: Sequence[Tensor], tree: ModeTree, name: str = "params"
) -> tuple[int, list[int]]:
    """Parameters fitting ``tree``: one floating tensor per node with one batch, dtype and
    device, widths agreeing between children and parents.  Returns the batch and mode sizes."""
    if not isinstance(tree, ModeTree):
        raise TypeError(f"tree must be a ModeTree, got {type(tree).__name__}")
    if isinstance(params, Tensor) or not isinstance(params, Sequence):
        raise TypeError(f"{name} must be a list of tensors, one per tree node")
    if len(params) != len(tree.nodes):
        raise ValueError(
            f"{name} must hold {len(tree.nodes)} tensors (one per node of {tree.describe()}), "
            f"got {len(params)}"
        )
    first = params[0]
    for v, p in enumerate(params):
        if not isinstance(p, Tensor) or not p.is_floating_point():
            raise TypeError(f"{name}[{v}] must be a floating-point tensor")
        want = 2 if v == tree.root else 3
        if p.dim() != want:
            raise ValueError(f"{name}[{v}] must have {want} axes, got shape {tuple(p.shape)}")
        if p.shape[0] != first.shape[0] or p.dtype != first.dtype or p.device != first.device:
            raise ValueError(f"{name}[{v}] differs from {name}[0] in batch, dtype or device")
    for v in tree.internal:
        r = params[v].shape[1]
        for c in tree.children[v]:
            if params[c].shape[-1] != r:
                raise ValueError(
                    f"{name}[{c}] has {params[c].shape[-1]} columns but its parent "
                    f"{tree.node_text(v)} has {r} local components"
                )
    return int(first.shape[0]), [int(params[n].shape[1]) for n in range(tree.order)]


# ------------------------------------------------------------------------------ construction


def htf_init(
    dims: Sequence[int],
    tree: ModeTree,
    widths,
    *,
    stds: Sequence[float],
    mean: float = 0.0,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
) -> list[Tensor]:
    """Random parameters with i.i.d. entries ``N(mean, std^2)``, one batch entry per std.

    As :func:`~implreg.factorizations.cp.cp_init`: one standard-normal draw ``Z``
    per node (in node order) is shared by the batch, entry ``b`` is ``mean + std_b Z``.
    """
    if not isinstance(tree, ModeTree):
        raise TypeError(f"tree must be a ModeTree, got {type(tree).__name__}")
    shapes = tree.shapes(dims, widths)
    std_list = _check_positive_list("stds", stds)
    mean = _check_real("mean", mean)
    _check_generator("generator", generator)
    _check_float_dtype("dtype", dtype)
    scale = torch.tensor(std_list, dtype=torch.float64)
    out = []
    for shape in shapes:
        z = torch.randn(1, *shape, generator=generator, dtype=torch.float64)
        out.append((mean + scale.view(-1, *[1] * len(shape)) * z).to(dtype))
    return out


# ------------------------------------------------------------------------- dense evaluation


def khatri_rao_rows(tables: Sequence[Tensor]) -> Tensor:
    """Row-wise Khatri-Rao product of ``(B, P_k, R)`` tables: ``(B, prod P_k, R)``, rows in
    lexicographic order of the tables' rows (first table slowest)."""
    out = tables[0]
    for t in tables[1:]:
        b, p, r = out.shape
        out = (out.unsqueeze(2) * t.unsqueeze(1)).reshape(b, p * t.shape[1], r)
    return out


def dense_tables(params: Sequence[Tensor], tree: ModeTree) -> dict[int, Tensor]:
    """For every non-root node ``v`` its table ``T_v`` of shape ``(B, P_v, R_parent)``: the
    vector ``h_v`` of every index combination of its modes, rows in ``tree.layout(v)`` order."""
    tables: dict[int, Tensor] = {n: params[n] for n in range(tree.order)}
    for v in tree.internal[:-1]:
        tables[v] = khatri_rao_rows([tables[c] for c in tree.children[v]]) @ params[v]
    return tables


def end_matrix(params: Sequence[Tensor], tree: ModeTree, tables: dict[int, Tensor]) -> Tensor:
    """The end tensor as ``(B, P_left, P_last)``: rows the root's children but the last,
    columns its last child, both in layout order; ``K_left diag(w_out) T_last^T``."""
    kids = tree.children[tree.root]
    left = khatri_rao_rows([tables[c] for c in kids[:-1]])
    return (left * params[tree.root].unsqueeze(1)) @ tables[kids[-1]].transpose(1, 2)


def _from_layout(flat: Tensor, tree: ModeTree, dims: Sequence[int]) -> Tensor:
    order = tree.leaf_order
    t = flat.reshape(flat.shape[0], *[dims[m] for m in order])
    inverse = [order.index(n) for n in range(tree.order)]
    return t.permute(0, *[1 + i for i in inverse])


def htf_to_tensor(params: Sequence[Tensor], tree: ModeTree) -> Tensor:
    """The end tensor ``(B, d_1, ..., d_N)``, modes in their original order."""
    _, dims = check_params(params, tree)
    end = end_matrix(params, tree, dense_tables(params, tree))
    return _from_layout(end, tree, dims).contiguous()


def layout_index(idx: Tensor, tree: ModeTree, dims: Sequence[int]) -> Tensor:
    """Linear positions of index tuples ``(m, N)`` in the layout-ordered flat end tensor."""
    pos = torch.zeros(idx.shape[0], dtype=torch.int64, device=idx.device)
    for m in tree.leaf_order:
        pos = pos * dims[m] + idx[:, m]
    return pos


def matricize(end: Tensor, modes: Sequence[int]) -> Tensor:
    """``(B, *dims)`` -> ``(B, prod dims[modes], prod dims[rest])``: rows the named modes (in
    increasing mode order), columns the others."""
    order = end.dim() - 1
    rows = sorted({int(m) for m in modes})
    if not rows or rows[0] < 0 or rows[-1] >= order:
        raise ValueError(f"modes must name modes 0..{order - 1}, got {list(modes)}")
    cols = [m for m in range(order) if m not in rows]
    t = end.permute(0, *[1 + m for m in rows + cols])
    p = math.prod(end.shape[1 + m] for m in rows)
    return t.reshape(end.shape[0], p, -1)


# ------------------------------------------------------------------- values and network view


def _gather_up(params: Sequence[Tensor], tree: ModeTree, leaves: Sequence[Tensor]) -> Tensor:
    """Push per-leaf rows ``(B, m, R_parent)`` up the tree: the values ``(B, m)``."""
    h: dict[int, Tensor] = dict(enumerate(leaves))
    for v in tree.internal:
        z = h[tree.children[v][0]]
        for c in tree.children[v][1:]:
            z = z * h[c]
        if v == tree.root:
            return (z * params[v].unsqueeze(1)).sum(-1)
        h[v] = z @ params[v]
    raise AssertionError("the tree has no root")


def htf_values(
    params: Sequence[Tensor], tree: ModeTree, idx: Tensor, *, chunk: int = 65536
) -> Tensor:
    """Entries of the end tensor at index tuples ``idx (m, N)``, ``(B, m)``; never builds it."""
    batch, dims = check_params(params, tree)
    _check_index_tuples("idx", idx, dims)
    chunk = _check_int("chunk", chunk, minimum=1)
    idx = idx.to(params[0].device)
    out = []
    for s in range(0, idx.shape[0], chunk):
        part = idx[s : s + chunk]
        out.append(
            _gather_up(params, tree, [params[n][:, part[:, n], :] for n in range(tree.order)])
        )
    if not out:
        return params[0].new_zeros(batch, 0)
    return torch.cat(out, dim=1)


def htf_network(params: Sequence[Tensor], tree: ModeTree, inputs: Sequence[Tensor]) -> Tensor:
    """The network view (the blog post's convolutional network): inputs ``(m, d_n)`` per mode
    (one-hot rows give the entries of the end tensor), a locally connected layer per leaf,
    product pooling over the tree and a linear output. ``(B, m)``; differentiable by
    autograd."""
    _, dims = check_params(params, tree)
    if len(inputs) != tree.order:
        raise ValueError(f"inputs must hold {tree.order} tensors (one per mode), got {len(inputs)}")
    for n, x in enumerate(inputs):
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != dims[n]:
            raise ValueError(f"inputs[{n}] must be a tensor (m, {dims[n]})")
    leaves = [torch.matmul(inputs[n].to(params[n].dtype), params[n]) for n in range(tree.order)]
    return _gather_up(params, tree, leaves)


# ------------------------------------------------------------------------------- metrics


def _local_factor_sq(params: Sequence[Tensor], tree: ModeTree, v: int) -> list[Tensor]:
    """Squared norms ``(B, R_v)`` of the factors of node ``v``'s local components: each child's
    columns, then ``v``'s own rows (``w_out`` at the root)."""
    out = [(params[c] * params[c]).sum(1) for c in tree.children[v]]
    own = params[v] * params[v]
    out.append(own if v == tree.root else own.sum(-1))
    return out


def htf_local_norms(params: Sequence[Tensor], tree: ModeTree) -> list[Tensor]:
    """Local component norms ``(B, R_v)`` of every internal node (``tree.internal`` order):
    ``prod_c ||W_c[:, r]|| * ||W_v[r, :]||`` (``|w_out[r]|`` at the root)."""
    check_params(params, tree)
    out = []
    for v in tree.internal:
        sq = _local_factor_sq(params, tree, v)
        prod = sq[0]
        for s in sq[1:]:
            prod = prod * s
        out.append(prod.sqrt())
    return out


def htf_unbalancedness(params: Sequence[Tensor], tree: ModeTree) -> Tensor:
    """``max_{v, r} (max - min)`` of the squared norms of the factors of local component ``r``
    of node ``v``, ``(B,)``; conserved by gradient flow (as Lemma 1 of Razin et al. 2021
    for CP, per local factorization)."""
    batch, _ = check_params(params, tree)
    out = params[0].new_zeros(batch)
    for v in tree.internal:
        sq = torch.stack(_local_factor_sq(params, tree, v), 0)
        out = torch.maximum(out, (sq.amax(0) - sq.amin(0)).amax(-1))
    return out
