"""Hierarchical tensor factorization (HTF) against slow, obvious definitions.

Every numerical check compares the library with a brute-force reference written here:
the end tensor entry by entry, with Python loops over index tuples, straight from the
definition (Razin, Maman & Cohen, ICML 2022; /tmp/htf/API.md):

    h_leaf(n) = W_n[i_n, :],   h_v = (prod_c h_c) @ W_v,   value = (prod_{c of root} h_c) . w_out

Trees are described here by "nestings": a leaf is a 0-based mode (int), an internal node
a tuple of child nestings. They are built independently of ``ModeTree`` (from
``ast.literal_eval`` of the spec text, from hand-written expectations, or drawn at random)
and matched to the library's node indices through the mode sets that nodes cover.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import implreg.factorizations.htf_engine as htf_engine
import implreg.losses as losses
from implreg.factorizations.htf import (
    ModeTree,
    htf_init,
    htf_local_norms,
    htf_network,
    htf_to_tensor,
    htf_unbalancedness,
    htf_values,
    matricize,
)
from implreg.factorizations.htf_engine import (
    DenseHTFCompletion,
    GatherHTFCompletion,
    RankOneHTFSensing,
    htf_completion_engine,
)
from implreg.losses import HuberLoss, L2Loss

F64 = torch.float64
LOSS_KINDS = ["l2", "huber"] + (["l1"] if hasattr(losses, "L1Loss") else [])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- nestings (test-side trees)


def modes_of(nest) -> tuple[int, ...]:
    """Sorted 0-based modes covered by a nesting."""
    if isinstance(nest, int):
        return (nest,)
    return tuple(sorted(m for c in nest for m in modes_of(c)))


def spec_of(nest) -> str:
    """Nested 1-based spec text without spaces, e.g. ``((1,2),(3,4))``."""
    if isinstance(nest, int):
        return str(nest + 1)
    return "(" + ",".join(spec_of(c) for c in nest) + ")"


def nest_of_spec(spec: str):
    """The nesting of a 1-based spec text, by Python's own literal parser."""

    def shift(x):
        return x - 1 if isinstance(x, int) else tuple(shift(c) for c in x)

    return shift(ast.literal_eval(spec))


def subnests(nest) -> list:
    """All nodes of a nesting (pre-order)."""
    if isinstance(nest, int):
        return [nest]
    return [nest] + [s for c in nest for s in subnests(c)]


def height_of(nest) -> int:
    return 0 if isinstance(nest, int) else 1 + max(height_of(c) for c in nest)


def leaves_dfs(nest) -> tuple[int, ...]:
    return (nest,) if isinstance(nest, int) else tuple(m for c in nest for m in leaves_dfs(c))


def adjacent_nesting(order: int, pool: int = 2):
    """Group adjacent nodes in groups of ``pool`` per level; a lone node passes up unwrapped."""
    level = list(range(order))
    while len(level) > 1:
        groups = [level[s : s + pool] for s in range(0, len(level), pool)]
        level = [g[0] if len(g) == 1 else tuple(g) for g in groups]
    return level[0]


def interleaved_nesting(order: int):
    half = order // 2
    level = [(i, i + half) for i in range(half)]
    while len(level) > 1:
        groups = [level[s : s + 2] for s in range(0, len(level), 2)]
        level = [g[0] if len(g) == 1 else tuple(g) for g in groups]
    return level[0]


class Ref:
    """A nesting matched to a library ``ModeTree``: node index -> children, parent, width."""

    def __init__(self, tree: ModeTree, nest, order: int):
        self.tree, self.nest, self.order = tree, nest, order
        self.index = {m: k for k, m in enumerate(tree.nodes)}
        assert len(self.index) == len(tree.nodes), "two nodes cover the same modes"
        self.kids: dict[int, list[int]] = {}
        self.par: dict[int, int | None] = {}

        def walk(node) -> int:
            k = self.index[modes_of(node)]
            self.kids[k] = [] if isinstance(node, int) else [walk(c) for c in node]
            for c in self.kids[k]:
                self.par[c] = k
            return k

        self.root = walk(nest)
        self.par[self.root] = None
        self.internal = [k for k in range(len(tree.nodes)) if self.kids[k]]

    def widths_by_index(self, widths_by_modes: dict) -> dict[int, int]:
        return {self.index[m]: w for m, w in widths_by_modes.items()}

    def shapes(self, dims, widths: dict[int, int], batch: int) -> list[tuple[int, ...]]:
        """Parameter shapes per API.md, from the test-side structure."""
        out = []
        for k in range(len(self.tree.nodes)):
            if k == self.root:
                out.append((batch, widths[k]))
            elif not self.kids[k]:
                out.append((batch, dims[self.tree.nodes[k][0]], widths[self.par[k]]))
            else:
                out.append((batch, widths[k], widths[self.par[k]]))
        return out

    def params(self, dims, widths, batch, seed, dtype=F64, scale=1.0):
        g = _gen(seed)
        return [
            scale * torch.randn(s, generator=g, dtype=F64).to(dtype)
            for s in self.shapes(dims, widths, batch)
        ]

    # ----- brute force

    def entry(self, params, tup) -> torch.Tensor:
        """``(B,)``: one entry of the end tensor, by the recursive definition."""

        def h(k):
            if not self.kids[k]:
                n = self.tree.nodes[k][0]
                return params[k][:, tup[n], :]
            prod = h(self.kids[k][0])
            for c in self.kids[k][1:]:
                prod = prod * h(c)
            if k == self.root:
                return (prod * params[k]).sum(-1)
            return torch.einsum("br,brs->bs", prod, params[k])

        return h(self.root)

    def tensor(self, params, dims) -> torch.Tensor:
        """``(B, *dims)`` by a Python loop over all index tuples (row-major)."""
        vals = [self.entry(params, tup) for tup in itertools.product(*[range(d) for d in dims])]
        return torch.stack(vals, dim=-1).reshape(params[0].shape[0], *dims)


def make_tree(nest, order: int) -> tuple[ModeTree, Ref]:
    tree = ModeTree.parse(spec_of(nest), order)
    return tree, Ref(tree, nest, order)


def uniform_widths(ref: Ref, value: int) -> dict[int, int]:
    return {k: value for k in ref.internal}


# ---------------------------------------------------------------- hypothesis strategies


@st.composite
def nestings(draw, min_order: int = 2, max_order: int = 5):
    """(order, nesting): a random nested partition of the modes, >= 2 children per node."""
    # sampled_from rather than integers: hypothesis would spend many of only ~25
    # examples on the minimal tree; this keeps small cases but favors informative ones
    order = draw(
        st.sampled_from([4, 3, 5, 2, *range(6, max_order + 1)]).filter(
            lambda n: min_order <= n <= max_order
        )
    )
    perm = draw(st.permutations(range(order)))

    def split(items):
        if len(items) == 1:
            return items[0]
        parts = draw(st.integers(2, len(items)))
        cuts = sorted(
            draw(
                st.lists(
                    st.integers(1, len(items) - 1),
                    min_size=parts - 1,
                    max_size=parts - 1,
                    unique=True,
                )
            )
        )
        bounds = [0, *cuts, len(items)]
        return tuple(split(items[a:b]) for a, b in zip(bounds, bounds[1:]))

    return order, split(list(perm))


@st.composite
def models(draw, max_dim: int = 3, max_width: int = 3, batches=(1, 2)):
    """(order, nesting, dims, widths by mode set, batch, seed)."""
    order, nest = draw(nestings())
    sizes = st.sampled_from([2, 3, 1] if max_dim >= 3 else [2, 1])
    dims = draw(st.lists(sizes, min_size=order, max_size=order))
    widths = {
        modes_of(v): draw(st.sampled_from([2, 3, 1][:max_width]))
        for v in subnests(nest)
        if not isinstance(v, int)
    }
    batch = draw(st.sampled_from(list(batches)))
    seed = draw(st.integers(0, 10_000))
    return order, nest, dims, widths, batch, seed


def build(model, dtype=F64):
    order, nest, dims, widths_m, batch, seed = model
    tree, ref = make_tree(nest, order)
    widths = ref.widths_by_index(widths_m)
    return tree, ref, dims, widths, ref.params(dims, widths, batch, seed, dtype=dtype)


def random_idx(dims, m: int, seed: int) -> torch.Tensor:
    """``m`` index tuples drawn with replacement (repeats allowed)."""
    g = _gen(seed)
    return torch.stack([torch.randint(0, d, (m,), generator=g) for d in dims], dim=1)


def linear(idx: torch.Tensor, dims) -> torch.Tensor:
    return torch.as_tensor(np.ravel_multi_index(tuple(idx.numpy().T), dims), dtype=torch.int64)


def one_hots(idx: torch.Tensor, dims, dtype=F64) -> list[torch.Tensor]:
    return [torch.nn.functional.one_hot(idx[:, n], d).to(dtype) for n, d in enumerate(dims)]


def explicit_rank_one(vecs: list[torch.Tensor]) -> torch.Tensor:
    """Rows ``vec(x_i^1 (x) ... (x) x_i^N)`` (row-major), one measurement at a time."""
    rows = []
    for i in range(vecs[0].shape[0]):
        x = vecs[0][i]
        for v in vecs[1:]:
            x = torch.outer(x, v[i]).reshape(-1)
        rows.append(x)
    return torch.stack(rows)


# ---------------------------------------------------------------- trees


FIXED_TREES = [
    # (constructor, order, expected nesting in 1-based spec text)
    (lambda: ModeTree.adjacent(2), 2, "(1,2)"),
    (lambda: ModeTree.adjacent(3), 3, "((1,2),3)"),
    (lambda: ModeTree.adjacent(4), 4, "((1,2),(3,4))"),
    (lambda: ModeTree.adjacent(5), 5, "(((1,2),(3,4)),5)"),
    (lambda: ModeTree.adjacent(6), 6, "(((1,2),(3,4)),(5,6))"),
    (lambda: ModeTree.adjacent(3, pool=3), 3, "(1,2,3)"),
    (lambda: ModeTree.adjacent(4, pool=3), 4, "((1,2,3),4)"),
    (lambda: ModeTree.adjacent(5, pool=3), 5, "((1,2,3),(4,5))"),
    (lambda: ModeTree.adjacent(6, pool=3), 6, "((1,2,3),(4,5,6))"),
    (lambda: ModeTree.adjacent(7, pool=3), 7, "((1,2,3),(4,5,6),7)"),
    (lambda: ModeTree.interleaved(2), 2, "(1,2)"),
    (lambda: ModeTree.interleaved(4), 4, "((1,3),(2,4))"),
    (lambda: ModeTree.interleaved(6), 6, "(((1,4),(2,5)),(3,6))"),
    (lambda: ModeTree.parse("adjacent", 4), 4, "((1,2),(3,4))"),
    (lambda: ModeTree.parse("adjacent:3", 5), 5, "((1,2,3),(4,5))"),
    (lambda: ModeTree.parse("interleaved", 6), 6, "(((1,4),(2,5)),(3,6))"),
    (lambda: ModeTree.parse("((1,3),(2,4))", 4), 4, "((1,3),(2,4))"),
    (lambda: ModeTree.parse("(1,(2,3))", 3), 3, "(1,(2,3))"),
    (lambda: ModeTree.parse("((1,2,3),(4,5))", 5), 5, "((1,2,3),(4,5))"),
    (lambda: ModeTree.parse("((4,1),(3,(5,2)))", 5), 5, "((4,1),(3,(5,2)))"),
    (lambda: ModeTree.parse("(3,2,1)", 3), 3, "(3,2,1)"),
]


def check_tree(tree: ModeTree, nest, order: int) -> None:
    """Every documented ModeTree property against the test-side nesting."""
    expected_nodes = {modes_of(v) for v in subnests(nest)}
    n_nodes = len(expected_nodes)
    assert tree.order == order
    assert len(tree.nodes) == n_nodes and len(tree.children) == n_nodes
    assert set(tree.nodes) == expected_nodes
    for modes in tree.nodes:
        assert isinstance(modes, tuple) and list(modes) == sorted(modes)
    assert tree.nodes[:order] == tuple((n,) for n in range(order))  # leaves first
    assert tree.root == n_nodes - 1
    assert tree.nodes[tree.root] == tuple(range(order))
    assert tree.internal == tuple(range(order, n_nodes))
    ref = Ref(tree, nest, order)
    for k in range(n_nodes):
        assert tuple(tree.children[k]) == tuple(ref.kids[k])  # children in spec order
        assert all(c < k for c in tree.children[k])  # children before parents
        assert tree.parent(k) == ref.par[k]
    by_modes = {modes_of(v): v for v in subnests(nest)}
    for k, modes in enumerate(tree.nodes):
        assert tree.height(k) == height_of(by_modes[modes])
    assert tuple(tree.leaf_order) == leaves_dfs(nest)
    text = tree.describe()
    assert isinstance(text, str) and nest_of_spec(text) == nest
    assert ModeTree.parse(text, order) == tree  # round trip


@pytest.mark.parametrize("case", range(len(FIXED_TREES)))
def test_fixed_trees(case):
    make, order, spec = FIXED_TREES[case]
    tree = make()
    check_tree(tree, nest_of_spec(spec), order)
    assert tree.describe() == spec


@pytest.mark.parametrize("order", [2, 3, 4, 5, 6, 7, 8, 9])
@pytest.mark.parametrize("pool", [2, 3, 4])
def test_adjacent_trees_match_the_level_by_level_rule(order, pool):
    tree = ModeTree.adjacent(order, pool=pool)
    check_tree(tree, adjacent_nesting(order, pool), order)
    assert ModeTree.parse("adjacent" if pool == 2 else f"adjacent:{pool}", order) == tree


@pytest.mark.parametrize("order", [2, 4, 6, 8])
def test_interleaved_trees_match_the_rule(order):
    tree = ModeTree.interleaved(order)
    check_tree(tree, interleaved_nesting(order), order)
    assert ModeTree.parse("interleaved", order) == tree


def test_documented_node_lists():
    adj = ModeTree.adjacent(4)
    assert adj.nodes == ((0,), (1,), (2,), (3,), (0, 1), (2, 3), (0, 1, 2, 3))
    assert adj.children == ((), (), (), (), (0, 1), (2, 3), (4, 5))
    assert adj.root == 6 and adj.internal == (4, 5, 6)
    assert [adj.parent(v) for v in range(7)] == [4, 4, 5, 5, 6, 6, None]
    assert [adj.height(v) for v in range(7)] == [0, 0, 0, 0, 1, 1, 2]
    assert tuple(adj.leaf_order) == (0, 1, 2, 3)
    assert adj.describe() == "((1,2),(3,4))"
    inter = ModeTree.interleaved(4)
    assert inter.nodes == ((0,), (1,), (2,), (3,), (0, 2), (1, 3), (0, 1, 2, 3))
    assert inter.children == ((), (), (), (), (0, 2), (1, 3), (4, 5))
    assert tuple(inter.leaf_order) == (0, 2, 1, 3)
    assert inter.describe() == "((1,3),(2,4))"
    assert ModeTree.parse("((1,3),(2,4))", 4) == inter
    assert ModeTree.parse("((1,2),(3,4))", 4) == adj
    assert ModeTree.parse("((1, 2), (3, 4))", 4) == adj  # spaces as in Python's tuple text


@given(nestings(max_order=7))
def test_random_trees(case):
    order, nest = case
    tree = ModeTree.parse(spec_of(nest), order)
    check_tree(tree, nest, order)
    assert tree.describe() == spec_of(nest)


INVALID_SPECS = [
    (4, "((1,2),3)", "mode 4 missing"),
    (3, "((1,2),(2,3))", "mode 2 twice"),
    (4, "((1,2),(3,4),4)", "mode 4 twice"),
    (4, "((0,1),(2,3),4)", "mode 0 (1-based modes)"),
    (4, "((1,2),(3,4),5)", "mode N+1"),
    # Python tuple text: "(1,)" is a one-member group ("(1)" is just 1 in parentheses);
    # a one-child node is allowed below the root (tests/test_htf_one_child.py), not as it
    (2, "((1,2),)", "a root with one child"),
    (3, "(((1,2),3),)", "a root with one child (wrapping)"),
    (4, "((1,2),(3,4)", "missing closing parenthesis"),
    (4, "((1,2),(3,4)))", "extra closing parenthesis"),
    (4, "((1,2)(3,4)", "unbalanced and no comma"),
    (4, "", "empty"),
    (4, "((1,2),(3,4),())", "empty node"),
    (4, "((1,2),(3,x))", "not a mode"),
    (4, "diagonal", "unknown named tree"),
]


@pytest.mark.parametrize("order, spec, why", INVALID_SPECS)
def test_invalid_specs_raise_one_line_value_errors(order, spec, why):
    with pytest.raises(ValueError) as err:
        ModeTree.parse(spec, order)
    msg = str(err.value)
    assert msg.strip(), why
    assert "\n" not in msg.strip(), f"{why}: message is not one line: {msg!r}"


@given(nestings(min_order=3, max_order=6), st.data())
def test_random_spec_with_a_dropped_or_doubled_mode_is_rejected(case, data):
    order, nest = case
    spec = spec_of(nest)
    mode = data.draw(st.integers(1, order))
    other = data.draw(st.integers(1, order).filter(lambda x: x != mode))
    # replace one occurrence of `mode` by `other`: `mode` missing, `other` twice
    tokens = spec.replace("(", " ( ").replace(")", " ) ").replace(",", " , ").split()
    tokens = [str(other) if t == str(mode) else t for t in tokens]
    with pytest.raises(ValueError) as err:
        ModeTree.parse("".join(tokens), order)
    assert "\n" not in str(err.value).strip()


# ---------------------------------------------------------------- widths


def test_resolve_widths_forms():
    adj = ModeTree.adjacent(4)
    assert tuple(adj.resolve_widths(3)) == (3, 3, 3)
    assert tuple(adj.resolve_widths([2, 5])) == (2, 2, 5)  # heights 1, 1, 2
    assert tuple(adj.resolve_widths((7, 1))) == (7, 7, 1)
    assert tuple(adj.resolve_widths({4: 2, 5: 3, 6: 4})) == (2, 3, 4)
    odd = ModeTree.adjacent(5)  # nodes ..., (0,1), (2,3), (0..3), root; heights 1,1,2,3
    hs = [odd.height(v) for v in odd.internal]
    assert hs == [1, 1, 2, 3]
    assert tuple(odd.resolve_widths([2, 3, 4])) == (2, 2, 3, 4)


@given(models())
def test_resolve_widths_random(model):
    tree, ref, dims, widths, _ = build(model)
    assert tuple(tree.resolve_widths(widths)) == tuple(widths[v] for v in tree.internal)
    assert tuple(tree.resolve_widths(2)) == (2,) * len(tree.internal)
    top = tree.height(tree.root)
    per_height = [h + 1 for h in range(top)]
    assert tuple(tree.resolve_widths(per_height)) == tuple(tree.height(v) for v in tree.internal)


# ---------------------------------------------------------------- end tensor, values, network


@given(models())
def test_to_tensor_matches_brute_force(model):
    tree, ref, dims, widths, params = build(model)
    expect = ref.tensor(params, dims)
    got = htf_to_tensor(params, tree)
    assert got.shape == (params[0].shape[0], *dims)
    assert got.dtype == F64
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)


@given(models(), st.integers(1, 30), st.sampled_from([1, 2, 7, 65536]))
def test_values_and_network_match_brute_force(model, m, chunk):
    tree, ref, dims, widths, params = build(model)
    seed = model[-1]
    idx = random_idx(dims, m, seed)
    idx = torch.cat([idx, idx[:3], idx[:1]])  # repeated index tuples
    expect = ref.tensor(params, dims).reshape(params[0].shape[0], -1)[:, linear(idx, dims)]
    got = htf_values(params, tree, idx, chunk=chunk)
    assert got.shape == expect.shape and got.dtype == F64
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(htf_values(params, tree, idx), expect, rtol=1e-10, atol=1e-12)
    net = htf_network(params, tree, one_hots(idx, dims))
    assert net.shape == expect.shape
    torch.testing.assert_close(net, expect, rtol=1e-10, atol=1e-12)


@given(models(), st.integers(1, 8))
def test_network_with_general_inputs_is_multilinear(model, m):
    """Any inputs: the network is the end tensor contracted with x_1 (x) ... (x) x_N."""
    tree, ref, dims, widths, params = build(model)
    g = _gen(model[-1] + 1)
    vecs = [torch.randn(m, d, generator=g, dtype=F64) for d in dims]
    expect = ref.tensor(params, dims).reshape(params[0].shape[0], -1) @ explicit_rank_one(vecs).T
    torch.testing.assert_close(htf_network(params, tree, vecs), expect, rtol=1e-10, atol=1e-12)


@given(models(batches=(2,)), st.integers(1, 10))
def test_network_is_differentiable_by_autograd(model, m):
    tree, ref, dims, widths, params = build(model)
    idx = random_idx(dims, m, model[-1])
    up = torch.randn(2, m, generator=_gen(model[-1] + 2), dtype=F64)
    lin = linear(idx, dims)

    def grads(fn):
        ps = [p.clone().requires_grad_() for p in params]
        (fn(ps) * up).sum().backward()
        return [p.grad for p in ps]

    expect = grads(lambda ps: ref.tensor(ps, dims).reshape(2, -1)[:, lin])
    got = grads(lambda ps: htf_network(ps, tree, one_hots(idx, dims)))
    for a, b in zip(got, expect):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "spec, order, dims, widths",
    [
        ("adjacent", 2, [3, 4], 2),
        ("adjacent", 3, [2, 3, 2], [2, 3]),
        ("adjacent", 4, [2, 3, 2, 3], [2, 3]),
        ("adjacent:3", 3, [3, 2, 3], 2),
        ("adjacent", 5, [2, 2, 2, 2, 3], [2, 1, 3]),
        ("adjacent:3", 5, [2, 3, 2, 2, 3], [3, 2]),
        ("interleaved", 4, [3, 2, 3, 2], [2, 3]),
        ("interleaved", 6, [2, 2, 1, 2, 2, 3], [2, 2, 3]),
        ("((1,3),(2,4))", 4, [2, 3, 2, 3], [3, 2]),
        ("(1,(2,3))", 3, [4, 2, 3], [2, 3]),
        ("((1,2,3),(4,5))", 5, [2, 2, 3, 2, 2], [2, 3]),
    ],
)
def test_fixed_cases_brute_force(spec, order, dims, widths):
    tree = ModeTree.parse(spec, order)
    nest = nest_of_spec(tree.describe())
    ref = Ref(tree, nest, order)
    wt = dict(zip(tree.internal, tree.resolve_widths(widths)))
    params = ref.params(dims, wt, 2, seed=order + len(spec))
    expect = ref.tensor(params, dims)
    torch.testing.assert_close(htf_to_tensor(params, tree), expect, rtol=1e-10, atol=1e-12)
    idx = torch.stack(torch.unravel_index(torch.arange(math.prod(dims)), dims), dim=1)
    flat = expect.reshape(2, -1)
    for chunk in (1, 5, math.prod(dims), 10**6):
        torch.testing.assert_close(htf_values(params, tree, idx, chunk=chunk), flat)
    torch.testing.assert_close(htf_network(params, tree, one_hots(idx, dims)), flat)


def test_order_four_entry_by_the_papers_formula():
    """REFERENCE.md section 4: h_12 = (a_1 * a_2) W_12, h_34 = (a_3 * a_4) W_34, h_12 h_34 w."""
    tree = ModeTree.adjacent(4)
    g = _gen(3)
    a = [torch.randn(1, 3, 2, generator=g, dtype=F64) for _ in range(4)]
    w12, w34 = (torch.randn(1, 2, 4, generator=g, dtype=F64) for _ in range(2))
    w = torch.randn(1, 4, generator=g, dtype=F64)
    end = htf_to_tensor([*a, w12, w34, w], tree)[0]
    for i1, i2, i3, i4 in itertools.product(range(3), repeat=4):
        h12 = (a[0][0, i1] * a[1][0, i2]) @ w12[0]
        h34 = (a[2][0, i3] * a[3][0, i4]) @ w34[0]
        assert float(end[i1, i2, i3, i4]) == pytest.approx(float((h12 * h34) @ w[0]), rel=1e-12)


# ---------------------------------------------------------------- local norms, unbalancedness


def col_norm(x, r):  # ||W[:, r]|| over rows
    return math.sqrt(sum(float(x[i, r]) ** 2 for i in range(x.shape[0])))


def row_norm(x, r):  # ||W[r, :]||
    return math.sqrt(sum(float(x[r, j]) ** 2 for j in range(x.shape[1])))


def slow_norms_and_unbalancedness(ref: Ref, params):
    batch = params[0].shape[0]
    norms, unb = [], [0.0] * batch
    for v in ref.internal:
        width = params[v].shape[-1] if v == ref.root else params[v].shape[1]
        out = torch.zeros(batch, width, dtype=F64)
        for b in range(batch):
            for r in range(width):
                own = abs(float(params[v][b, r])) if v == ref.root else row_norm(params[v][b], r)
                kids = [col_norm(params[c][b], r) for c in ref.kids[v]]
                out[b, r] = math.prod(kids) * own
                s = [x * x for x in kids] + [own * own]
                unb[b] = max(unb[b], max(s) - min(s))
        norms.append(out)
    return norms, torch.tensor(unb, dtype=F64)


@given(models(batches=(1, 3)))
def test_local_norms_and_unbalancedness_by_loops(model):
    tree, ref, dims, widths, params = build(model)
    exp_norms, exp_unb = slow_norms_and_unbalancedness(ref, params)
    got = htf_local_norms(params, tree)
    assert len(got) == len(tree.internal)
    for a, b in zip(got, exp_norms):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    unb = htf_unbalancedness(params, tree)
    assert unb.shape == (params[0].shape[0],)
    torch.testing.assert_close(unb, exp_unb, rtol=1e-10, atol=1e-13)


def test_unbalancedness_example_and_balanced_zero():
    tree = ModeTree.parse("(1,2)", 2)  # root with two leaves, width 1
    one = torch.ones(1, 1, 1, dtype=F64)
    # ||W_1[:,0]||^2 = 4, ||W_2[:,0]||^2 = 9, w_out^2 = 1 -> 9 - 1 = 8
    params = [2 * one, 3 * one, torch.ones(1, 1, dtype=F64)]
    assert htf_unbalancedness(params, tree).tolist() == [8.0]
    assert htf_local_norms(params, tree)[0].tolist() == [[6.0]]
    balanced = [one, one, -torch.ones(1, 1, dtype=F64)]
    assert htf_unbalancedness(balanced, tree).tolist() == [0.0]
    assert htf_local_norms(balanced, tree)[0].tolist() == [[1.0]]


# ---------------------------------------------------------------- init


def test_init_shapes_dtype_and_shared_draw():
    tree = ModeTree.adjacent(5)  # internal widths by height [2, 3, 4]
    dims = [2, 3, 1, 4, 2]
    stds = [0.5, 2.0, 1e-3]
    params = htf_init(dims, tree, [2, 3, 4], stds=stds, mean=0.25, generator=_gen(0), dtype=F64)
    wt = dict(zip(tree.internal, tree.resolve_widths([2, 3, 4])))
    ref = Ref(tree, nest_of_spec(tree.describe()), 5)
    assert [tuple(p.shape) for p in params] == ref.shapes(dims, wt, 3)
    for p in params:
        assert p.dtype == F64
        z = [(p[b] - 0.25) / s for b, s in enumerate(stds)]
        for b in range(1, 3):
            torch.testing.assert_close(z[b], z[0], rtol=1e-9, atol=1e-9)
    default = htf_init(dims, tree, [2, 3, 4], stds=[1.0], generator=_gen(0))
    assert all(p.dtype == torch.float32 for p in default)
    assert [tuple(p.shape) for p in default] == ref.shapes(dims, wt, 1)


@given(models(batches=(1,)), st.lists(st.floats(1e-3, 10.0), min_size=1, max_size=3))
def test_init_random_trees(model, stds):
    tree, ref, dims, widths, _ = build(model)
    params = htf_init(dims, tree, widths, stds=stds, generator=_gen(model[-1]), dtype=F64)
    assert len(params) == len(tree.nodes)
    assert [tuple(p.shape) for p in params] == ref.shapes(dims, widths, len(stds))
    for p in params:
        for b in range(1, len(stds)):  # entry b = std_b * Z, one Z for all b
            torch.testing.assert_close(p[b] * stds[0], p[0] * stds[b], rtol=1e-9, atol=1e-12)


def test_init_width_forms_are_equivalent():
    tree = ModeTree.adjacent(4)
    dims = [2, 3, 2, 3]

    def init(w):
        return htf_init(dims, tree, w, stds=[0.1, 1.0], generator=_gen(7), dtype=F64)

    base = init(3)
    for w in ([3, 3], (3, 3), {4: 3, 5: 3, 6: 3}):
        assert all(torch.equal(a, b) for a, b in zip(init(w), base))
    hetero = init([2, 4])
    assert all(torch.equal(a, b) for a, b in zip(init({4: 2, 5: 2, 6: 4}), hetero))
    assert [tuple(p.shape) for p in hetero] == [
        (2, 2, 2),
        (2, 3, 2),
        (2, 2, 2),
        (2, 3, 2),
        (2, 2, 4),
        (2, 2, 4),
        (2, 4),
    ]
    # same seed, same draw; another seed, another draw
    assert all(torch.equal(a, b) for a, b in zip(init(3), base))
    other = htf_init(dims, tree, 3, stds=[0.1, 1.0], generator=_gen(8), dtype=F64)
    assert not all(torch.equal(a, b) for a, b in zip(other, base))


def test_init_distribution_is_iid_normal():
    tree = ModeTree.adjacent(4)
    params = htf_init([20] * 4, tree, 40, stds=[0.5], mean=0.3, generator=_gen(1), dtype=F64)
    flat = torch.cat([p.reshape(-1) for p in params])  # 4*800 + 2*1600 + 40 entries
    assert abs(float(flat.mean()) - 0.3) < 0.05
    assert abs(float(flat.std()) - 0.5) < 0.03
    # distinct nodes get distinct draws
    assert not torch.equal(params[0], params[1]) and not torch.equal(params[4], params[5])


# ---------------------------------------------------------------- engines


def _accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def completion_engine(tree, dims, idx, y, widths, method):
    """``htf_completion_engine``; passes ``widths`` where the signature takes it (API.md
    does not list it; the implementation asks for it to choose by cost)."""
    kw = {"widths": widths} if _accepts(htf_completion_engine, "widths") else {}
    return htf_completion_engine(tree, dims, idx, y, method=method, **kw)


def sensing_engines(tree, dims, vecs, y) -> list:
    """``RankOneHTFSensing`` as documented, plus its dense and gathered forms where it
    takes ``method``, plus a chunked gathering engine where the module has one."""
    out = [RankOneHTFSensing(tree, dims, vecs, y)]
    if _accepts(RankOneHTFSensing, "method"):
        out += [RankOneHTFSensing(tree, dims, vecs, y, method=k) for k in ("dense", "gather")]
    if hasattr(htf_engine, "GatherHTFSensing"):
        out.append(htf_engine.GatherHTFSensing(tree, dims, vecs, y, chunk=3))
    return out


def pick_loss(kind: str, residuals: torch.Tensor):
    """L2, L1, or Huber with delta between residual magnitudes (both branches active)."""
    if kind == "l2":
        return L2Loss()
    if kind == "l1":
        assert (residuals != 0).all()
        return losses.L1Loss()
    mags = residuals.abs().reshape(-1).sort().values
    if mags.numel() == 1:
        return HuberLoss(float(mags[0]) / 2 + 1e-3)
    k = mags.numel() // 2
    delta = float(mags[k - 1] + mags[k]) / 2
    if delta <= 0:
        delta = float(mags[-1]) / 2
    return HuberLoss(delta)


def autograd_reference(params, predict, y, loss):
    ps = [p.clone().requires_grad_() for p in params]
    pred = predict(ps)
    val = loss.pointwise(pred - y)[0].mean(-1)
    val.sum().backward()
    return val.detach(), [p.grad for p in ps], pred.detach()


def assert_engine_matches(eng, params, loss, ref_val, ref_grads, ref_pred):
    before = [p.clone() for p in params]
    torch.testing.assert_close(eng.predict(params), ref_pred, rtol=1e-10, atol=1e-12)
    val, grads = eng.loss_and_grad(params, loss)
    assert val.shape == ref_val.shape and val.dtype == F64
    torch.testing.assert_close(val, ref_val, rtol=1e-10, atol=1e-13)
    assert len(grads) == len(ref_grads)
    for a, b in zip(grads, ref_grads):
        assert a.shape == b.shape and a.dtype == F64
        scale = float(b.abs().max()) if b.numel() else 0.0
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11 * max(scale, 1e-3))
    assert all(torch.equal(a, b) for a, b in zip(params, before)), "params were modified"


def completion_problem(model, m):
    tree, ref, dims, widths, params = build(model)
    seed = model[-1]
    idx = random_idx(dims, m, seed + 5)
    y = torch.randn(m, generator=_gen(seed + 6), dtype=F64)
    lin = linear(idx, dims)
    batch = params[0].shape[0]

    def predict(ps):
        return ref.tensor(ps, dims).reshape(batch, -1)[:, lin]

    return tree, dims, params, idx, y, predict, widths


def sensing_problem(model, m):
    tree, ref, dims, widths, params = build(model)
    g = _gen(model[-1] + 7)
    vecs = [torch.randn(m, d, generator=g, dtype=F64) for d in dims]
    y = torch.randn(m, generator=g, dtype=F64)
    x = explicit_rank_one(vecs)
    batch = params[0].shape[0]

    def predict(ps):
        return ref.tensor(ps, dims).reshape(batch, -1) @ x.T

    return tree, dims, params, vecs, y, predict


@settings(max_examples=25)
@given(models(batches=(1, 2)), st.integers(1, 12), st.sampled_from(LOSS_KINDS))
def test_completion_engines_match_autograd_through_brute_force(model, m, loss_kind):
    tree, dims, params, idx, y, predict, widths = completion_problem(model, m)
    idx0, y0 = idx.clone(), y.clone()
    loss = pick_loss(loss_kind, predict(params) - y)
    ref_val, ref_grads, ref_pred = autograd_reference(params, predict, y, loss)
    engines = [
        DenseHTFCompletion(tree, dims, idx, y),
        GatherHTFCompletion(tree, dims, idx, y, chunk=3),
        GatherHTFCompletion(tree, dims, idx, y),
        completion_engine(tree, dims, idx, y, widths, method="auto"),
    ]
    for eng in engines:
        assert eng.m == m
        assert_engine_matches(eng, params, loss, ref_val, ref_grads, ref_pred)
    assert torch.equal(idx, idx0) and torch.equal(y, y0)


@settings(max_examples=25)
@given(models(batches=(1, 2)), st.integers(1, 10), st.sampled_from(LOSS_KINDS))
def test_rank_one_sensing_matches_autograd_through_brute_force(model, m, loss_kind):
    tree, dims, params, vecs, y, predict = sensing_problem(model, m)
    vecs0, y0 = [v.clone() for v in vecs], y.clone()
    loss = pick_loss(loss_kind, predict(params) - y)
    ref_val, ref_grads, ref_pred = autograd_reference(params, predict, y, loss)
    for eng in sensing_engines(tree, dims, vecs, y):
        assert eng.m == m
        assert_engine_matches(eng, params, loss, ref_val, ref_grads, ref_pred)
    assert all(torch.equal(a, b) for a, b in zip(vecs, vecs0)) and torch.equal(y, y0)


@pytest.mark.parametrize("loss_kind", LOSS_KINDS)
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 8, 100])
def test_gather_chunk_edges_and_repeated_observations(loss_kind, chunk):
    """m = 8 with repeats; chunks of 1, dividing m, not dividing m, equal to and above m."""
    widths = {(0, 2): 2, (1, 3): 3, (0, 1, 2, 3): 2}
    model = (4, nest_of_spec("((1,3),(2,4))"), [2, 3, 2, 2], widths, 2, 11)
    tree, dims, params, idx, y, predict, widths = completion_problem(model, 6)
    idx = torch.cat([idx, idx[:2]])
    y = torch.cat([y, y[:2]])
    lin = linear(idx, dims)

    def predict2(ps):
        return Ref(tree, model[1], 4).tensor(ps, dims).reshape(2, -1)[:, lin]

    loss = pick_loss(loss_kind, predict2(params) - y)
    ref = autograd_reference(params, predict2, y, loss)
    for eng in (
        GatherHTFCompletion(tree, dims, idx, y, chunk=chunk),
        DenseHTFCompletion(tree, dims, idx, y),
    ):
        assert_engine_matches(eng, params, loss, *ref)


def test_engine_loss_is_the_mean_pointwise_loss():
    """value = 1/m sum_i l(pred_i - y_i) with l(z) = z^2 (no 1/2); order 2 is a matrix."""
    tree = ModeTree.adjacent(2)
    a = torch.tensor([[[1.0], [2.0]]], dtype=F64)  # W = a a^T w = [[1, 2], [2, 4]]
    params = [a, a, torch.ones(1, 1, dtype=F64)]
    idx = torch.tensor([[0, 0], [1, 1]])
    y = torch.tensor([0.0, 1.0], dtype=F64)
    for eng in (
        DenseHTFCompletion(tree, [2, 2], idx, y),
        GatherHTFCompletion(tree, [2, 2], idx, y, chunk=1),
    ):
        assert eng.predict(params).tolist() == [[1.0, 4.0]]
        val, _ = eng.loss_and_grad(params, L2Loss())
        assert val.tolist() == [(1.0 + 9.0) / 2]


def _engines_for(tree, dims, idx, y, vecs, ys):
    return [
        DenseHTFCompletion(tree, dims, idx, y),
        GatherHTFCompletion(tree, dims, idx, y, chunk=3),
        *sensing_engines(tree, dims, vecs, ys),
    ]


@given(models(batches=(3,)), st.integers(1, 9))
def test_engine_batch_entries_are_independent(model, m):
    tree, dims, params, idx, y, _, _ = completion_problem(model, m)
    g = _gen(model[-1] + 9)
    vecs = [torch.randn(m, d, generator=g, dtype=F64) for d in dims]
    loss = HuberLoss(0.5)
    for eng in _engines_for(tree, dims, idx, y, vecs, y):
        full_pred = eng.predict(params)
        full_val, full_grads = eng.loss_and_grad(params, loss)
        for rows in (slice(1, 2), slice(0, 2), slice(2, 3)):
            sub = [p[rows].clone() for p in params]
            torch.testing.assert_close(eng.predict(sub), full_pred[rows], rtol=1e-12, atol=1e-13)
            val, grads = eng.loss_and_grad(sub, loss)
            torch.testing.assert_close(val, full_val[rows], rtol=1e-12, atol=1e-13)
            for a, b in zip(grads, full_grads):
                torch.testing.assert_close(a, b[rows], rtol=1e-12, atol=1e-13)


def test_float32_params_give_float32_outputs():
    tree = ModeTree.parse("((1,2,3),(4,5))", 5)
    dims = [2, 3, 2, 2, 3]
    params64 = htf_init(dims, tree, [3, 2], stds=[1.0, 0.5], generator=_gen(4), dtype=F64)
    params32 = [p.float() for p in params64]
    idx = random_idx(dims, 10, 4)
    y64 = torch.randn(10, generator=_gen(5), dtype=F64)
    vecs64 = [torch.randn(10, d, generator=_gen(6 + d), dtype=F64) for d in dims]
    e64 = _engines_for(tree, dims, idx, y64, vecs64, y64)
    e32 = _engines_for(tree, dims, idx, y64.float(), [v.float() for v in vecs64], y64.float())
    for a, b in zip(e32, e64):
        pred = a.predict(params32)
        assert pred.dtype == torch.float32
        torch.testing.assert_close(pred.double(), b.predict(params64), rtol=1e-4, atol=1e-5)
        val, grads = a.loss_and_grad(params32, L2Loss())
        val64, grads64 = b.loss_and_grad(params64, L2Loss())
        assert val.dtype == torch.float32
        torch.testing.assert_close(val.double(), val64, rtol=1e-4, atol=1e-5)
        for g32, g64 in zip(grads, grads64):
            assert g32.dtype == torch.float32
            torch.testing.assert_close(g32.double(), g64, rtol=1e-4, atol=1e-4)
    assert htf_to_tensor(params32, tree).dtype == torch.float32
    assert htf_values(params32, tree, idx).dtype == torch.float32
    assert htf_network(params32, tree, one_hots(idx, dims, torch.float32)).dtype == torch.float32
    assert all(x.dtype == torch.float32 for x in htf_local_norms(params32, tree))
    assert htf_unbalancedness(params32, tree).dtype == torch.float32


def test_completion_engine_dispatch():
    tree = ModeTree.adjacent(4)
    dims = [3, 3, 3, 3]
    idx = random_idx(dims, 20, 0)
    y = torch.zeros(20, dtype=F64)
    w = 2
    assert isinstance(completion_engine(tree, dims, idx, y, w, "dense"), DenseHTFCompletion)
    assert isinstance(completion_engine(tree, dims, idx, y, w, "gather"), GatherHTFCompletion)
    assert isinstance(
        completion_engine(tree, dims, idx, y, w, "auto"), (DenseHTFCompletion, GatherHTFCompletion)
    )
    with pytest.raises(ValueError):
        completion_engine(tree, dims, idx, y, w, "sparse")


# ---------------------------------------------------------------- matricization


def test_matricize_order_four_modes_0_2():
    end = torch.randn(2, 2, 3, 4, 5, generator=_gen(0), dtype=F64)
    expect = end.permute(0, 1, 3, 2, 4).reshape(2, 2 * 4, 3 * 5)
    assert torch.equal(matricize(end, (0, 2)), expect)
    assert torch.equal(matricize(end, [2, 0]), expect)  # rows in increasing mode order
    assert torch.equal(matricize(end, (0, 1)), end.reshape(2, 6, 20))


@given(
    st.lists(st.integers(1, 3), min_size=2, max_size=5),
    st.integers(1, 2),
    st.data(),
)
def test_matricize_by_loops(dims, batch, data):
    order = len(dims)
    rows = sorted(data.draw(st.sets(st.integers(0, order - 1), min_size=1, max_size=order - 1)))
    cols = [n for n in range(order) if n not in rows]
    end = torch.randn(batch, *dims, generator=_gen(sum(dims)), dtype=F64)
    got = matricize(end, rows)
    rd, cd = [dims[n] for n in rows], [dims[n] for n in cols]
    assert got.shape == (batch, math.prod(rd), math.prod(cd))
    for tup in itertools.product(*[range(d) for d in dims]):
        r = np.ravel_multi_index(tuple(tup[n] for n in rows), rd)
        c = np.ravel_multi_index(tuple(tup[n] for n in cols), cd)
        assert torch.equal(got[:, r, c], end[(slice(None), *tup)])


@settings(max_examples=20)
@given(models(max_dim=3, max_width=2, batches=(2,)))
def test_tree_matricizations_have_rank_at_most_the_parent_width(model):
    tree, ref, dims, widths, params = build(model)
    end = htf_to_tensor(params, tree)
    for v in range(len(tree.nodes)):
        if v == tree.root:
            continue
        ranks = torch.linalg.matrix_rank(matricize(end, tree.nodes[v]))
        assert int(ranks.max()) <= widths[ref.par[v]], (tree.describe(), tree.nodes[v])


@pytest.mark.parametrize("make", [lambda: ModeTree.adjacent(4), lambda: ModeTree.interleaved(4)])
def test_rank_bound_is_tight_on_tree_nodes_and_absent_off_tree(make):
    tree = make()
    dims = [3, 3, 3, 3]
    params = htf_init(dims, tree, 2, stds=[1.0, 1.0], generator=_gen(2), dtype=F64)
    params = [p + 0.3 * torch.randn(p.shape, generator=_gen(3), dtype=F64) for p in params]
    end = htf_to_tensor(params, tree)
    for v in range(len(tree.nodes) - 1):
        ranks = torch.linalg.matrix_rank(matricize(end, tree.nodes[v]))
        assert ranks.tolist() == [2, 2]  # generic: exactly the parent's width
    off = (0, 1) if tree.nodes[4] == (0, 2) else (0, 2)  # a split the tree does not contain
    assert torch.linalg.matrix_rank(matricize(end, off)).min() > 2
