"""Fast analytic losses and gradients of the CP objective against autograd, on random shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import random_entries, random_factors
from hypothesis import given, settings
from hypothesis import strategies as st

from implreg.factorizations.cp import cp_to_tensor
from implreg.factorizations.cp_engine import (
    DenseCompletion,
    DenseSensing,
    GatherCompletion,
    RankOneSensing,
    SampledCompletion,
    choose_completion_method,
    completion_engine,
    group_modes,
    linear_index,
)
from implreg.losses import HuberLoss, L2Loss


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@st.composite
def problems(draw, max_order: int = 5, max_dim: int = 6, max_m: int = 60):
    """(dims, rank, batch, m, seed): orders 1-5, sizes 1-6, 1 <= m <= #entries."""
    order = draw(st.integers(1, max_order))
    dims = draw(st.lists(st.integers(1, max_dim), min_size=order, max_size=order))
    rank = draw(st.integers(1, 5))
    batch = draw(st.sampled_from([1, 3]))
    m = draw(st.integers(1, min(max_m, math.prod(dims))))
    seed = draw(st.integers(0, 10_000))
    return dims, rank, batch, m, seed


def pick_loss(kind: str, residuals: torch.Tensor):
    """L2, or Huber with delta between two residual magnitudes so both branches are used."""
    if kind == "l2":
        return L2Loss()
    mags = residuals.abs().reshape(-1).sort().values
    if mags.numel() == 1:
        return HuberLoss(float(mags[0]) / 2 + 1e-3)
    k = mags.numel() // 2
    delta = float(mags[k - 1] + mags[k]) / 2
    if delta <= 0:
        delta = float(mags[-1]) / 2
    loss = HuberLoss(delta)
    quad = residuals.abs() < delta
    assert quad.any() and (~quad).any(), "both branches of eq. (8) must be active"
    return loss


def autograd_reference(f, predict, y, loss):
    params = [x.clone().requires_grad_() for x in f]
    pred = predict(params)
    val = loss.pointwise(pred - y)[0].mean(-1)
    val.sum().backward()
    return val.detach(), [p.grad for p in params], pred.detach()


def assert_matches(val, grads, ref_val, ref_grads):
    assert val.shape == ref_val.shape
    assert torch.allclose(val, ref_val, rtol=1e-10, atol=1e-12)
    assert len(grads) == len(ref_grads)
    for a, b in zip(grads, ref_grads):
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------- completion


@settings(max_examples=100)
@given(
    problems(),
    st.sampled_from(["l2", "huber"]),
    st.sampled_from([1, 2, 6, 36, 1000]),
    st.sampled_from([1, 3, 7, 4096]),
)
def test_completion_engines_match_autograd(problem, loss_kind, table_max, chunk):
    dims, rank, batch, m, seed = problem
    f = random_factors(dims, rank, batch, seed)
    idx, lin = random_entries(dims, m, seed)
    y = torch.randn(m, dtype=torch.float64, generator=_gen(seed + 1))

    def predict(p):
        return cp_to_tensor(p).reshape(batch, -1)[:, lin]

    loss = pick_loss(loss_kind, predict(f) - y)
    ref_val, ref_grads, ref_pred = autograd_reference(f, predict, y, loss)
    engines = [
        DenseCompletion(dims, idx, y),
        GatherCompletion(dims, idx, y, table_max=table_max, chunk=chunk),
        GatherCompletion(dims, idx, y, table_max=1, chunk=max(1, m - 1)),  # one group per mode
    ]
    if len(dims) >= 2:
        engines.append(SampledCompletion(dims, idx, y))
    for eng in engines:
        assert eng.m == m
        val, grads = eng.loss_and_grad(f, loss)
        assert_matches(val, grads, ref_val, ref_grads)
        assert torch.allclose(eng.predict(f), ref_pred, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_kind", ["l2", "huber"])
@pytest.mark.parametrize("table_max, chunk", [(1, 1), (1, 5), (4, 16), (5, 17), (10_000, 3)])
def test_gather_completion_chunk_and_group_edges(loss_kind, table_max, chunk):
    """Chunks smaller than, dividing and equal to m; groups of one mode (table_max < d_n)."""
    dims, batch = [4, 3, 5, 2], 3
    f = random_factors(dims, 3, batch, seed=21)
    idx, lin = random_entries(dims, 16, seed=21)
    y = torch.randn(16, dtype=torch.float64, generator=_gen(22))

    def predict(p):
        return cp_to_tensor(p).reshape(batch, -1)[:, lin]

    loss = pick_loss(loss_kind, predict(f) - y)
    ref_val, ref_grads, ref_pred = autograd_reference(f, predict, y, loss)
    eng = GatherCompletion(dims, idx, y, table_max=table_max, chunk=chunk)
    if table_max == 1:
        assert eng.groups == [[0], [1], [2], [3]]
    val, grads = eng.loss_and_grad(f, loss)
    assert_matches(val, grads, ref_val, ref_grads)
    assert torch.allclose(eng.predict(f), ref_pred, rtol=1e-10, atol=1e-12)


def test_repeated_observations_count_twice():
    dims = [3, 3]
    f = random_factors(dims, 2, 1, seed=1)
    idx = torch.tensor([[0, 1], [0, 1], [2, 2]])
    y = torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    lin = linear_index(idx, dims)
    ref_val, ref_grads, _ = autograd_reference(
        f, lambda p: cp_to_tensor(p).reshape(1, -1)[:, lin], y, L2Loss()
    )
    for eng in (DenseCompletion(dims, idx, y), GatherCompletion(dims, idx, y, chunk=2)):
        val, grads = eng.loss_and_grad(f, L2Loss())
        assert_matches(val, grads, ref_val, ref_grads)


def test_engine_loss_is_the_mean_pointwise_loss():
    """Paper eq. (1)-(2): phi = 1/m sum_i l(pred_i - y_i), here with l(z) = z^2 (no 1/2)."""
    f = [torch.tensor([[[1.0], [2.0]]], dtype=torch.float64)] * 2  # W = [[1, 2], [2, 4]]
    idx = torch.tensor([[0, 0], [1, 1]])
    y = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for eng in (DenseCompletion([2, 2], idx, y), GatherCompletion([2, 2], idx, y)):
        val, _ = eng.loss_and_grad(f, L2Loss())
        assert val.tolist() == [(1.0 + 9.0) / 2]


# ---------------------------------------------------------------- sensing


def _explicit_rank_one(vecs):
    """Rows ``vec(x_i^1 (x) ... (x) x_i^N)``, built one measurement at a time."""
    rows = []
    for i in range(vecs[0].shape[0]):
        x = vecs[0][i]
        for v in vecs[1:]:
            x = torch.outer(x, v[i]).reshape(-1)
        rows.append(x)
    return torch.stack(rows)


@settings(max_examples=100)
@given(problems(max_order=4, max_dim=4, max_m=30), st.sampled_from(["l2", "huber"]))
def test_dense_sensing_matches_autograd(problem, loss_kind):
    dims, rank, batch, m, seed = problem
    f = random_factors(dims, rank, batch, seed)
    g = _gen(seed + 3)
    x = torch.randn(m, math.prod(dims), dtype=torch.float64, generator=g)
    y = torch.randn(m, dtype=torch.float64, generator=g)

    def predict(p):
        return cp_to_tensor(p).reshape(batch, -1) @ x.T

    loss = pick_loss(loss_kind, predict(f) - y)
    ref_val, ref_grads, ref_pred = autograd_reference(f, predict, y, loss)
    eng = DenseSensing(dims, x, y)
    val, grads = eng.loss_and_grad(f, loss)
    assert_matches(val, grads, ref_val, ref_grads)
    assert torch.allclose(eng.predict(f), ref_pred, rtol=1e-10, atol=1e-12)


def test_dense_sensing_rejects_a_wrong_measurement_width():
    with pytest.raises(ValueError, match="one column per tensor entry"):
        DenseSensing([2, 3], torch.zeros(4, 5, dtype=torch.float64), torch.zeros(4))


@settings(max_examples=100)
@given(
    problems(max_order=4, max_dim=4, max_m=30),
    st.sampled_from(["l2", "huber"]),
    st.sampled_from([1, 4, 4096]),
)
def test_rank_one_sensing_matches_explicit_measurements(problem, loss_kind, chunk):
    dims, rank, batch, m, seed = problem
    f = random_factors(dims, rank, batch, seed)
    g = _gen(seed + 4)
    vecs = [torch.randn(m, d, dtype=torch.float64, generator=g) for d in dims]
    y = torch.randn(m, dtype=torch.float64, generator=g)
    x = _explicit_rank_one(vecs)

    def predict(p):
        return cp_to_tensor(p).reshape(batch, -1) @ x.T

    loss = pick_loss(loss_kind, predict(f) - y)
    ref_val, ref_grads, ref_pred = autograd_reference(f, predict, y, loss)
    eng = RankOneSensing(vecs, y, chunk=chunk)
    assert eng.m == m
    val, grads = eng.loss_and_grad(f, loss)
    assert_matches(val, grads, ref_val, ref_grads)
    assert torch.allclose(eng.predict(f), ref_pred, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- dispatch, helpers


def _random_idx(dims, m, seed):
    g = _gen(seed)
    return torch.stack([torch.randint(0, d, (m,), generator=g) for d in dims], dim=1)


def test_completion_engine_dispatch():
    dims4 = [10] * 4
    idx = _random_idx(dims4, 2000, 0)
    y = torch.zeros(2000, dtype=torch.float64)
    # Figure 3 (density 0.2) on the CPU: sampled products; denser, or on a GPU: dense
    assert choose_completion_method(dims4, 2000) == "sampled"
    assert isinstance(completion_engine(dims4, idx, y), SampledCompletion)
    assert isinstance(completion_engine(dims4, idx, y, method="auto"), SampledCompletion)
    assert choose_completion_method(dims4, 2000, device="cuda") == "dense"
    assert choose_completion_method(dims4, 2501) == "dense"
    assert choose_completion_method([100], 20) == "dense"  # order 1
    # CP on 16^4 with m = 2048 (3% observed): far sparser, small halves: sampled
    assert choose_completion_method([16] * 4, 2048) == "sampled"
    # 10^8 entries, too many to build, but halves of 10^4 rows beside 10^5 observations
    assert choose_completion_method([10] * 8, 100_000) == "sampled"
    # ... but not past its unchunked memory: halves of 2e5 rows, or over 2^22 observations
    assert choose_completion_method([10] * 10, 100_000, dense_max=10**12) == "gather"
    assert choose_completion_method([8192, 8192], 2**22) == "sampled"
    assert choose_completion_method([8192, 8192], 2**22 + 1) == "gather"
    assert isinstance(completion_engine(dims4, idx, y, method="sampled"), SampledCompletion)
    # 10^7 entries, 50 observations: gathering is cheaper
    big = _random_idx([10] * 7, 50, 1)
    assert choose_completion_method([10] * 7, 50) == "gather"
    assert isinstance(completion_engine([10] * 7, big, y[:50], method="auto"), GatherCompletion)
    # 10^8 entries: above dense_max whatever m is
    huge = _random_idx([10] * 8, 50, 2)
    assert choose_completion_method([10] * 8, 10**9) == "gather"
    assert isinstance(completion_engine([10] * 8, huge, y[:50]), GatherCompletion)
    # explicit methods; gather keyword arguments reach the engine
    assert isinstance(completion_engine(dims4, idx, y, method="dense"), DenseCompletion)
    eng = completion_engine(dims4, idx, y, method="gather", table_max=10, chunk=7)
    assert isinstance(eng, GatherCompletion)
    assert eng.groups == [[0], [1], [2], [3]] and eng.chunk == 7
    with pytest.raises(ValueError, match="unknown completion method"):
        completion_engine(dims4, idx, y, method="sparse")


@settings(max_examples=40)
@given(problems(max_dim=9, max_m=400), st.sampled_from(["l2", "huber"]))
def test_sampled_products_equal_the_dense_step(problem, loss_kind):
    """The sampled engine is the dense engine computed at the observed entries only:
    same loss, gradients and predictions (repeated and unobserved rows included),
    in float64 and float32 (to that dtype's rounding)."""
    dims, rank, batch, m, seed = problem
    if len(dims) < 2:
        dims = [*dims, 3]
    f = random_factors(dims, rank, batch, seed)
    idx, _ = random_entries(dims, m, seed)
    idx = torch.cat([idx, idx[: max(1, m // 4)]])  # repeated observations accumulate
    y = torch.randn(idx.shape[0], dtype=torch.float64, generator=_gen(seed + 1))
    dense, sampled = DenseCompletion(dims, idx, y), SampledCompletion(dims, idx, y)
    loss = pick_loss(loss_kind, dense.predict(f) - y)
    ref_val, ref_grads = dense.loss_and_grad(f, loss)
    assert_matches(*sampled.loss_and_grad(f, loss), ref_val, ref_grads)
    assert torch.allclose(sampled.predict(f), dense.predict(f), rtol=1e-10, atol=1e-12)
    f32, y32 = [x.float() for x in f], y.float()
    val, grads = SampledCompletion(dims, idx, y32).loss_and_grad(f32, loss)
    assert val.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    scale = max(float(g.abs().max()) for g in ref_grads) + 1e-30
    for a, b in zip(grads, ref_grads):
        assert float((a.double() - b).abs().max()) <= 1e-4 * scale


def test_sampled_engine_refuses_order_one_and_other_devices():
    idx = torch.tensor([[0], [2]])
    with pytest.raises(ValueError, match="order >= 2"):
        SampledCompletion([4], idx, torch.zeros(2))
    with pytest.raises(ValueError, match="unknown completion method"):
        completion_engine([3, 3], torch.tensor([[0, 1]]), torch.zeros(1), method="sparse")
    with pytest.raises(ValueError, match="runs on the CPU but y is on meta"):
        SampledCompletion([3, 3], idx.repeat(1, 2).to("meta"), torch.zeros(2, device="meta"))


@given(st.lists(st.integers(1, 6), min_size=1, max_size=5), st.integers(1, 30), st.integers(0, 99))
def test_linear_index_is_ravel_multi_index(dims, m, seed):
    idx = _random_idx(dims, m, seed)
    expect = np.ravel_multi_index(tuple(idx.numpy().T), dims)
    got = linear_index(idx, dims)
    assert got.dtype == torch.int64
    assert np.array_equal(got.numpy(), expect)


def test_linear_index_beyond_32_bits():
    dims = [10] * 12  # 10^12 entries
    idx = _random_idx(dims, 100, 5).to(torch.int32)
    expect = np.ravel_multi_index(tuple(idx.numpy().astype(np.int64).T), dims)
    assert np.array_equal(linear_index(idx, dims).numpy(), expect)
    assert int(linear_index(torch.full((1, 12), 9), dims)) == 10**12 - 1


@given(st.lists(st.integers(1, 12), min_size=1, max_size=8), st.integers(1, 200))
def test_group_modes_partitions_consecutive_modes(dims, table_max):
    groups = group_modes(dims, table_max)
    assert all(groups)
    assert [n for g in groups for n in g] == list(range(len(dims)))  # consecutive, in order
    for g in groups:
        size = math.prod(dims[n] for n in g)
        assert size <= table_max or len(g) == 1  # a lone mode may exceed table_max
    for a, b in zip(groups, groups[1:]):  # greedy: the next mode did not fit
        assert math.prod(dims[n] for n in a) * dims[b[0]] > table_max


@pytest.mark.parametrize(
    "dims, table_max, groups",
    [
        ([10, 10, 10, 10], 1024, [[0, 1, 2], [3]]),
        ([10, 10, 10, 10], 100, [[0, 1], [2, 3]]),
        ([10, 10, 10, 10], 5, [[0], [1], [2], [3]]),
        ([2, 50, 3], 10, [[0], [1], [2]]),
        ([1, 1, 7, 1], 1, [[0, 1], [2], [3]]),
        ([6], 1, [[0]]),
    ],
)
def test_group_modes_examples(dims, table_max, groups):
    assert group_modes(dims, table_max) == groups


def test_sampled_steps_do_not_depend_on_the_thread_count():
    """The README's claim: the sampled step's sums have a fixed order, so a run of the
    Figure 3 size gives the same bits on one thread and on two."""
    from implreg.factorizations.cp import cp_init
    from implreg.optim import AdaptiveGD

    dims = [10, 10, 10, 10]
    idx = _random_idx(dims, 2000, 5)
    y = torch.randn(2000, generator=_gen(6))
    engine = SampledCompletion(dims, idx, y)
    before = torch.get_num_threads()
    ends = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            f = cp_init(dims, 1000, stds=[0.05, 0.005], generator=_gen(7))
            opt, active = AdaptiveGD(0.01, eps=1e-6), torch.ones(2, dtype=torch.bool)
            for _ in range(30):
                opt.step(f, engine.loss_and_grad(f, L2Loss())[1], active)
            ends.append(f)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*ends))
