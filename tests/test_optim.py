"""Optimizers against slow obvious references; stop rules."""

from __future__ import annotations

import io
import math

import pytest
import torch

from implreg.optim import GD, Adam, AdaptiveGD, StopRule, make_optimizer, squared_norms

SHAPES = [(3, 4), (2, 4), (5,)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _params(batch: int, seed: int = 0) -> list[torch.Tensor]:
    g = _gen(seed)
    return [torch.randn(batch, *s, dtype=torch.float64, generator=g) for s in SHAPES]


def _grads(step: int, batch: int) -> list[torch.Tensor]:
    """A gradient sequence whose scale changes over steps (exercises the adaptive step)."""
    g = _gen(100 + step)
    scale = 10.0 ** (-(step % 4))
    return [torch.randn(batch, *s, dtype=torch.float64, generator=g) * scale for s in SHAPES]


# ---------------------------------------------------------------- AdaptiveGD


def test_adaptive_gd_is_the_reference_formula_per_run():
    """REFERENCE: v_t = 0.99 v + 0.01 ||g||^2 (all grads), v_hat = v / (1 - 0.99^t),
    step lr / (sqrt(v_hat) + eps); a run is inactive at some steps and must not move then."""
    lr, beta, eps, batch = 0.01, 0.99, 1e-6, 3
    params = _params(batch)
    start = [p.clone() for p in params]
    opt = AdaptiveGD(lr, beta=beta, eps=eps)
    masks = [[c == "1" for c in s] for s in "111 101 101 111 101 101 111 101".split()]
    ref = [[p[b].clone() for p in params] for b in range(batch)]
    v, t = [0.0] * batch, [0] * batch
    for step, mask in enumerate(masks):
        grads = _grads(step, batch)
        before = [p.clone() for p in params]
        opt.step(params, grads, torch.tensor(mask))
        for b in range(batch):
            if not mask[b]:
                for p, q in zip(params, before):  # inactive: bit-identical, state frozen
                    assert torch.equal(p[b], q[b])
                continue
            sq = sum(float(x) ** 2 for g in grads for x in g[b].reshape(-1))
            t[b] += 1
            v[b] = beta * v[b] + (1 - beta) * sq
            v_hat = v[b] / (1 - beta ** t[b])
            eta = lr / (math.sqrt(v_hat) + eps)
            ref[b] = [x - eta * g[b] for x, g in zip(ref[b], grads)]
        assert opt.t == t
        assert opt.v == pytest.approx(v, rel=1e-12, abs=0)
    for b in range(batch):
        for p, r in zip(params, ref[b]):
            assert torch.allclose(p[b], r, rtol=1e-12, atol=1e-15)
    assert t == [8, 3, 8]
    assert all(not torch.equal(p, s) for p, s in zip(params, start))


def test_adaptive_gd_never_active_run_does_not_move_and_keeps_zero_state():
    params = _params(3, seed=1)
    start = [p.clone() for p in params]
    opt = AdaptiveGD(0.05)
    for step in range(5):
        opt.step(params, _grads(step, 3), torch.tensor([True, True, False]))
    assert all(torch.equal(p[2], s[2]) for p, s in zip(params, start))
    assert opt.t[2] == 0 and opt.v[2] == 0.0
    assert opt.t[:2] == [5, 5] and all(x > 0 for x in opt.v[:2])


def test_adaptive_gd_inactive_run_with_a_non_finite_gradient_stays_put():
    """A diverged run (non-finite gradient) that is masked out must keep its parameters."""
    params = _params(3, seed=2)
    start = [p.clone() for p in params]
    grads = _grads(0, 3)
    grads[0][1, 0, 0] = math.nan
    grads[1][1, 1, 1] = math.inf
    AdaptiveGD(0.01).step(params, grads, torch.tensor([True, False, True]))
    for p, s in zip(params, start):
        assert torch.equal(p[1], s[1])
        assert torch.isfinite(p).all()


def test_adaptive_gd_single_run_and_tiny_gradients():
    """B = 1 path; with tiny gradients eps dominates and the step is about lr / eps."""
    opt = AdaptiveGD(0.01, eps=1e-6)
    p = [torch.zeros(1, 4, dtype=torch.float64)]
    g = [torch.full((1, 4), 1e-12, dtype=torch.float64)]
    opt.step(p, g, torch.tensor([True]))
    eta = 0.01 / (math.sqrt(0.01 * 4e-24 / 0.01) + 1e-6)
    assert torch.allclose(p[0], -eta * g[0], rtol=1e-12, atol=0)
    opt.step(p, g, torch.tensor([False]))
    assert torch.allclose(p[0], -eta * g[0], rtol=1e-12, atol=0) and opt.t == [1]


# ---------------------------------------------------------------- Adam, GD


@pytest.mark.parametrize("lr, betas, eps", [(1e-2, (0.9, 0.999), 1e-8), (3e-3, (0.8, 0.99), 1e-6)])
def test_adam_matches_torch_optim_adam(lr, betas, eps):
    start = _params(1, seed=3)
    ours = [p.clone() for p in start]
    theirs = [p[0].clone().requires_grad_() for p in start]
    opt = Adam(lr, betas=betas, eps=eps)
    ref = torch.optim.Adam(theirs, lr=lr, betas=betas, eps=eps)
    for step in range(12):
        grads = _grads(step, 1)
        opt.step(ours, grads, torch.tensor([True]))
        for x, g in zip(theirs, grads):
            x.grad = g[0].clone()
        ref.step()
    for a, b in zip(ours, theirs):
        assert torch.allclose(a[0], b.detach(), rtol=1e-10, atol=1e-13)
    assert not torch.allclose(ours[0], start[0])


def test_adam_runs_are_independent_and_inactive_runs_do_not_move():
    """Batched Adam equals one Adam per run; an inactive run keeps its parameters."""
    batch, lr = 3, 1e-2
    params = _params(batch, seed=4)
    start = [p.clone() for p in params]
    opt = Adam(lr)
    singles = [Adam(lr) for _ in range(batch)]
    single_params = [[p[b : b + 1].clone() for p in params] for b in range(batch)]
    mask = [True, False, True]
    for step in range(6):
        grads = _grads(step, batch)
        opt.step(params, grads, torch.tensor(mask))
        for b in range(batch):
            if mask[b]:
                singles[b].step(
                    single_params[b], [g[b : b + 1] for g in grads], torch.tensor([True])
                )
    for b in range(batch):
        for p, q in zip(params, single_params[b]):
            assert torch.allclose(p[b : b + 1], q, rtol=1e-12, atol=1e-15)
    assert all(torch.equal(p[1], s[1]) for p, s in zip(params, start))
    assert opt.t.tolist() == [6.0, 0.0, 6.0]


def test_adam_inactive_run_state_does_not_advance():
    """Like AdaptiveGD, a masked-out run keeps its optimizer state (moments as well as t)."""
    params = _params(2, seed=5)
    opt = Adam(1e-2)
    opt.step(params, _grads(0, 2), torch.tensor([True, True]))
    m_before = [x[1].clone() for x in opt.m]
    v_before = [x[1].clone() for x in opt.v]
    opt.step(params, _grads(1, 2), torch.tensor([True, False]))
    assert opt.t.tolist() == [2.0, 1.0]
    assert all(torch.equal(x[1], y) for x, y in zip(opt.m, m_before))
    assert all(torch.equal(x[1], y) for x, y in zip(opt.v, v_before))


def test_gd_is_plain_gradient_descent_with_inactive_runs():
    params = _params(3, seed=6)
    start = [p.clone() for p in params]
    grads = _grads(0, 3)
    grads[0][1, 0, 0] = math.nan  # a masked-out diverged run
    GD(0.5).step(params, grads, torch.tensor([True, False, True]))
    for p, s, g in zip(params, start, grads):
        for b in (0, 2):
            assert torch.allclose(p[b], s[b] - 0.5 * g[b], rtol=1e-15, atol=0)
        assert torch.equal(p[1], s[1])
    GD(0.5).step(params, _grads(1, 3), torch.tensor([True, True, True]))
    assert torch.allclose(params[0][1], start[0][1] - 0.5 * _grads(1, 3)[0][1])


# ---------------------------------------------------------------- state, compaction


def _serialize(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf)


@pytest.mark.parametrize("name", ["adaptive", "adam", "gd"])
@pytest.mark.parametrize("through_disk", [False, True])
def test_state_round_trip_continues_bit_identically(name, through_disk):
    a, b = make_optimizer(name, lr=1e-2), make_optimizer(name, lr=1e-2)
    pa = _params(2, seed=7)
    pb = [x.clone() for x in pa]
    act = torch.tensor([True, True])
    for step in range(3):
        a.step(pa, _grads(step, 2), act)
        b.step(pb, _grads(step, 2), act)
    state = b.state_dict()
    c = make_optimizer(name, lr=1e-2)
    c.load_state_dict(_serialize(state) if through_disk else state)
    for step in range(3, 7):
        a.step(pa, _grads(step, 2), act)
        c.step(pb, _grads(step, 2), act)
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))


@pytest.mark.parametrize("name", ["adaptive", "adam", "gd"])
def test_state_dict_is_a_snapshot(name):
    """A saved state resumes from where it was taken even if the optimizer went on stepping."""
    a = make_optimizer(name, lr=1e-2)
    pa = _params(2, seed=8)
    act = torch.tensor([True, True])
    for step in range(3):
        a.step(pa, _grads(step, 2), act)
    state, saved_params = a.state_dict(), [x.clone() for x in pa]
    for step in range(3, 7):
        a.step(pa, _grads(step, 2), act)
    c = make_optimizer(name, lr=1e-2)
    c.load_state_dict(state)
    for step in range(3, 7):
        c.step(saved_params, _grads(step, 2), act)
    assert all(torch.equal(x, y) for x, y in zip(pa, saved_params))


@pytest.mark.parametrize("name", ["adaptive", "adam", "gd"])
def test_compact_keeps_the_state_of_the_remaining_runs(name):
    full = make_optimizer(name, lr=1e-2)
    pf = _params(3, seed=9)
    on = torch.tensor([True, True, True])
    for step in range(3):
        full.step(pf, _grads(step, 3), on)
    part = make_optimizer(name, lr=1e-2)
    part.load_state_dict(full.state_dict())
    part.compact([2, 0])
    pp = [x[[2, 0]].clone() for x in pf]
    for step in range(3, 6):
        g = _grads(step, 3)
        full.step(pf, g, on)
        part.step(pp, [x[[2, 0]] for x in g], torch.tensor([True, True]))
    for x, y in zip(pf, pp):
        assert torch.allclose(x[[2, 0]], y, rtol=1e-13, atol=0)


def test_make_optimizer():
    adaptive = make_optimizer("adaptive", lr=0.3, eps=1e-4, beta=0.9)
    assert isinstance(adaptive, AdaptiveGD)
    assert (adaptive.lr, adaptive.eps, adaptive.beta) == (0.3, 1e-4, 0.9)
    assert make_optimizer("adaptive", lr=0.3).eps == 1e-6
    assert isinstance(make_optimizer("gd", lr=0.3), GD)
    adam = make_optimizer("adam", lr=0.3)
    assert isinstance(adam, Adam) and adam.eps == 1e-8


def test_make_optimizer_errors():
    for name in ("sgd", "Adam", ""):
        with pytest.raises(ValueError, match="unknown optimizer"):
            make_optimizer(name, lr=0.1)
    for lr in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="lr must be"):
            make_optimizer("gd", lr=lr)


# ---------------------------------------------------------------- StopRule


def test_stop_rule_converges_after_patience_checks_and_a_check_above_tol_resets():
    rule = StopRule(tol=1e-3, patience=3, check_every=5, max_iterations=1000)
    st = rule.init_state(2)
    for t in range(0, 60):
        # run 0: below tol except at iteration 10 (a check: resets) and 12 (not a check)
        loss0 = 1.0 if t in (10, 12) else 1e-4
        rule.update(st, t, [loss0, 1e-4])
        if t == 5:
            assert st["streak"] == [2, 2] and st["status"] == ["running", "running"]
        if t == 10:
            assert st["streak"] == [0, 3]
    # run 1: checks 0, 5, 10 -> converged at 10; run 0: 15, 20, 25 after the reset
    assert st["status"] == ["converged", "converged"]
    assert st["stopped_at"] == [25, 10]


def test_stop_rule_needs_values_strictly_below_tol():
    rule = StopRule(tol=1e-3, patience=1, check_every=1, max_iterations=100)
    st = rule.init_state(1)
    rule.update(st, 0, [1e-3])
    assert st["status"] == ["running"]
    rule.update(st, 1, [0.999e-3])
    assert st["status"] == ["converged"] and st["stopped_at"] == [1]


def test_stop_rule_max_iterations():
    rule = StopRule(tol=1e-8, patience=2, check_every=5, max_iterations=40)
    st = rule.init_state(2)
    for t in range(0, 40):
        rule.update(st, t, [1.0, 1.0])
    assert st["status"] == ["running", "running"]
    rule.update(st, 40, [1.0, 1.0])
    assert st["status"] == ["max_iterations", "max_iterations"]
    assert st["stopped_at"] == [40, 40]
    rule.update(st, 41, [math.nan, 1e-12])  # stopped runs are left alone
    assert st["status"] == ["max_iterations", "max_iterations"]


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_stop_rule_non_finite_loss_diverges_at_once(bad):
    rule = StopRule(tol=1e-3, patience=3, check_every=5, max_iterations=100)
    st = rule.init_state(3)
    assert rule.update(st, 6, [1.0, 1.0, 1.0]) == []
    msgs = rule.update(st, 7, [1.0, bad, 1.0])  # 7 is not a check iteration
    assert len(msgs) == 1 and msgs[0][0] == 1
    assert "iteration 7" in msgs[0][1] and str(bad) in msgs[0][1]
    assert st["status"] == ["running", "diverged", "running"]
    assert st["stopped_at"] == [None, 7, None]
    assert rule.update(st, 8, [1.0, bad, 1.0]) == []  # reported once


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_squared_norms_is_the_sum_of_squares_per_run(dtype):
    """The compiled CPU pass against the definition in float64, on contiguous and
    transposed (non-contiguous) gradients of several shapes, with zeros and one run."""
    g = torch.Generator().manual_seed(0)
    for batch in (1, 3):
        grads = [
            torch.randn(batch, 4, 7, generator=g, dtype=dtype),
            torch.randn(batch, 5, 3, generator=g, dtype=dtype).transpose(1, 2),
            torch.zeros(batch, 2, dtype=dtype),
        ]
        got = squared_norms(grads)
        want = sum((x.double() ** 2).reshape(batch, -1).sum(1) for x in grads)
        assert got.dtype == torch.float64 and got.shape == (batch,)
        assert torch.allclose(got, want, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="at least one"):
        squared_norms([])
