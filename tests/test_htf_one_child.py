"""Mode trees with one-child nodes: the authors' ("checkerboard") trees at odd orders.

The authors' implementation (asafmaman101/imp_reg_htf, read for facts) pools adjacent
nodes level by level and gives a node left alone at a level its own matrix, so at
order 3 the tree is ``((1,2),(3,))``: mode 3 passes through a ``R_0 x R_1`` matrix of
its own before the root.  Everything here is checked against an independent reference
that evaluates the nested spec recursively (parameters assigned in the documented node
order: leaves by mode, then internal nodes children before parents), and against
autograd through it.
"""

from __future__ import annotations

import ast
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from implreg.factorizations.htf import (
    ModeTree,
    htf_init,
    htf_local_norms,
    htf_to_tensor,
    htf_unbalancedness,
    htf_values,
)
from implreg.factorizations.htf_engine import (
    DenseHTFCompletion,
    DenseHTFSensing,
    GatherHTFCompletion,
    GatherHTFSensing,
)
from implreg.losses import L2Loss

F64 = torch.float64

CHECKERBOARD = [
    # (order, pool, the authors' tree)
    (2, 2, "(1,2)"),
    (3, 2, "((1,2),(3,))"),
    (4, 2, "((1,2),(3,4))"),
    (5, 2, "(((1,2),(3,4)),((5,),))"),
    (6, 2, "(((1,2),(3,4)),((5,6),))"),
    (7, 2, "(((1,2),(3,4)),((5,6),(7,)))"),
    (4, 3, "((1,2,3),(4,))"),
    (5, 3, "((1,2,3),(4,5))"),
]


def authors_nesting(order: int, pool: int):
    """The authors' level-by-level pooling, written from the rule: groups of ``pool``
    consecutive nodes, a lone one wrapped in a group of its own; 0-based modes."""
    level: list = list(range(order))
    while len(level) > 1:
        level = [tuple(level[s : s + pool]) for s in range(0, len(level), pool)]
    return level[0]


def numbered(nest, order: int):
    """``(nest, index)`` pairs for every node: leaves by mode, internal nodes in post-order
    from ``order`` on (the documented node order of ``ModeTree``)."""
    out: dict[int, object] = {}
    counter = [order]

    def walk(node):
        if isinstance(node, int):
            return node
        kids = [walk(c) for c in node]
        k = counter[0]
        counter[0] += 1
        out[k] = kids
        return k

    root = walk(nest)
    return out, root


def reference_entry(nest, order: int, params, tup) -> torch.Tensor:
    """One entry ``(B,)`` by the recursive definition over the nested spec."""
    kids, root = numbered(nest, order)

    def h(k):
        if k < order:
            return params[k][:, tup[k], :]
        prod = h(kids[k][0])
        for c in kids[k][1:]:
            prod = prod * h(c)
        if k == root:
            return (prod * params[k]).sum(-1)
        return torch.einsum("br,brs->bs", prod, params[k])

    return h(root)


def reference_tensor(nest, order, params, dims) -> torch.Tensor:
    vals = [
        reference_entry(nest, order, params, t)
        for t in itertools.product(*[range(d) for d in dims])
    ]
    return torch.stack(vals, dim=-1).reshape(params[0].shape[0], *dims)


def random_params(tree, dims, widths, batch, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *s, generator=g, dtype=F64) * 0.8 for s in tree.shapes(dims, widths)]


@pytest.mark.parametrize("order, pool, spec", CHECKERBOARD)
def test_checkerboard_trees(order, pool, spec):
    tree = ModeTree.checkerboard(order, pool)
    assert tree.describe() == spec
    assert tree == ModeTree.parse(spec, order)
    assert tree == ModeTree.parse("checkerboard" if pool == 2 else f"checkerboard:{pool}", order)
    assert ast.literal_eval(spec) == _one_based(authors_nesting(order, pool))
    if order & (order - 1) == 0 and pool == 2:  # a power of two: no one-child node
        assert tree == ModeTree.adjacent(order)


def _one_based(nest):
    return nest + 1 if isinstance(nest, int) else tuple(_one_based(c) for c in nest)


def test_one_child_spelling_and_labels():
    t = ModeTree.parse("[[1,2],[3]]", 3)
    assert t.describe() == "((1,2),(3,))" and t == ModeTree.parse("((1,2),(3,))", 3)
    # "(3)" is 3 in parentheses (Python's reading), not a one-child node
    assert ModeTree.parse("((1,2),(3))", 3).describe() == "((1,2),3)"
    five = ModeTree.checkerboard(5)
    labels = [five.node_text(v) for v in five.internal]
    assert labels == ["{1,2}", "{3,4}", "{1,2,3,4}", "{5}'", "{5}''", "{1,2,3,4,5}"]
    assert len(set(labels)) == len(labels)
    # widths by level: the one-child node {5}' sits at height 1, {5}'' at height 2
    shapes = five.shapes([2] * 5, [3, 4, 5])
    assert shapes[4] == (2, 3)  # leaf 5 feeds {5}' (width 3)
    assert [shapes[v] for v in five.internal] == [(3, 4), (3, 4), (4, 5), (3, 4), (4, 5), (5,)]
    with pytest.raises(ValueError, match="root"):
        ModeTree.parse("((1,2,3),)", 3)
    with pytest.raises(ValueError, match="empty"):
        ModeTree.parse("((1,2),(3,),())", 3)


@settings(max_examples=20, deadline=None)
@given(
    st.sampled_from(CHECKERBOARD[1:] + [(3, 2, "(((1,),(2,)),(3,))"), (4, 2, "((1,(2,)),(3,4))")]),
    st.integers(1, 2),
    st.integers(0, 10_000),
)
def test_end_tensor_values_and_local_norms_match_the_definition(case, batch, seed):
    order, _, spec = case
    tree = ModeTree.parse(spec, order)
    nest = tuple(_zero_based(ast.literal_eval(spec)))
    dims = [2, 3, 2, 1, 2, 2, 1][:order]
    top = max(tree.height(v) for v in tree.internal)
    widths = [2, 3, 2, 3][:top]
    params = random_params(tree, dims, widths, batch, seed)
    want = reference_tensor(nest, order, params, dims)
    torch.testing.assert_close(htf_to_tensor(params, tree), want, rtol=1e-12, atol=1e-12)
    idx = torch.stack([torch.randint(0, d, (9,)) for d in dims], dim=1)
    got = htf_values(params, tree, idx, chunk=4)
    for j in range(9):
        torch.testing.assert_close(got[:, j], want[(slice(None), *idx[j].tolist())])
    # local norms by the definition: children's column norms times the node's row norm
    kids, root = numbered(nest, order)
    for v, norms in zip(tree.internal, htf_local_norms(params, tree)):
        prod = torch.ones_like(norms)
        for c in kids[v]:
            prod = prod * params[c].norm(dim=1)
        own = params[v].abs() if v == root else params[v].norm(dim=2)
        torch.testing.assert_close(norms, prod * own)
    assert htf_unbalancedness(params, tree).shape == (batch,)


def _zero_based(nest):
    return nest - 1 if isinstance(nest, int) else tuple(_zero_based(c) for c in nest)


@pytest.mark.parametrize("order, pool, spec", CHECKERBOARD)
def test_engines_match_autograd_through_the_definition(order, pool, spec):
    tree = ModeTree.parse(spec, order)
    nest = _zero_based(ast.literal_eval(spec))
    dims = [2, 3, 2, 2, 1, 2, 2][:order]
    widths = [2, 3, 2, 3][: max(tree.height(v) for v in tree.internal)]
    params = random_params(tree, dims, widths, 2, order * 10 + pool)
    g = torch.Generator().manual_seed(7)
    size = int(torch.tensor(dims).prod())
    m = min(size, 7)
    lin = torch.randperm(size, generator=g)[:m]
    idx = torch.stack(torch.unravel_index(lin, tuple(dims)), dim=1)
    y = torch.randn(m, generator=g, dtype=F64)
    vecs = [torch.randn(5, d, generator=g, dtype=F64) for d in dims]
    y5 = torch.randn(5, generator=g, dtype=F64)

    def through_definition(ps, sensing):
        full = reference_tensor(nest, order, ps, dims).reshape(2, -1)
        if not sensing:
            return full[:, lin]
        rows = []
        for i in range(5):
            x = vecs[0][i]
            for v in vecs[1:]:
                x = torch.outer(x, v[i]).reshape(-1)
            rows.append(x)
        return full @ torch.stack(rows).T

    for sensing, engines, target in (
        (
            False,
            [
                DenseHTFCompletion(tree, dims, idx, y),
                GatherHTFCompletion(tree, dims, idx, y, chunk=3),
            ],
            y,
        ),
        (True, [DenseHTFSensing(tree, dims, vecs, y5), GatherHTFSensing(tree, dims, vecs, y5)], y5),
    ):
        ps = [p.clone().requires_grad_() for p in params]
        want = (through_definition(ps, sensing) - target).pow(2).mean(-1)
        want.sum().backward()
        for eng in engines:
            val, grads = eng.loss_and_grad(params, L2Loss())
            torch.testing.assert_close(val, want.detach(), rtol=1e-10, atol=1e-13)
            for a, p in zip(grads, ps):
                torch.testing.assert_close(a, p.grad, rtol=1e-8, atol=1e-11)


def test_init_gives_every_one_child_node_its_own_matrix():
    tree = ModeTree.checkerboard(3)
    params = htf_init(
        [16, 16, 16], tree, [512, 512], stds=[0.01], generator=torch.Generator().manual_seed(0)
    )
    # the authors' order-3 model: three 16 x 512 leaves, {1,2} and {3}' 512 x 512, w_out
    assert [tuple(p.shape[1:]) for p in params] == [(16, 512)] * 3 + [(512, 512)] * 2 + [(512,)]
    assert sum(p.numel() for p in params) == 3 * 16 * 512 + 2 * 512 * 512 + 512
