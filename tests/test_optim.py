"""Optimizers against slow obvious references; stop rules."""

from __future__ import annotations

import math

import pytest
import torch

from implreg.optim import GD, Adam, AdaptiveGD, StopRule, make_optimizer


def _grads(step: int, batch: int):
    g = torch.Generator().manual_seed(100 + step)
    return [
        torch.randn(batch, 3, 4, generator=g, dtype=torch.float64) * 10.0**-step,
        torch.randn(batch, 2, 4, generator=g, dtype=torch.float64) * 10.0**-step,
    ]


def test_adaptive_gd_is_the_reference_formula_per_run():
    lr, beta, eps = 0.01, 0.99, 1e-6
    params = [torch.zeros(3, 3, 4, dtype=torch.float64), torch.zeros(3, 2, 4, dtype=torch.float64)]
    opt = AdaptiveGD(lr, beta=beta, eps=eps)
    active = torch.tensor([True, False, True])
    ref = [[p[b].clone() for p in params] for b in range(3)]
    v = [0.0] * 3
    t = [0] * 3
    for step in range(6):
        grads = _grads(step, 3)
        opt.step(params, grads, active)
        for b in range(3):
            if not active[b]:
                continue
            flat = torch.cat([g[b].reshape(-1) for g in grads])
            t[b] += 1
            v[b] = beta * v[b] + (1 - beta) * float(flat @ flat)
            eta = lr / (math.sqrt(v[b] / (1 - beta ** t[b])) + eps)
            ref[b] = [x - eta * g[b] for x, g in zip(ref[b], grads)]
    for b in range(3):
        for p, r in zip(params, ref[b]):
            assert torch.allclose(p[b], r, rtol=1e-12, atol=0)
    assert all(torch.equal(p[1], torch.zeros_like(p[1])) for p in params)  # frozen run
    assert opt.t == [6, 0, 6]


def test_adaptive_gd_early_steps_are_plain_gd_with_lr_over_eps():
    """With tiny gradients eps dominates: the step is lr/eps (REFERENCE §1)."""
    opt = AdaptiveGD(0.01, eps=1e-6)
    p = [torch.zeros(1, 4, dtype=torch.float64)]
    g = [torch.full((1, 4), 1e-12, dtype=torch.float64)]
    opt.step(p, g, torch.tensor([True]))
    assert torch.allclose(p[0], -g[0] * 0.01 / (1e-6 + 1e-12 * 2), rtol=1e-6)


def test_adam_matches_torch_optim_adam():
    torch.manual_seed(0)
    start = torch.randn(1, 3, 4, dtype=torch.float64)
    ours = [start.clone()]
    theirs = start[0].clone().requires_grad_()
    opt = Adam(1e-2, betas=(0.9, 0.999), eps=1e-8)
    ref = torch.optim.Adam([theirs], lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    for step in range(10):
        g = _grads(step % 3, 1)[0]
        opt.step(ours, [g], torch.tensor([True]))
        theirs.grad = g[0].clone()
        ref.step()
    assert torch.allclose(ours[0][0], theirs.detach(), rtol=1e-10, atol=1e-12)


def test_gd_and_inactive_runs():
    p = [torch.ones(2, 3, dtype=torch.float64)]
    GD(0.5).step(p, [torch.ones(2, 3, dtype=torch.float64)], torch.tensor([True, False]))
    assert torch.allclose(p[0][0], torch.full((3,), 0.5, dtype=torch.float64))
    assert torch.equal(p[0][1], torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("name", ["adaptive", "adam", "gd"])
def test_state_round_trip_continues_bit_identically(name):
    def make():
        return make_optimizer(name, lr=1e-2)

    a, b = make(), make()
    pa = [torch.zeros(2, 3, 4, dtype=torch.float64), torch.zeros(2, 2, 4, dtype=torch.float64)]
    pb = [x.clone() for x in pa]
    act = torch.tensor([True, True])
    for step in range(3):
        a.step(pa, _grads(step, 2), act)
        b.step(pb, _grads(step, 2), act)
    c = make()
    c.load_state_dict(b.state_dict())
    for step in range(3, 6):
        a.step(pa, _grads(step, 2), act)
        c.step(pb, _grads(step, 2), act)
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))


@pytest.mark.parametrize("name", ["adaptive", "adam"])
def test_compact_keeps_the_state_of_the_remaining_runs(name):
    full = make_optimizer(name, lr=1e-2)
    pf = [torch.zeros(3, 4, dtype=torch.float64)]
    for step in range(3):
        full.step(pf, [_grads(step, 3)[0][:, 0, :]], torch.tensor([True, True, True]))
    solo = make_optimizer(name, lr=1e-2)
    solo.load_state_dict(full.state_dict())
    solo.compact([2])
    ps = [pf[0][2:].clone()]
    for step in range(3, 5):
        g = _grads(step, 3)[0][:, 0, :]
        full.step(pf, [g], torch.tensor([True, True, True]))
        solo.step(ps, [g[2:]], torch.tensor([True]))
    assert torch.allclose(ps[0][0], pf[0][2], rtol=1e-12)


def test_make_optimizer_errors():
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("sgd", lr=0.1)
    for lr in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="lr must be"):
            make_optimizer("gd", lr=lr)


def test_stop_rule_patience_reset_cap_and_divergence():
    rule = StopRule(tol=1e-3, patience=3, check_every=5, max_iterations=100)
    st = rule.init_state(3)
    for t in range(0, 60):
        loss = [1e-4 if not (t == 10) else 1.0, 1.0, math.inf if t == 7 else 1.0]
        msgs = rule.update(st, t, loss)
        if t == 7:
            assert msgs == [(2, "the loss became inf at iteration 7; run stopped")]
    # run 0: below tol at checks 0, 5; check 10 resets; 15, 20, 25 -> converged at 25
    assert st["status"][0] == "converged" and st["stopped_at"][0] == 25
    assert st["status"][1] == "running"
    assert st["status"][2] == "diverged" and st["stopped_at"][2] == 7
    for t in range(60, 101):
        rule.update(st, t, [1.0, 1.0, 1.0])
    assert st["status"][1] == "max_iterations" and st["stopped_at"][1] == 100
