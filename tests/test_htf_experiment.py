"""The HTF experiment (Razin, Maman & Cohen, ICML 2022) around the factorization itself:
ground truths and observations (:mod:`implreg.problems.hierarchical`), reading hierarchical
rank and local dynamics off a run (:mod:`implreg.htf_analysis`), the gradient-flow clock of
:class:`~implreg.optim.AdaptiveGD`, one-sentence refusals of bad input on the command line,
and tiny end-to-end runs of the four HTF presets.

References are computed here the slow, obvious way: dense tensors by the library's
``htf_to_tensor`` (checked against the definition in ``test_htf.py``), matricizations with
numpy transposes, singular values with ``numpy.linalg.svd``, sensing by explicit outer
products, step sizes from the formula of Razin et al. (2021, App. B.2).
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from conftest import run_config

from implreg.cli import main
from implreg.config import with_overrides
from implreg.experiments import PRESETS
from implreg.factorizations.htf import ModeTree, htf_init, htf_to_tensor
from implreg.htf_analysis import Split, local_exponent, parse_splits, split_spectra, splits_of
from implreg.optim import AdaptiveGD
from implreg.problems.hierarchical import (
    htf_completion_problem,
    htf_frobenius_norm,
    htf_sensing_problem,
    low_ht_rank_tensor,
)

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_nesting(rng: random.Random, modes: list[int]):
    """A random tree over ``modes`` (0-based): groups of 2 or 3 members at every node."""
    if len(modes) == 1:
        return modes[0]
    k = rng.randint(2, min(3, len(modes)))
    cuts = sorted(rng.sample(range(1, len(modes)), k - 1))
    bounds = [0, *cuts, len(modes)]
    return tuple(_random_nesting(rng, modes[a:b]) for a, b in zip(bounds, bounds[1:]))


def _random_tree(
    seed: int, max_order: int = 5, min_order: int = 2
) -> tuple[ModeTree, list[int], dict, int]:
    """(tree, dims, widths per internal node, batch) drawn from ``seed``."""
    rng = random.Random(seed)
    order = rng.randint(min_order, max_order)
    modes = list(range(order))
    rng.shuffle(modes)
    tree = ModeTree.from_nested(_random_nesting(rng, modes))
    dims = [rng.randint(1, 4) for _ in range(order)]
    widths = {v: rng.randint(1, 4) for v in tree.internal}
    return tree, dims, widths, rng.choice([1, 3])


def _np_matricize(t: np.ndarray, rows) -> np.ndarray:
    """Rows the (0-based) modes ``rows`` in increasing order, columns the others."""
    rows = sorted(rows)
    cols = [m for m in range(t.ndim) if m not in rows]
    p = math.prod(t.shape[m] for m in rows)
    return np.transpose(t, rows + cols).reshape(p, -1)


# ------------------------------------------------------------- problems/hierarchical.py


@pytest.mark.parametrize("seed", range(12))
def test_frobenius_norm_from_grams_equals_the_dense_norm(seed):
    tree, dims, widths, batch = _random_tree(seed)
    params = htf_init(
        dims, tree, widths, stds=[0.5, 1.0, 2.0][:batch], generator=_gen(seed), dtype=F64
    )
    dense = htf_to_tensor(params, tree)
    expect = torch.linalg.vector_norm(dense.reshape(batch, -1), dim=1)
    got = htf_frobenius_norm(params, tree)
    assert got.shape == (batch,) and got.dtype == F64
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)


def test_frobenius_norm_of_a_zero_factorization_is_zero():
    tree = ModeTree.adjacent(4)
    params = htf_init((2, 3, 2, 3), tree, 2, stds=[1.0], generator=_gen(0), dtype=F64)
    params[-1].zero_()
    assert float(htf_frobenius_norm(params, tree)[0]) == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_low_ht_rank_truth_has_its_norm_and_low_tree_ranks(seed):
    tree, _, widths, _ = _random_tree(100 + seed, min_order=4)
    rng = random.Random(seed)
    dims = [rng.randint(2, 4) for _ in range(tree.order)]
    binding = 0
    truth = low_ht_rank_tensor(dims, tree, widths, norm=7.5, generator=_gen(seed))
    assert truth.dims == dims and truth.size == math.prod(dims)
    dense = truth.dense()
    assert dense.dtype == F64 and tuple(dense.shape) == tuple(dims)
    assert truth.norm() == pytest.approx(7.5, rel=1e-10)
    assert float(torch.linalg.vector_norm(dense)) == pytest.approx(7.5, rel=1e-10)
    for v in range(len(tree.nodes) - 1):
        rows = list(tree.nodes[v])
        rank = int(torch.linalg.matrix_rank(torch.from_numpy(_np_matricize(dense.numpy(), rows))))
        bound = widths[tree.parent(v)]
        if tree.children[v]:
            bound = min(bound, widths[v])
        assert rank <= bound, (tree.describe(), tree.node_text(v), rank, bound)
        rows_size = math.prod(dims[m] for m in rows)
        binding += bound < min(rows_size, truth.size // rows_size)
    assert binding > 0  # some tree node's rank is held below its matricization's shape


@pytest.mark.parametrize(
    ("tree", "low", "high"),
    [(ModeTree.adjacent(4), (0, 1), (0, 2)), (ModeTree.interleaved(4), (0, 2), (0, 1))],
)
def test_low_ht_rank_truth_is_low_rank_only_over_its_tree(tree, low, high):
    """The paper's contrast: rank <= 2 over a tree node, full (4) over the other split."""
    truth = low_ht_rank_tensor((4, 4, 4, 4), tree, [2, 2], norm=64.0, generator=_gen(3))
    dense = truth.dense().numpy()
    assert np.linalg.matrix_rank(_np_matricize(dense, low)) == 2
    assert np.linalg.matrix_rank(_np_matricize(dense, high)) == 4


def test_low_ht_rank_truth_refuses_bad_norms():
    with pytest.raises(ValueError, match="norm"):
        low_ht_rank_tensor((2, 2), ModeTree.adjacent(2), 1, norm=0.0, generator=_gen(0))


@pytest.mark.parametrize(("dims", "m_train", "m_test"), [((3, 4, 2, 3), 40, 30), ((2, 3), 4, 2)])
def test_completion_entries_are_distinct_disjoint_and_exact(dims, m_train, m_test):
    tree = ModeTree.adjacent(len(dims))
    truth = low_ht_rank_tensor(dims, tree, 2, norm=5.0, generator=_gen(1))
    prob = htf_completion_problem(truth, m_train, m_test, generator=_gen(2))
    assert prob.idx.shape == (m_train, len(dims)) and prob.test_idx.shape == (m_test, len(dims))
    assert prob.y.shape == (m_train,) and prob.test_y.shape == (m_test,)
    both = torch.cat([prob.idx, prob.test_idx])
    assert len({tuple(r) for r in both.tolist()}) == m_train + m_test  # distinct, so disjoint
    for i in range(len(dims)):
        assert 0 <= int(both[:, i].min()) and int(both[:, i].max()) < dims[i]
    dense = truth.dense()
    torch.testing.assert_close(prob.y, dense[tuple(prob.idx.T)], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(prob.test_y, dense[tuple(prob.test_idx.T)], rtol=1e-10, atol=1e-12)


def test_completion_on_a_large_tensor_draws_distinct_entries():
    """1e8 entries: the tuples are drawn and de-duplicated instead of permuted."""
    dims = (10,) * 8
    tree = ModeTree.adjacent(8)
    truth = low_ht_rank_tensor(dims, tree, 2, norm=10.0, generator=_gen(0))
    prob = htf_completion_problem(truth, 3000, 1000, generator=_gen(1))
    rows = torch.cat([prob.idx, prob.test_idx]).tolist()
    assert len({tuple(r) for r in rows}) == 4000
    assert torch.isfinite(prob.y).all() and prob.y.abs().max() > 0


def test_completion_may_take_every_entry_and_no_test_entries():
    dims = (2, 3)
    truth = low_ht_rank_tensor(dims, ModeTree.adjacent(2), 1, norm=1.0, generator=_gen(0))
    prob = htf_completion_problem(truth, 6, 0, generator=_gen(1))
    assert sorted(map(tuple, prob.idx.tolist())) == [(i, j) for i in range(2) for j in range(3)]
    assert prob.test_idx.shape == (0, 2) and prob.test_y.shape == (0,)
    with pytest.raises(ValueError):
        htf_completion_problem(truth, 5, 2, generator=_gen(1))


@pytest.mark.parametrize("tree_spec", ["adjacent", "((1,3),2)", "(1,2,3)"])
def test_sensing_measures_the_dense_tensor_against_outer_products(tree_spec):
    dims = (3, 2, 4)
    tree = ModeTree.parse(tree_spec, 3)
    widths = 2 if tree_spec != "adjacent" else [2, 3]
    truth = low_ht_rank_tensor(dims, tree, widths, norm=3.0, generator=_gen(4))
    sens = htf_sensing_problem(truth, 25, generator=_gen(5))
    assert [tuple(v.shape) for v in sens.vectors] == [(25, d) for d in dims]
    dense = truth.dense()
    expect = torch.stack(
        [
            (dense * torch.einsum("i,j,k->ijk", *(v[i] for v in sens.vectors))).sum()
            for i in range(25)
        ]
    )
    torch.testing.assert_close(sens.y, expect, rtol=1e-10, atol=1e-12)


def test_sensing_vectors_have_variance_e_to_the_minus_one_over_n():
    dims = (4, 2, 8)  # E = 64, N = 3: variance 64^(-1/3) = 1/4
    truth = low_ht_rank_tensor(dims, ModeTree.adjacent(3), 2, norm=1.0, generator=_gen(0))
    sens = htf_sensing_problem(truth, 4000, generator=_gen(1))
    for v in sens.vectors:
        x = v.reshape(-1)
        assert abs(float(x.mean())) < 0.02
        assert float(x.var()) == pytest.approx(0.25, rel=0.06)
    # each entry of X_i = x_i1 (x) x_i2 (x) x_i3 then has variance 1 / E
    outer = torch.einsum("mi,mj,mk->mijk", *sens.vectors).reshape(-1)
    assert float((outer * outer).mean()) == pytest.approx(1 / 64, rel=0.1)


# ----------------------------------------------------------------------- htf_analysis.py


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("1,3", [(0, 2)]),
        ("1,3;2,4", [(0, 2), (1, 3)]),
        ("", []),
        ("  ", []),
        ("{1,3}", [(0, 2)]),
        (" 3 , 1 ", [(0, 2)]),
        ("1,3;", [(0, 2)]),
        ("{2};{1,2,3}", [(1,), (0, 1, 2)]),
    ],
)
def test_parse_splits_reads_one_based_modes(text, expect):
    assert parse_splits(text, 4) == expect


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0,1", "names mode 0, not one of 1..4"),
        ("1,5", "names mode 5, not one of 1..4"),
        ("1,3;2,5", "names mode 5"),
        ("1,2,3,4", "names every mode"),
        ("{4,3,2,1}", "names every mode"),
        ("a,b", "must list 1-based modes"),
        ("1.5,2", "must list 1-based modes"),
        ("1,,3", "must list 1-based modes"),
    ],
)
def test_parse_splits_refuses_in_one_line(text, message):
    with pytest.raises(ValueError) as err:
        parse_splits(text, 4)
    assert message in str(err.value) and "\n" not in str(err.value)


def _labels(splits: list[Split]) -> list[tuple[str, bool]]:
    return [(s.label, s.tree) for s in splits]


def test_splits_of_the_adjacent_tree_lists_each_node_once():
    tree = ModeTree.adjacent(4)
    tree_part = [("{1}", True), ("{2}", True), ("{3}", True), ("{4}", True), ("{1,2}", True)]
    assert _labels(splits_of(tree)) == tree_part  # {3,4} is the complement of {1,2}
    assert _labels(splits_of(tree, [(0, 2)])) == [*tree_part, ("{1,3}", False)]
    # complements of listed splits and repeats add nothing; a new split keeps its own label
    assert _labels(splits_of(tree, [(2, 3), (1, 2, 3), (0, 2), (1, 3), (2, 0)])) == [
        *tree_part,
        ("{1,3}", False),
    ]
    assert _labels(splits_of(tree, [(1, 3)])) == [*tree_part, ("{2,4}", False)]
    assert [s.modes for s in splits_of(tree, [(2, 0)])][-1] == (0, 2)


def test_splits_of_other_trees():
    assert _labels(splits_of(ModeTree.adjacent(2))) == [("{1}", True)]
    inter = ModeTree.interleaved(4)
    assert _labels(splits_of(inter, [(0, 1)])) == [
        ("{1}", True),
        ("{2}", True),
        ("{3}", True),
        ("{4}", True),
        ("{1,3}", True),
        ("{1,2}", False),
    ]
    for seed in range(10):
        tree = _random_tree(seed, max_order=6)[0]
        splits = splits_of(tree)
        keys = [frozenset(s.modes) for s in splits]
        full = frozenset(range(tree.order))
        assert len(set(keys)) == len(keys)
        assert not any(full - k in keys for k in keys)
        nodes = {frozenset(n) for n in tree.nodes[:-1]}
        assert all(k in nodes for k in keys)
        assert all(k in keys or full - k in keys for k in nodes)


@pytest.mark.parametrize("k", [3, 40])
def test_split_spectra_match_numpy_svd(k):
    g = _gen(7)
    dims = (3, 4, 2, 5)
    end = torch.randn(2, *dims, generator=g, dtype=F64)
    end[1] = end[1].abs()  # another spectrum shape
    splits = splits_of(ModeTree.adjacent(4), parse_splits("1,3;2,3", 4))
    out = split_spectra(end.float(), splits, k)
    assert set(out) == {f"{p} {s.label}" for s in splits for p in ("svals", "erank")}
    for s in splits:
        sv_all, er = out[f"svals {s.label}"], out[f"erank {s.label}"]
        assert sv_all.shape == (2, k) and er.shape == (2,) and sv_all.dtype == np.float64
        for b in range(2):
            mat = _np_matricize(end[b].float().double().numpy(), list(s.modes))
            sv = np.linalg.svd(mat, compute_uv=False)
            top = np.zeros(k)
            top[: min(k, sv.size)] = sv[:k]
            np.testing.assert_allclose(sv_all[b], top, rtol=1e-10, atol=1e-10)
            p = sv / sv.sum()
            np.testing.assert_allclose(er[b], np.exp(-(p * np.log(p)).sum()), rtol=1e-10)


def test_effective_rank_of_rank_one_and_of_equal_singular_values():
    u = torch.randn(3, generator=_gen(0), dtype=F64)
    w = torch.randn(4, generator=_gen(1), dtype=F64)
    rank_one = torch.einsum("i,j->ij", u, w)[None]
    eye = torch.eye(3, dtype=F64)[None]
    split = [Split("{1}", (0,), True)]
    assert split_spectra(rank_one, split, 2)["erank {1}"][0] == pytest.approx(1.0, abs=1e-6)
    assert split_spectra(eye, split, 5)["erank {1}"][0] == pytest.approx(3.0, rel=1e-12)
    np.testing.assert_allclose(split_spectra(eye, split, 5)["svals {1}"][0], [1, 1, 1, 0, 0])


def _escape(p: float, c: float, sigma0: float, times: np.ndarray) -> np.ndarray:
    """Closed form of dσ/dt = c σ^p (p > 1): σ(t) = (σ0^(1-p) - (p-1) c t)^(-1/(p-1))."""
    return (sigma0 ** (1 - p) - (p - 1) * c * times) ** (-1 / (p - 1))


def _blowup(p: float, c: float, sigma0: float) -> float:
    return sigma0 ** (1 - p) / ((p - 1) * c)


@pytest.mark.parametrize("p", [4 / 3, 1.5, 2.0])
def test_local_exponent_is_exact_on_geometric_records(p):
    """Norms growing by a constant factor per record (uneven time steps): the finite
    differences against the geometric means follow c' σ^p exactly."""
    c, s0 = 3.0, 1e-3
    sigma = s0 * 1.05 ** np.arange(200)
    time = (s0 ** (1 - p) - sigma ** (1 - p)) / ((p - 1) * c)
    slope, points = local_exponent(time, sigma, low=0.0, high=np.inf)
    assert slope == pytest.approx(p, abs=1e-8) and points == 199


def test_local_exponent_on_an_even_time_grid_and_on_random_steps():
    p, c, s0 = 4 / 3, 0.5, 1e-2
    end = 0.95 * _blowup(p, c, s0)
    even = np.linspace(0.0, end, 4001)
    slope, points = local_exponent(even, _escape(p, c, s0, even), low=2e-2, high=1.0)
    assert slope == pytest.approx(p, abs=2e-3) and points >= 100
    rng = np.random.default_rng(0)
    uneven = np.concatenate([[0.0], np.sort(rng.uniform(0.0, end, 3000))])
    slope, _ = local_exponent(uneven, _escape(p, c, s0, uneven), low=2e-2, high=1.0)
    assert slope == pytest.approx(p, abs=5e-3)


def test_local_exponent_counts_only_growing_steps_inside_the_window():
    p, c, s0 = 4 / 3, 1.0, 1e-3
    sigma = s0 * 1.1 ** np.arange(60)
    time = (s0 ** (1 - p) - sigma ** (1 - p)) / ((p - 1) * c)
    mid = np.sqrt(sigma[1:] * sigma[:-1])
    slope, points = local_exponent(time, sigma, low=1e-2, high=0.1)
    assert slope == pytest.approx(p, abs=1e-8)
    assert points == int(((mid >= 1e-2) & (mid <= 0.1)).sum()) < 59
    # a plateau before, a record where no time passes, a decay after: all ignored
    t_all = np.concatenate([[-3.0, -2.0, -1.0], time, [time[-1]], time[-1] + [1.0, 2.0, 3.0]])
    s_all = np.concatenate(
        [[s0] * 3, sigma, [2 * sigma[-1]], sigma[-1] * np.array([1.5, 1.2, 1.1])]
    )
    slope, points = local_exponent(t_all, s_all, low=0.0, high=np.inf)
    assert slope == pytest.approx(p, abs=1e-8) and points == 59


def test_local_exponent_equals_a_loop_over_coarse_records():
    """Coarse, uneven records: the fit is the documented one (each finite difference placed
    at the geometric mean of its two norms), computed here record by record."""
    p, c, s0 = 4 / 3, 2.0, 1e-2
    rng = np.random.default_rng(3)
    time = np.concatenate([[0.0], np.sort(rng.uniform(0, 0.97 * _blowup(p, c, s0), 12))])
    sigma = _escape(p, c, s0, time)
    xs, ys = [], []
    for i in range(len(time) - 1):
        dt, ds = time[i + 1] - time[i], sigma[i + 1] - sigma[i]
        mid = math.sqrt(sigma[i] * sigma[i + 1])
        if dt > 0 and ds > 0 and 2e-2 <= mid <= 5.0:
            xs.append(math.log(mid))
            ys.append(math.log(ds / dt))
    slope, points = local_exponent(time, sigma, low=2e-2, high=5.0)
    assert points == len(xs) >= 4
    assert slope == pytest.approx(np.polyfit(xs, ys, 1)[0], rel=1e-10)
    assert abs(slope - p) > 1e-3  # coarse records: not the exact exponent, the documented fit


def test_local_exponent_needs_four_points():
    sigma = 1e-2 * 1.2 ** np.arange(5)
    time = np.arange(5.0)
    assert local_exponent(time[:4], sigma[:4], low=0, high=1) is None  # 3 differences
    assert local_exponent(time, sigma, low=0, high=1)[1] == 4
    assert local_exponent(time, sigma, low=10, high=20) is None  # nothing in the window
    assert local_exponent(time[::-1], sigma, low=0, high=1) is None  # time runs backwards
    assert local_exponent(np.array([]), np.array([]), low=0, high=1) is None


# ---------------------------------------------------------------------- AdaptiveGD.time


def _eta(lr: float, beta: float, eps: float, v: float, t: int) -> float:
    return lr / (math.sqrt(v / (1 - beta**t)) + eps)


@pytest.mark.parametrize("batch", [1, 3])
def test_adaptive_time_is_the_sum_of_applied_step_sizes(batch):
    lr, beta, eps = 0.05, 0.9, 1e-3
    opt = AdaptiveGD(lr, beta=beta, eps=eps)
    g = _gen(batch)
    params = [
        torch.randn(batch, 3, 2, generator=g, dtype=F64),
        torch.randn(batch, 4, generator=g, dtype=F64),
    ]
    masks = [
        [True] * 3,
        [True, False, True],
        [False, False, True],
        [True] * 3,
        [False, True, False],
    ]
    v, t, clock = [0.0] * batch, [0] * batch, [0.0] * batch
    last = [math.nan] * batch
    for step, mask in enumerate(masks):
        active = torch.tensor(mask[:batch])
        grads = [torch.randn(p.shape, generator=g, dtype=F64) for p in params]
        before = [p.clone() for p in params]
        opt.step(params, grads, active)
        for b in range(batch):
            moved = [(q[b] - p[b]) for p, q in zip(params, before)]
            if not mask[b]:
                assert all(float(m.abs().max()) == 0 for m in moved), step
                continue
            sq = sum(float((gr[b] ** 2).sum()) for gr in grads)
            t[b] += 1
            v[b] = beta * v[b] + (1 - beta) * sq
            eta = _eta(lr, beta, eps, v[b], t[b])
            for m, gr in zip(moved, grads):
                torch.testing.assert_close(m, eta * gr[b], rtol=1e-12, atol=1e-14)
            clock[b] += eta
            last[b] = eta
        assert opt.t == t
        assert opt.time == pytest.approx(clock, rel=1e-14)
        assert opt.last_eta == pytest.approx(last, rel=1e-14, nan_ok=True)
    assert all(c > 0 for c in clock)  # every run took at least one step


def test_adaptive_time_of_frozen_runs_stays_and_compact_keeps_the_rest():
    opt = AdaptiveGD(0.1)
    params = [torch.zeros(3, 2, dtype=F64)]
    opt.step(params, [torch.ones(3, 2, dtype=F64)], torch.tensor([True, True, True]))
    first = list(opt.time)
    for _ in range(3):
        opt.step(params, [torch.ones(3, 2, dtype=F64)], torch.tensor([False, True, False]))
    assert opt.time[0] == first[0] and opt.time[2] == first[2] and opt.time[1] > first[1]
    # step_sizes gives frozen runs a step size, but their clock stays
    etas = opt.step_sizes([torch.ones(3, 2, dtype=F64)], [False, False, False])
    assert len(etas) == 3 and opt.time[0] == first[0]
    before = list(opt.time)
    opt.compact([1])
    # the clock stays indexed by the first batch: dropped runs keep their time
    assert opt.time == before and opt.runs == [1] and len(opt.v) == len(opt.t) == 1
    steps = list(opt.last_eta)
    opt.step([torch.zeros(1, 2, dtype=F64)], [torch.ones(1, 2, dtype=F64)], torch.tensor([True]))
    assert opt.time[0] == before[0] and opt.time[2] == before[2] and opt.time[1] > before[1]
    # the last step size of a dropped run stays; the running one's is its newest step
    assert opt.last_eta[0] == steps[0] and opt.last_eta[2] == steps[2]
    assert opt.last_eta[1] == pytest.approx(opt.time[1] - before[1], rel=1e-12)


def test_adaptive_state_round_trip_continues_the_clock():
    g = _gen(11)
    grads = [[torch.randn(2, 5, generator=g, dtype=F64)] for _ in range(6)]
    masks = [[True, True], [True, False], [False, True]] + [[True, True]] * 3
    a, pa = AdaptiveGD(0.02, eps=1e-4), [torch.zeros(2, 5, dtype=F64)]
    for gr, mask in zip(grads[:3], masks):
        a.step(pa, gr, torch.tensor(mask))
    state = a.state_dict()
    assert set(state) == {"v", "t", "time", "last_eta", "runs"} and len(state["time"]) == 2
    b, pb = AdaptiveGD(0.02, eps=1e-4), [pa[0].clone()]
    b.load_state_dict(state)
    assert b.time == a.time and b.last_eta == a.last_eta and b.t == a.t == [2, 2]
    for gr, mask in zip(grads[3:], masks[3:]):
        a.step(pa, gr, torch.tensor(mask))
        b.step(pb, gr, torch.tensor(mask))
    assert a.time == b.time and a.t == b.t and a.v == b.v
    assert torch.equal(pa[0], pb[0])
    assert state["time"] != a.time  # the snapshot did not follow later steps


def test_adaptive_state_without_time_loads_an_unknown_clock():
    opt = AdaptiveGD(0.1)
    opt.load_state_dict({"v": [1.0, 2.0], "t": [3, 4]})
    assert len(opt.time) == 2 and all(math.isnan(x) for x in opt.time)
    opt.step([torch.zeros(2, 3, dtype=F64)], [torch.ones(2, 3, dtype=F64)], torch.ones(2).bool())
    assert opt.t == [4, 5] and all(math.isnan(x) for x in opt.time)  # unknown, never zero
    assert all(math.isnan(x) for x in opt.state_dict()["time"])
    assert len(opt.last_eta) == 2 and all(x > 0 for x in opt.last_eta)  # set by the step
    with pytest.raises(ValueError, match="time"):
        AdaptiveGD(0.1).load_state_dict({"v": [1.0, 2.0], "t": [3, 4], "time": [0.5]})
    fresh = AdaptiveGD(0.1)
    assert fresh.state_dict() == {"v": [], "t": [], "time": [], "last_eta": [], "runs": []}
    fresh.load_state_dict(fresh.state_dict())
    assert fresh.time == []


# ----------------------------------------------------------------------- the command line

BAD = [
    ("htf-dynamics", ["tree=((1,2),(3,5))"], "tree", "mode 5 is not one of 1..4"),
    ("htf-dynamics", ["tree=((1,2),3)"], "tree", "covers 3 modes but the tensor has 4"),
    ("htf-dynamics", ["tree=((1,2),(2,3))"], "tree", "mode 2 appears twice"),
    ("htf-dynamics", ["tree=((1,2,3,4),)"], "tree", "root of a mode tree needs at least two"),
    ("htf-dynamics", ["tree=((1,2),(3,4),())"], "tree", "cannot be empty"),
    ("htf-dynamics", ["tree=((1,2),(3,4))", "dims=4,4,4"], "tree", "tensor has 3"),
    ("htf-dynamics", ["tree=((1,2),(3,4),(5,6))"], "tree", "covers 6 modes"),
    ("htf-dynamics", ["tree=interleaved", "dims=4,4,4"], "tree", "even order"),
    ("htf-dynamics", ["tree=adjacent:1"], "tree", "at least 2"),
    ("htf-dynamics", ["tree=((1,2),(3,four))"], "tree", "nested groups"),
    ("htf-dynamics", ["widths=0"], "widths", ">= 1"),
    ("htf-dynamics", ["gt_norm=1e300"], "gt_norm", "too large for float32"),
    ("htf-dynamics", ["init_stds=1e300"], "init_stds", "too large for float32"),
    ("htf-dynamics", ["gt_norm=nan"], "gt_norm", "finite"),
    ("htf-dynamics", ["widths=1,2,3"], "widths", "one width per level"),
    ("htf-dynamics", ["gt_widths=1,2,3"], "gt_widths", "one width per level"),
    ("htf-dynamics", ["num_observations=65000", "num_test=1000"], "num_observations", "65536"),
    ("htf-sensing", ["dims=4,4,4,4", "num_test=300"], "num_test", "256"),
    ("htf-dynamics", ["splits=1,7"], "splits", "names mode 7"),
    ("htf-dynamics", ["splits=1,2,3,4"], "splits", "names every mode"),
    ("htf-dynamics", ["splits=1;x"], "splits", "1-based modes"),
    ("htf-dynamics", ["loss=huber"], "huber_delta", "huber"),
    ("htf-large", ["method=dense"], "method", "use method=gather"),
    ("dynamics-mf-tf-htf", ["htf=widths=0"], "htf", "widths"),
    ("dynamics-mf-tf-htf", ["htf=tree=((1,2),(3,5))"], "htf", "tree"),
    ("dynamics-mf-tf-htf", ["htf=splits=1,7"], "htf", "splits"),
]


def _capped(preset: str, sets: list[str]) -> list[str]:
    """``sets`` with a one-iteration budget (tiny budgets for the other panels), so that a
    check that stops refusing fails the test in seconds instead of running the full preset."""
    if preset != "dynamics-mf-tf-htf":
        return [*sets, "max_iterations=1"]
    tiny = PRESETS[preset].tiny
    out = [f"{k}={tiny[k]}" for k in ("mf", "tf") if not any(s.startswith(k) for s in sets)]
    return out + [s.replace("htf=", "htf=max_iterations=1;", 1) for s in sets]


@pytest.mark.parametrize(
    ("preset", "sets", "key", "message"),
    BAD,
    ids=[f"{b[0]} {' '.join(b[1])}" for b in BAD],
)
def test_bad_htf_input_is_one_sentence_exit_2_and_no_folder(
    tmp_path, capsys, preset, sets, key, message
):
    out = tmp_path / "run"
    argv = ["run", preset, "--out", str(out), "--no-progress"]
    for s in _capped(preset, sets):
        argv += ["--set", s]
    code = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, captured
    assert err.startswith("implreg: error: "), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert key in err and message in err, err
    if preset == "dynamics-mf-tf-htf":
        assert err.startswith(f"implreg: error: {key}: "), err  # names the panel first
    assert not out.exists()


def test_one_width_for_every_level_validates():
    cfg = with_overrides(PRESETS["htf-dynamics"].config, {"gt_widths": (4,), "widths": (8,)})
    cfg.check()
    assert cfg.mode_tree().resolve_widths(cfg.width_arg(cfg.widths)) == (8, 8, 8)


# ------------------------------------------------------------------ tiny end-to-end runs

ADJACENT_SPLITS = {"{1}", "{2}", "{3}", "{4}", "{1,2}"}


def _tiny(name: str):
    preset = PRESETS[name]
    return with_overrides(preset.config, dict(preset.tiny))


@pytest.fixture(scope="module")
def htf_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("htf")
    names = ("htf-dynamics", "htf-tree", "htf-sensing", "htf-large")
    return {n: run_config(_tiny(n), root / n) for n in names}


def _hierarchy(run) -> dict[str, np.ndarray]:
    with np.load(run.path / "hierarchy.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.mark.parametrize("name", ["htf-dynamics", "htf-tree", "htf-sensing", "htf-large"])
def test_tiny_run_summary_and_hierarchy(name, htf_runs):
    run = htf_runs[name]
    cfg = run.config
    assert run.exit_code == 0 and run.finished
    summary = run.summary
    tree = cfg.mode_tree()
    assert summary["tree"] == tree.describe()
    data = _hierarchy(run)
    its, root = data["iterations"], data["root_local_norms"]
    batch, width_root = len(cfg.init_stds), tree.resolve_widths(cfg.width_arg(cfg.widths))[-1]
    assert its[0] == 0 and np.all(np.diff(its) > 0)
    assert root.shape == (its.size, batch, width_root)
    assert len(summary["runs"]) == batch
    # local norms of every internal non-root node, by their modes
    want_local = {f"local {tree.node_text(v)}" for v in tree.internal[:-1]}
    assert {k for k in data if k.startswith("local ")} == want_local
    assert ("local {1,3}" if name == "htf-tree" else "local {1,2}") in data
    # the gradient-flow clock: starts at 0 and never runs backwards
    time = data["time"]
    assert time.shape == (its.size, batch)
    for b in range(batch):
        assert time[0, b] == 0 and np.all(np.diff(time[:, b]) >= 0) and time[-1, b] > 0
    dense = math.prod(cfg.dims) <= cfg.dense_max
    for b, r in enumerate(summary["runs"]):
        assert r["init_std"] == cfg.init_stds[b]
        assert isinstance(r["n_learned"], int) and r["n_learned"] == len(r["learned"])
        final = root[-1, b]
        assert r["root_above_fraction"] == int((final > cfg.learned_fraction * final.max()).sum())
        assert set(r["nodes"]) == {k[6:] for k in want_local}
        exp = r["exponent"]
        assert exp["predicted"] == pytest.approx(4 / 3) and isinstance(exp["fits"], list)
        assert exp["median"] is None or math.isfinite(exp["median"])
        spectra = r["spectra"]
        if not dense:
            assert spectra == {} and r["max_tree_effective_rank"] is None
            continue
        tree_flags = {label: s["tree"] for label, s in spectra.items()}
        if name == "htf-tree":
            assert tree_flags == {
                **dict.fromkeys(("{1}", "{2}", "{3}", "{4}", "{1,3}"), True),
                "{1,2}": False,
            }
        else:
            assert tree_flags == {**dict.fromkeys(ADJACENT_SPLITS, True), "{1,3}": False}
        for label, s in spectra.items():
            assert len(s["singular_values"]) == cfg.top_svals
            np.testing.assert_allclose(s["singular_values"], data[f"svals {label}"][-1, b])
            assert s["effective_rank"] == pytest.approx(float(data[f"erank {label}"][-1, b]))
            assert 1 - 1e-9 <= s["effective_rank"] <= 16  # 4 x 4 x 4 x 4: at most 16 x 16
        assert r["max_tree_effective_rank"] == max(
            s["effective_rank"] for s in spectra.values() if s["tree"]
        )
    extra = "{1,2}" if name == "htf-tree" else "{1,3}"
    if dense:
        assert data[f"svals {extra}"].shape == (its.size, batch, cfg.top_svals)
        assert data[f"erank {extra}"].shape == (its.size, batch)
        assert np.all(np.diff(data[f"svals {extra}"], axis=-1) <= 1e-6)  # descending
    else:
        assert not any(k.startswith(("svals ", "erank ")) for k in data)


def test_a_run_stopping_early_keeps_the_other_runs_clock(tmp_path):
    cfg = with_overrides(_tiny("htf-dynamics"), {"tol": 0.1, "patience": 1, "check_every": 1})
    run = run_config(cfg, tmp_path / "r")
    stops = [r["stopped_at"] for r in run.summary["runs"]]
    assert len(set(stops)) == 2  # one run stops before the other
    data = _hierarchy(run)
    its, time = data["iterations"], data["time"]
    for b, s in enumerate(stops):
        upto = its <= s
        assert time[0, b] == 0 and np.all(np.diff(time[upto, b]) > 0)
        assert np.isnan(time[~upto, b]).all()


def test_thread_policy_gives_the_published_dense_step_one_thread():
    """Under the passive OpenMP wait implreg sets, two threads lost on the width-512 dense
    step (47 against 57 it/s, bench/bench_htf_step.py): every HTF preset follows the flop
    policy, whose threshold (4e9 flops per step) the published step (~1e9) is far below;
    several inits batched in one step can cross it."""
    from implreg.threads import MIN_WORK_PER_THREAD, threads_for_config

    big = PRESETS["htf-dynamics"].config
    assert big.step_flops() < 2 * MIN_WORK_PER_THREAD
    assert threads_for_config(big, cores=2) == 1
    assert threads_for_config(big, requested=2, cores=2) == 2
    assert threads_for_config(PRESETS["htf-large"].config, cores=2) == 1
    assert threads_for_config(_tiny("htf-dynamics"), cores=2) == 1
    many = with_overrides(big, {"init_stds": [0.01] * 8})
    assert many.step_flops() >= 2 * MIN_WORK_PER_THREAD
    assert threads_for_config(many, cores=2) == 2
    assert threads_for_config(many, cores=1) == 1


def test_seed_sweep_counts_the_ground_truth_root_width(tmp_path):
    """`implreg sweep htf-dynamics --seeds`: the aggregate judges each seed against the
    ground truth's root width (gt_widths[-1]), the HTF analogue of gt_rank."""
    import json

    tiny = dict(PRESETS["htf-dynamics"].tiny)
    sets = [f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in tiny.items()]
    args = ["sweep", "htf-dynamics", "--seeds", "0-1", "--out", str(tmp_path / "s")]
    assert main([*args, *[x for s in sets for x in ("--set", s)], "--no-progress"]) == 0
    agg = json.loads((tmp_path / "s" / "aggregate.json").read_text())
    assert _tiny("htf-dynamics").expected_components() == tiny["gt_widths"][-1]
    for entry in agg["runs"]:
        assert 0.0 <= entry["exactly_gt_rank_learned_fraction"] <= 1.0


def test_the_trio_cp_panel_follows_the_component_count_rule_of_figure_3():
    """The blog's CP panel: modes of 16, 256 components, CP rank 5, ||W*|| 64, init 1e-3.

    Its order is not stated; 256 components is the product of all mode sizes but the
    largest (Razin et al. 2021, Figure 3's rule) only at order 3.  At order 4 (16^3 = 4096
    would be the count) the panel learned one component, not five (README)."""
    tf = PRESETS["dynamics-mf-tf-htf"].config.panel("tf")
    dims = sorted(tf.dims)
    assert dims == [16, 16, 16]
    assert tf.rank == math.prod(dims[:-1]) == 256
    assert (tf.gt_rank, tf.gt_norm, tuple(tf.init_stds)) == (5, 64, (1e-3,))


def test_the_trio_mf_panel_starts_from_the_authors_layer_init_and_step():
    """The blog's MF panel (authors' code, read for facts): every layer's entries
    N(0, 1e-3^2), adaptive GD with lr 0.01 and eps 1e-6.  ``mf-dynamics`` takes an
    end-to-end ``init_scale``; the panel's value must give layers of that std (the old
    ``init_scale=1e-3`` gave 0.0125 and left zero ~4x later than published)."""
    from implreg.factorizations.matrix import mf_init

    mf = PRESETS["dynamics-mf-tf-htf"].config.panel("mf")
    assert (tuple(mf.shape), mf.gt_rank, mf.gt_norm, tuple(mf.depths)) == ((64, 64), 5, 64, (3,))
    assert (mf.init, mf.optimizer, mf.lr, mf.eps) == ("gaussian", "adaptive", 0.01, 1e-6)
    layers = mf_init(
        mf.shape, 3, scales=[mf.init_scale], generator=torch.Generator().manual_seed(0)
    )
    assert [tuple(w.shape) for w in layers] == [(1, 64, 64)] * 3
    entries = torch.cat([w.flatten() for w in layers])  # 12288 draws: std within ~1.3%
    assert abs(float(entries.std()) / 1e-3 - 1) < 0.05
    assert abs(float(entries.mean())) < 1e-4


@pytest.mark.parametrize(
    ("dims", "tree"),
    [((3, 4, 5), "adjacent"), ((3, 4, 2, 3), "interleaved"), ((3, 4, 5), "checkerboard")],
)
def test_cp_truth_is_the_cp_tensor_of_its_leaves(dims, tree):
    """``gt_type=cp``: the end tensor is sum_r a_r^1 (x) ... (x) a_r^N of the leaves (the
    definition, by einsum), at the asked norm, of CP rank at most ``rank`` over the tree."""
    from implreg.problems.hierarchical import cp_ht_tensor

    t = ModeTree.parse(tree, len(dims))
    truth = cp_ht_tensor(dims, t, 3, norm=7.0, generator=torch.Generator().manual_seed(1))
    leaves = [truth.params[v][0] for v in range(t.order)]
    letters = "abcdefgh"[: len(dims)]
    spec = ",".join(f"{c}r" for c in letters) + "->" + letters
    expect = torch.einsum(spec, *leaves)
    assert torch.allclose(truth.dense(), expect, rtol=1e-12, atol=1e-12)
    assert math.isclose(float(expect.norm()), 7.0, rel_tol=1e-12)
    assert np.linalg.matrix_rank(expect.reshape(dims[0], -1).numpy()) <= 3


def test_gt_type_cp_takes_one_rank_and_counts_it():
    cfg = with_overrides(PRESETS["htf-dynamics"].config, {"gt_type": "cp", "gt_widths": (4,)})
    cfg.check()
    assert cfg.expected_components() == 4
    bad = with_overrides(PRESETS["htf-dynamics"].config, {"gt_type": "cp", "gt_widths": (5, 3)})
    with pytest.raises(Exception, match="gt_type=cp takes one CP rank"):
        bad.check()


def test_a_run_on_the_authors_order3_tree(tmp_path):
    """tree=checkerboard at order 3 is ((1,2),(3,)): the one-child node {3}' has its own
    local norms; its matricization is leaf {3}'s (listed once, as {1,2} and {1,3} are the
    complements of {3} and {2})."""
    cfg = with_overrides(
        _tiny("htf-dynamics"),
        {
            "dims": (3, 3, 3),
            "tree": "checkerboard",
            "widths": (4, 4),
            "gt_widths": (2, 2),
            "num_observations": 12,
            "num_test": 6,
        },
    )
    run = run_config(cfg, tmp_path / "r")
    assert run.exit_code == 0 and run.summary["tree"] == "((1,2),(3,))"
    data = _hierarchy(run)
    assert {k for k in data if k.startswith("local ")} == {"local {1,2}", "local {3}'"}
    assert data["local {3}'"].shape == (data["iterations"].size, len(cfg.init_stds), 4)
    for r in run.summary["runs"]:
        assert set(r["nodes"]) == {"{1,2}", "{3}'"}
        assert set(r["spectra"]) == {"{1}", "{2}", "{3}"}
