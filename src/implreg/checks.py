"""The papers' lemmas and theorems checked numerically along real gradient-flow trajectories.

Each check draws a small random instance, integrates its gradient flow with
torchdiffeq (Dormand-Prince 5(4), float64, ``rtol = 1e-9``, ``atol = 1e-12``
unless said) through the part of the trajectory where the dynamics happen, and
measures at every sample time how far the statement is from holding:

``lemma1-cp``
    Razin, Yadin & Cohen (ICML 2021), Lemma 1: ``||w_r^n||^2 - ||w_r^n'||^2``
    is constant for every component ``r``.  Measured: the largest drift over
    the trajectory, relative to the largest squared factor norm.
``theorem1-cp``
    Theorem 1 there: with ``eps`` the unbalancedness at init and
    ``gamma_r = <-grad L(W_e), (x)_n w_r^n / ||w_r^n||>``,
    ``N gamma sigma^2 / (sigma^{2/N} + eps) <= d sigma/dt <= N gamma (sigma^{2/N} + eps)^{N-1}``
    (reversed when ``gamma < 0``).  ``d sigma / dt`` is measured by central
    differences of the integrated trajectory, ``gamma`` from the gradient of
    the loss with respect to the end tensor (autograd on the dense tensor, a
    path independent of the factor gradients the flow uses).  Measured: the
    largest violation relative to the rate.
``corollary1-cp``
    Corollary 1 (``eps = 0``, a balanced init): ``d sigma/dt = N gamma sigma^{2-2/N}``.
    Measured: the largest relative difference.
``theorem2-cp``
    Theorem 2 there: under the Huber loss, from a balanced init of scale ``alpha``
    whose leading component (largest ``gamma`` at the origin) is unique, the
    trajectory follows the balanced rank-one trajectory emanating from the
    origin, and ever more closely as ``alpha -> 0``.  Measured: with both
    trajectories aligned at the time their end tensor's norm crosses 0.3
    ``||W*||``, the largest distance ``||W_e - W_bar|| / ||W*||`` over a window of
    -3 ... 10 local time scales around it, for ``alpha`` from 0.1 down to 1e-4
    (the rank-one reference from 1e-6); it must shrink monotonically and end
    below 0.05.
``theorem3-mf``
    Arora, Cohen, Hu & Luo (NeurIPS 2019), Theorem 3, from a balanced init
    (``W_1 = S^{1/N} V^T``, middle layers ``S^{1/N}``, ``W_N = U S^{1/N}``):
    ``d sigma_r/dt = -N (sigma_r^2)^{1-1/N} <grad l(W), u_r v_r^T>``.
``htf-corollary``
    The same with every local factorization balanced at init (a Sinkhorn
    scaling of each node's matrix to its row and column norms at once): each
    local component norm moves as ``d sigma/dt = K gamma sigma^{2-2/K}``, K = 3.
``htf-local``
    Razin, Maman & Cohen (ICML 2022): the local factorizations of a hierarchical
    tensor factorization behave as CP factorizations with ``K = 3`` factors
    (two children's columns and the node's row): the differences of their
    squared norms are conserved, and the local component norms obey the
    Theorem 1 bounds with ``N = K = 3`` (``d sigma/dt ~ sigma^{2-2/3}``).

Tolerances.  Conservation (Lemma 1) is held to ``1e-8`` relative: the
integrator's local error per step is below ``rtol = 1e-9`` of the state, and
the conserved quantities are quadratic in it.  Rates are measured by central
differences with step ``h = 1e-3`` of the fastest component's time scale
``sigma / |d sigma/dt|``: truncation ``~ (1e-3)^2`` and the integration error
``rtol / 1e-3 = 1e-6`` relative, so rate identities and bounds are held to
``1e-4`` relative.  A check fails when its measured error exceeds its tolerance.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

Tensor = torch.Tensor
RTOL, ATOL = 1e-9, 1e-12
CONSERVATION_TOL = 1e-8
RATE_TOL = 1e-4
# The central differences' step, as a fraction of the fastest time scale: their
# truncation error falls as its square and dominated at 1e-3 (htf-corollary, seeds 0-5:
# up to 1.9e-4, over the tolerance; 1.7e-5 at 3e-4; at most 1.9e-6 at 1e-4, where every
# identity check of seeds 0-5 stays 50x under 1e-4).
FD_FRACTION = 1e-4
# A rate identity's error is relative to the component's own rate, but never to less than
# this fraction of the fastest kept rate: at a rate's zero crossing the component-wise
# relative error is ill-conditioned (seen: htf-corollary, seed 1, t = 144: a rate of
# 1.45e-7 beside a fastest 1.7e-3, central-difference error 3.6e-10, ratio 2.5e-3).
RATE_FLOOR = 1e-2


@dataclass
class CheckResult:
    """One row of the theorem-check table."""

    name: str
    statement: str
    source: str
    measured: float
    tolerance: float
    samples: int
    seconds: float = 0.0
    detail: str = ""
    table: list = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(math.isfinite(self.measured) and self.measured <= self.tolerance)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "statement": self.statement,
            "source": self.source,
            "measured": self.measured,
            "tolerance": self.tolerance,
            "passed": self.passed,
            "samples": self.samples,
            "seconds": self.seconds,
            "detail": self.detail,
            "table": self.table,
        }


class _Flow:
    """The flattened gradient flow of one run (batch 1) of a ``loss_and_grad``."""

    def __init__(self, params: Sequence[Tensor], loss_and_grad):
        self.shapes = [tuple(p.shape) for p in params]
        self.sizes = [p.numel() for p in params]
        self.loss_and_grad = loss_and_grad
        self.y0 = torch.cat([p.reshape(-1) for p in params]).double()

    def split(self, y: Tensor) -> list[Tensor]:
        out, i = [], 0
        for shape, size in zip(self.shapes, self.sizes):
            out.append(y[i : i + size].view(shape))
            i += size
        return out

    def field(self, t, y):  # noqa: ARG002
        _, grads = self.loss_and_grad(self.split(y))
        return -torch.cat([g.reshape(-1) for g in grads])

    def solve(self, y0: Tensor, times: Sequence[float]) -> Tensor:
        from torchdiffeq import odeint

        return odeint(
            self.field, y0, torch.as_tensor(times, dtype=torch.float64), rtol=RTOL, atol=ATOL
        )

    def loss(self, y: Tensor) -> float:
        return float(self.loss_and_grad(self.split(y))[0].reshape(-1)[0])


def _trajectory(flow: _Flow, t_end: float, samples: int) -> tuple[np.ndarray, Tensor]:
    """States at ``samples`` log-spaced times in ``[t_end / 1e4, t_end]`` (and t = 0)."""
    times = np.concatenate([[0.0], np.geomspace(t_end * 1e-4, t_end, samples)])
    return times, flow.solve(flow.y0, times)


def _rates(flow: _Flow, y: Tensor, norms: Callable[[list[Tensor]], Tensor], scale: float) -> Tensor:
    """``d/dt`` of ``norms(params)`` at state ``y`` by central differences of the flow, with
    step ``scale``: the flow from ``y`` over ``[-h, h]`` integrated both ways."""
    back = flow.solve(y, [0.0, -scale])[-1]
    ahead = flow.solve(y, [0.0, scale])[-1]
    return (norms(flow.split(ahead)) - norms(flow.split(back))) / (2 * scale)


def _rate_error(rate: Tensor, formula: Tensor, keep: Tensor) -> float:
    """Largest ``|rate - formula|`` over the kept components, each relative to its own
    ``|formula|`` or ``RATE_FLOOR`` times the fastest kept one, whichever is larger."""
    if not bool(keep.any()):
        return 0.0
    scale = formula.abs().clamp_min(RATE_FLOOR * float(formula[keep].abs().max()))
    return float(((rate - formula).abs() / scale.clamp_min(1e-300))[keep].max())


def _time_scale(sigma: Tensor, rate: Tensor, keep: Tensor, t: float) -> float:
    """``FD_FRACTION`` times the shortest ``sigma / |rate|`` among the kept components, and at
    most ``FD_FRACTION t`` (near convergence the rates vanish; the flow backwards from a
    minimum is unstable over long spans)."""
    tau = float((sigma[keep] / rate[keep].abs().clamp_min(1e-300)).min())
    return FD_FRACTION * min(tau, t)


def _bounds_violation(
    rate: Tensor, gamma: Tensor, sigma: Tensor, order: int, eps: float, keep: Tensor
) -> float:
    """Largest violation of Theorem 1's bounds, relative to ``|rate|`` (0 when they hold)."""
    k = order
    lower = k * gamma * sigma**2 / (sigma ** (2 / k) + eps)
    upper = k * gamma * (sigma ** (2 / k) + eps) ** (k - 1)
    lo = torch.minimum(lower, upper)  # gamma < 0 reverses them
    hi = torch.maximum(lower, upper)
    excess = torch.clamp(lo - rate, min=0) + torch.clamp(rate - hi, min=0)
    ref = torch.maximum(rate.abs(), hi.abs())
    return float((excess[keep] / ref[keep]).max()) if bool(keep.any()) else 0.0


# ------------------------------------------------------------------------------------ CP


def _cp_instance(balanced: bool, seed: int, spread: float = 0.0):
    from implreg.factorizations.cp import cp_init
    from implreg.factorizations.cp_engine import completion_engine
    from implreg.losses import make_loss
    from implreg.problems.synthetic import completion_problem, low_cp_rank_tensor

    gen = torch.Generator().manual_seed(seed)
    dims = (5, 4, 6)
    truth = low_cp_rank_tensor(dims, 2, norm=1.0, generator=gen)
    prob = completion_problem(truth, 50, generator=gen)
    y = prob.y.double()
    engine = completion_engine(dims, prob.idx, y, method="dense")
    loss = make_loss("l2")
    factors = cp_init(dims, 5, stds=(0.25,), generator=gen, dtype=torch.float64)
    if balanced:  # every factor of component r rescaled to the norm sigma_r^{1/N} (1 + spread u)
        norms = torch.stack([f.norm(dim=1) for f in factors])  # (N, 1, R)
        target = norms.prod(0) ** (1 / len(dims))
        wobble = 1 + spread * (2 * torch.rand(norms.shape, generator=gen, dtype=norms.dtype) - 1)
        factors = [
            f / n.unsqueeze(1) * (target * w).unsqueeze(1)
            for f, n, w in zip(factors, norms, wobble)
        ]
    idx = prob.idx

    def end_gradient(fs: list[Tensor]) -> Tensor:
        """grad of the loss (mean over observed entries of (W - y)^2) with respect to W_e."""
        from implreg.factorizations.cp import cp_to_tensor

        w = cp_to_tensor([f.detach() for f in fs])[0].requires_grad_(True)
        pred = w[tuple(idx.T)]
        ((pred - y) ** 2).mean().backward()
        return w.grad

    return factors, (lambda fs: engine.loss_and_grad(fs, loss)), end_gradient


def _cp_sigma(fs: list[Tensor]) -> Tensor:
    out = fs[0].norm(dim=1)
    for f in fs[1:]:
        out = out * f.norm(dim=1)
    return out[0]


def _cp_gamma(fs: list[Tensor], grad_end: Tensor) -> Tensor:
    """gamma_r = <-grad L(W_e), (x)_n w_r^n / ||w_r^n||> for every component r."""
    units = [(f[0] / f[0].norm(dim=0)) for f in fs]  # (d_n, R)
    letters = "abcdefgh"[: len(fs)]
    expr = ",".join(f"{c}r" for c in letters) + "," + letters + "->r"
    return -torch.einsum(expr, *units, grad_end)


def _cp_trajectory(balanced: bool, seed: int, samples: int, spread: float = 0.0):
    factors, loss_and_grad, end_gradient = _cp_instance(balanced, seed, spread)
    flow = _Flow(factors, loss_and_grad)
    return flow, end_gradient, _trajectory(flow, 400.0, samples)


def check_lemma1_cp(seed: int = 0, samples: int = 24) -> CheckResult:
    """Lemma 1 (ICML 2021): differences of squared CP factor norms are conserved."""
    start = time.perf_counter()
    flow, _, (times, states) = _cp_trajectory(False, seed, samples)

    def diffs(y):
        sq = torch.stack([f[0].pow(2).sum(0) for f in flow.split(y)])  # (N, R)
        return sq[1:] - sq[:1]

    d0 = diffs(states[0])
    drift, scale = 0.0, 1e-300
    for y in states:
        sq = torch.stack([f[0].pow(2).sum(0) for f in flow.split(y)])
        scale = max(scale, float(sq.max()))
        drift = max(drift, float((diffs(y) - d0).abs().max()))
    loss_end = flow.loss(states[-1])
    return CheckResult(
        "lemma1-cp",
        "||w_r^n||^2 - ||w_r^n'||^2 constant under gradient flow",
        "Razin, Yadin & Cohen 2021, Lemma 1",
        drift / scale,
        CONSERVATION_TOL,
        len(times),
        time.perf_counter() - start,
        f"order-3 CP, 5 components, 50 observed entries; t up to {times[-1]:g} "
        f"(loss {flow.loss(states[0]):.3g} -> {loss_end:.3g}); drift relative to the "
        f"largest squared factor norm {scale:.3g}",
    )


def _cp_rate_check(exact: bool, seed: int, samples: int, spread: float | None = None):
    """Corollary 1's identity (``exact``; a balanced init unless ``spread``) or Theorem 1's
    bounds (a nearly balanced init, factor norms spread by 5%, where the bounds are tight
    enough to be tested)."""
    spread = (0.0 if exact else 0.05) if spread is None else spread
    flow, end_gradient, (times, states) = _cp_trajectory(True, seed, samples, spread)
    order = len(flow.shapes)
    fs0 = flow.split(states[0])
    sq0 = torch.stack([f[0].pow(2).sum(0) for f in fs0])
    eps = float((sq0.amax(0) - sq0.amin(0)).max())
    worst, n = 0.0, 0
    for t, y in zip(times[1:], states[1:]):
        fs = flow.split(y)
        sigma = _cp_sigma(fs)
        gamma = _cp_gamma(fs, end_gradient(fs))
        formula = order * gamma * sigma ** (2 - 2 / order)
        keep = sigma > 1e-3 * float(sigma.max())
        h = _time_scale(sigma, formula, keep, t)
        rate = _rates(flow, y, _cp_sigma, h)
        if exact:
            worst = max(worst, _rate_error(rate, formula, keep))
        else:
            worst = max(worst, _bounds_violation(rate, gamma, sigma, order, eps, keep))
        n += 1
    return worst, n, eps, times, flow.loss(states[0]), flow.loss(states[-1])


def check_theorem1_cp(seed: int = 0, samples: int = 12) -> CheckResult:
    """Theorem 1 (ICML 2021): the component-norm rate lies within its bounds."""
    start = time.perf_counter()
    worst, n, eps, times, l0, l1 = _cp_rate_check(False, seed, samples)
    return CheckResult(
        "theorem1-cp",
        "N g s^2/(s^(2/N)+eps) <= ds/dt <= N g (s^(2/N)+eps)^(N-1) (reversed for g < 0)",
        "Razin, Yadin & Cohen 2021, Theorem 1",
        worst,
        RATE_TOL,
        n,
        time.perf_counter() - start,
        f"nearly balanced init (factor norms spread 5%, eps = {eps:.3g}); ds/dt by central "
        "differences of the "
        f"flow, gamma from the end-tensor gradient; t up to {times[-1]:g}, loss {l0:.3g} -> "
        f"{l1:.3g}; measured: largest violation relative to the rate",
    )


def check_corollary1_cp(seed: int = 0, samples: int = 12, spread: float = 0.0) -> CheckResult:
    """Corollary 1 (ICML 2021): ds/dt = N gamma s^(2-2/N) from a balanced init."""
    start = time.perf_counter()
    worst, n, eps, times, l0, l1 = _cp_rate_check(True, seed, samples, spread)
    return CheckResult(
        "corollary1-cp",
        "ds/dt = N g s^(2-2/N) from a balanced init",
        "Razin, Yadin & Cohen 2021, Corollary 1",
        worst,
        RATE_TOL,
        n,
        time.perf_counter() - start,
        f"balanced init (eps = {eps:.1e}); t up to {times[-1]:g}, loss {l0:.3g} -> {l1:.3g}; "
        "measured: largest relative difference over components above 1e-3 of the largest",
    )


THEOREM2_ALPHAS = (0.1, 0.03, 0.01, 0.003, 0.001, 3e-4, 1e-4)
THEOREM2_TOL = 0.05


def check_theorem2_cp(seed: int = 0, alphas: Sequence[float] = THEOREM2_ALPHAS) -> CheckResult:
    """Theorem 2 (ICML 2021): from a small balanced init the flow follows a rank-one one."""
    from torchdiffeq import odeint, odeint_event

    from implreg.factorizations.cp import cp_to_tensor
    from implreg.factorizations.cp_engine import completion_engine
    from implreg.losses import make_loss
    from implreg.problems.synthetic import completion_problem, low_cp_rank_tensor

    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    dims, rank = (4, 4, 4), 4
    truth = low_cp_rank_tensor(dims, 2, norm=1.0, generator=gen)
    prob = completion_problem(truth, 30, generator=gen)
    y, idx = prob.y.double(), prob.idx
    engine = completion_engine(dims, idx, y, method="dense")
    loss = make_loss("huber", huber_delta=2 * float(y.abs().max()))
    w_norm = float(truth.dense().double().norm())
    units = [torch.randn(1, d, rank, generator=gen, dtype=torch.float64) for d in dims]
    units = [u / u.norm(dim=1, keepdim=True) for u in units]  # balanced: every norm alpha
    _, dval = loss.pointwise(-y)  # the loss's gradient at the origin (W_e = 0)
    grad0 = torch.zeros(dims, dtype=torch.float64)
    grad0.index_put_(tuple(idx.T), dval / len(y), accumulate=True)
    gamma = -torch.einsum("ar,br,cr,abc->r", units[0][0], units[1][0], units[2][0], grad0)
    lead = int(gamma.argmax())
    runner_up = float(gamma.sort(descending=True).values[1])
    rho = 0.3 * w_norm

    def crossing(factors):
        flow = _Flow(factors, lambda fs: engine.loss_and_grad(fs, loss))

        def end(yy):
            return cp_to_tensor(flow.split(yy))[0]

        t_cross, sol = odeint_event(
            flow.field,
            flow.y0,
            torch.tensor(0.0, dtype=torch.float64),
            event_fn=lambda t, yy: end(yy).norm() - rho,
            rtol=RTOL,
            atol=ATOL,
        )
        return flow, end, float(t_cross), sol[-1]

    ref, ref_end, t_ref, y_ref = crossing([u[:, :, lead : lead + 1] * 1e-6 for u in units])
    w_ref, w_dot = torch.autograd.functional.jvp(ref_end, y_ref, ref.field(0, y_ref))
    slope = float((w_ref * w_dot).sum() / w_ref.norm())  # d ||W_e|| / dt at the crossing
    tau = rho / slope  # the local time scale of the rise
    window = np.linspace(-3.0, 10.0, 27) * tau

    def states(flow, end, t_cross):
        times = np.concatenate([[0.0], t_cross + window])
        sol = odeint(flow.field, flow.y0, torch.as_tensor(times), rtol=RTOL, atol=ATOL)
        return [end(yy) for yy in sol[1:]]

    reference = states(ref, ref_end, t_ref)
    table = []
    for alpha in alphas:
        flow, end, t_cross, _ = crossing([u * alpha for u in units])
        got = states(flow, end, t_cross)
        dist = max(float((a - b).norm()) for a, b in zip(got, reference)) / w_norm
        table.append({"alpha": alpha, "distance": dist, "t_cross": t_cross})
    dists = [row["distance"] for row in table]
    monotone = all(b <= a * 1.05 for a, b in zip(dists, dists[1:]))
    measured = dists[-1] if monotone else float("inf")
    return CheckResult(
        "theorem2-cp",
        "from a balanced init of scale alpha the flow follows the balanced rank-one flow, "
        "closer as alpha -> 0",
        "Razin, Yadin & Cohen 2021, Theorem 2",
        measured,
        THEOREM2_TOL,
        len(table),
        time.perf_counter() - start,
        "order-3 CP, 4 components, Huber loss, 30 entries; leading gamma "
        f"{float(gamma[lead]):.3g} (next {runner_up:.3g}); distance over -3 ... 10 time "
        f"scales ({tau:.3g}) around the crossing of 0.3 ||W*||, per alpha: "
        + ", ".join(f"{r['alpha']:g}: {r['distance']:.3g}" for r in table)
        + ("" if monotone else " (NOT monotone)"),
        table,
    )


# ------------------------------------------------------------------------------------ MF


def check_theorem3_mf(seed: int = 0, samples: int = 12, depth: int = 3) -> CheckResult:
    """Theorem 3 (Arora et al. 2019): singular-value dynamics of deep MF."""
    from implreg.factorizations.matrix import MatrixCompletion, mf_product
    from implreg.losses import make_loss
    from implreg.problems.synthetic import low_rank_matrix, sample_indices

    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    n = 8
    truth = low_rank_matrix((n, n), 2, norm=float(n), generator=gen).double()
    idx = sample_indices([n, n], 30, generator=gen)
    rows, cols = idx[:, 0], idx[:, 1]
    y = truth[rows, cols]
    engine = MatrixCompletion((n, n), rows, cols, y)
    loss = make_loss("l2")
    a = 0.1 * torch.randn(n, n, generator=gen, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(a)
    root = torch.diag(s ** (1 / depth))
    layers = [root @ vh] + [root.clone() for _ in range(depth - 2)] + [u @ root]
    layers = [w.unsqueeze(0) for w in layers]
    flow = _Flow(layers, lambda ls: engine.loss_and_grad(ls, loss))
    times, states = _trajectory(flow, 200.0, samples)

    def svals(ls):
        return torch.linalg.svdvals(mf_product(ls)[0])

    worst, count = 0.0, 0
    for t, yy in zip(times[1:], states[1:]):
        ls = flow.split(yy)
        w = mf_product(ls)[0].detach()
        uu, sig, vvh = torch.linalg.svd(w)
        g = torch.zeros(n, n, dtype=torch.float64)
        g.index_put_((rows, cols), 2 * (w[rows, cols] - y) / len(y), accumulate=True)
        proj = torch.einsum("ir,ij,rj->r", uu, g, vvh)  # <grad, u_r v_r^T>
        formula = -depth * (sig**2) ** (1 - 1 / depth) * proj
        keep = sig > 1e-3 * float(sig.max())
        h = _time_scale(sig, formula, keep, t)
        rate = _rates(flow, yy, svals, h)
        worst = max(worst, _rate_error(rate, formula, keep))
        count += 1
    return CheckResult(
        "theorem3-mf",
        "d s_r/dt = -N (s_r^2)^(1-1/N) <grad l(W), u_r v_r^T> from a balanced init",
        "Arora, Cohen, Hu & Luo 2019, Theorem 3",
        worst,
        RATE_TOL,
        count,
        time.perf_counter() - start,
        f"depth {depth}, 8 x 8 rank-2 completion from 30 entries, balanced init from a random "
        f"A (||A|| = {float(a.norm()):.3g}); t up to {times[-1]:g}, loss "
        f"{flow.loss(states[0]):.3g} -> {flow.loss(states[-1]):.3g}",
    )


# ----------------------------------------------------------------------------------- HTF


def _htf_instance(seed: int, order: int, spec: str, m: int):
    """An HTF completion instance for the checks: modes of 3, ground truth of widths 2
    (norm 3), ``m`` observed entries; returns (generator, dims, tree, engine, loss)."""
    from implreg.factorizations.htf import ModeTree, htf_init, htf_values
    from implreg.factorizations.htf_engine import DenseHTFCompletion
    from implreg.losses import make_loss
    from implreg.problems.synthetic import sample_indices

    gen = torch.Generator().manual_seed(seed)
    dims = (3,) * order
    tree = ModeTree.parse(spec, order)
    truth = htf_init(dims, tree, 2, stds=(1.0,), generator=gen, dtype=torch.float64)
    idx = sample_indices(list(dims), m, generator=gen)
    y = htf_values(truth, tree, idx)[0]
    y = y / y.norm() * 3.0
    return gen, dims, tree, DenseHTFCompletion(tree, dims, idx, y), make_loss("l2")


def _node_axes(tree, width: int) -> Tensor:
    """``K`` (children + 1) of every local component, in ``htf_local_norms`` order."""
    return torch.tensor(
        [float(len(tree.children[v]) + 1) for v in tree.internal for _ in range(width)],
        dtype=torch.float64,
    )


def _htf_where(order: int, tree) -> str:
    ks = sorted({len(tree.children[v]) + 1 for v in tree.internal})
    return f"order-{order} HTF {tree.describe()} (K = {', '.join(map(str, ks))})"


def check_htf_local(
    seed: int = 0, samples: int = 10, order: int = 4, spec: str = "adjacent", m: int = 40
) -> CheckResult:
    """ICML 2022: HTF local components (K = 3): conservation and the rate bounds."""
    from implreg.factorizations.htf import htf_init, htf_local_norms

    start = time.perf_counter()
    gen, dims, tree, engine, loss = _htf_instance(seed, order, spec, m)
    params = htf_init(dims, tree, 4, stds=(0.4,), generator=gen, dtype=torch.float64)
    flow = _Flow(params, lambda ps: engine.loss_and_grad(ps, loss))
    times, states = _trajectory(flow, 400.0, samples)
    k = _node_axes(tree, 4)

    def factor_sq(ps, v):
        out = [(ps[c] * ps[c]).sum(1)[0] for c in tree.children[v]]
        own = ps[v] * ps[v]
        out.append(own[0] if v == tree.root else own.sum(-1)[0])
        return torch.stack(out)  # (K, R_v)

    def all_norms(ps):
        return torch.cat([x[0] for x in htf_local_norms(ps, tree)])

    ps0 = flow.split(states[0])
    diffs0 = [factor_sq(ps0, v)[1:] - factor_sq(ps0, v)[:1] for v in tree.internal]
    eps = max(
        float((factor_sq(ps0, v).amax(0) - factor_sq(ps0, v).amin(0)).max()) for v in tree.internal
    )
    drift, scale, worst, count = 0.0, 1e-300, 0.0, 0
    for t, yy in zip(times[1:], states[1:]):
        ps = flow.split(yy)
        for v, d0 in zip(tree.internal, diffs0):
            sq = factor_sq(ps, v)
            scale = max(scale, float(sq.max()))
            drift = max(drift, float(((sq[1:] - sq[:1]) - d0).abs().max()))
        # the rate identity's ingredients per local component: gamma sigma = <a_K, -grad a_K>
        _, grads = engine.loss_and_grad(ps, loss)
        norms = htf_local_norms(ps, tree)
        sig_all, gam_all = [], []
        for v, sig in zip(tree.internal, norms):
            prod = -(ps[v][0] * grads[v][0])
            x = prod if v == tree.root else prod.sum(-1)
            sig_all.append(sig[0])
            gam_all.append(x / sig[0].clamp_min(1e-300))
        sigma, gamma = torch.cat(sig_all), torch.cat(gam_all)
        formula = k * gamma * sigma ** (2 - 2 / k)
        keep = sigma > 1e-3 * float(sigma.max())
        h = _time_scale(sigma, formula, keep, t)
        rate = _rates(flow, yy, all_norms, h)
        worst = max(worst, _bounds_violation(rate, gamma, sigma, k, eps, keep))
        count += 1
    measured = max(drift / scale / CONSERVATION_TOL, worst / RATE_TOL)
    return CheckResult(
        "htf-local" if order == 4 else f"htf-local-order{order}",
        "local factorizations (K axes each) conserve norm differences and obey Theorem 1's bounds",
        "Razin, Maman & Cohen 2022 (local component dynamics)",
        measured,
        1.0,
        count,
        time.perf_counter() - start,
        f"{_htf_where(order, tree)}, modes of 3, widths 4, {m} observed entries, unbalanced "
        f"init (eps = {eps:.3g}); conservation drift {drift / scale:.2e} (tolerance "
        f"{CONSERVATION_TOL:g}), bound violation {worst:.2e} (tolerance {RATE_TOL:g}); "
        "measured: the larger of the two as a fraction of its tolerance",
    )


def check_htf_local_odd(seed: int = 0, samples: int = 10) -> CheckResult:
    """ICML 2022: as htf-local on the authors' order-3 tree ((1,2),(3,)): K = 2 at {3}'."""
    return check_htf_local(seed, samples, order=3, spec="checkerboard", m=20)


def balanced_htf(tree, dims, width: int, scale: float, gen: torch.Generator) -> list[Tensor]:
    """Random HTF parameters (batch 1, float64) whose every local factorization is balanced:
    the children's columns and the node's row of local component ``r`` of node ``v`` share
    one norm ``t_v[r]`` (the root's ``|w_out[r]|`` too).  Targets are drawn per node with
    ``sum_r t_v[r]^2`` equal to the parent's sum, and each internal matrix is scaled to its
    row and column norms at once by Sinkhorn iterations on its squared entries."""
    shapes = tree.shapes(dims, width)
    targets: dict[int, Tensor] = {}
    for v in reversed(tree.internal):  # the root first
        t = 0.5 + torch.rand(shapes[v][0], generator=gen, dtype=torch.float64)
        parent = tree.parent(v)
        total = scale**2 * shapes[v][0] if parent is None else float(targets[parent].pow(2).sum())
        targets[v] = t * math.sqrt(total / float(t.pow(2).sum()))
    params = []
    for v, shape in enumerate(shapes):
        w = torch.randn(*shape, generator=gen, dtype=torch.float64)
        parent = tree.parent(v)
        if parent is None:
            w = torch.sign(w) * targets[v]
        elif not tree.children[v]:  # a leaf: columns only
            w = w / w.norm(dim=0) * targets[parent]
        else:
            rows, cols = targets[v].pow(2), targets[parent].pow(2)
            sq = w.pow(2)
            d1 = torch.ones(shape[0], dtype=torch.float64)
            d2 = torch.ones(shape[1], dtype=torch.float64)
            for _ in range(2000):
                d1 = rows / (sq @ d2)
                d2 = cols / (sq.T @ d1)
            w = w * torch.sqrt(torch.outer(d1, d2))
        params.append(w.unsqueeze(0))
    return params


def check_htf_corollary(
    seed: int = 0,
    samples: int = 10,
    balanced: bool = True,
    order: int = 4,
    spec: str = "adjacent",
    m: int = 40,
) -> CheckResult:
    """ICML 2022: balanced HTF local components move as ds/dt = 3 gamma s^(4/3) (K = 3)."""
    from implreg.factorizations.htf import htf_init, htf_local_norms

    start = time.perf_counter()
    gen, dims, tree, engine, loss = _htf_instance(seed, order, spec, m)
    k = _node_axes(tree, 4)
    params = (
        balanced_htf(tree, dims, 4, 0.8, gen)
        if balanced  # else a Gaussian init, where the identity does not hold (tests)
        else htf_init(dims, tree, 4, stds=(0.4,), generator=gen, dtype=torch.float64)
    )
    sq = [
        torch.stack(
            [(params[c] ** 2).sum(1)[0] for c in tree.children[v]]
            + [params[v][0] ** 2 if v == tree.root else (params[v][0] ** 2).sum(-1)]
        )
        for v in tree.internal
    ]
    eps = max(float((q.amax(0) - q.amin(0)).max()) for q in sq)
    flow = _Flow(params, lambda ps: engine.loss_and_grad(ps, loss))
    times, states = _trajectory(flow, 400.0, samples)

    def all_norms(ps):
        return torch.cat([x[0] for x in htf_local_norms(ps, tree)])

    worst, count = 0.0, 0
    for t, yy in zip(times[1:], states[1:]):
        ps = flow.split(yy)
        _, grads = engine.loss_and_grad(ps, loss)
        sigma = all_norms(ps)
        xs = []
        for v in tree.internal:  # gamma sigma = <a_K, -grad a_K> for the node's own row
            prod = -(ps[v][0] * grads[v][0])
            xs.append(prod if v == tree.root else prod.sum(-1))
        gamma = torch.cat(xs) / sigma.clamp_min(1e-300)
        formula = k * gamma * sigma ** (2 - 2 / k)
        keep = sigma > 1e-3 * float(sigma.max())
        h = _time_scale(sigma, formula, keep, t)
        rate = _rates(flow, yy, all_norms, h)
        worst = max(worst, _rate_error(rate, formula, keep))
        count += 1
    return CheckResult(
        "htf-corollary" if order == 4 else f"htf-corollary-order{order}",
        "ds/dt = K gamma s^(2-2/K), K = children + 1, for every local component from a "
        "balanced init",
        "Razin, Maman & Cohen 2022 (local component dynamics)",
        worst,
        RATE_TOL,
        count,
        time.perf_counter() - start,
        f"{_htf_where(order, tree)}, modes of 3, widths 4, {m} observed entries, every local "
        f"factorization balanced at init (eps = {eps:.1e}, Sinkhorn scaling); t up to "
        f"{times[-1]:g}, loss {flow.loss(states[0]):.3g} -> {flow.loss(states[-1]):.3g}",
    )


def check_htf_corollary_odd(seed: int = 0, samples: int = 10) -> CheckResult:
    """ICML 2022: as htf-corollary on the authors' order-3 tree: ds/dt = 2 gamma s at {3}'."""
    return check_htf_corollary(seed, samples, order=3, spec="checkerboard", m=20)


CHECKS: dict[str, Callable[..., CheckResult]] = {
    "lemma1-cp": check_lemma1_cp,
    "theorem1-cp": check_theorem1_cp,
    "corollary1-cp": check_corollary1_cp,
    "theorem2-cp": check_theorem2_cp,
    "theorem3-mf": check_theorem3_mf,
    "htf-local": check_htf_local,
    "htf-corollary": check_htf_corollary,
    "htf-local-order3": check_htf_local_odd,
    "htf-corollary-order3": check_htf_corollary_odd,
}


def run_checks(names: Sequence[str] | None = None, seed: int = 0, log=None) -> list[CheckResult]:
    """Run the named checks (all by default) in one thread; results in order."""
    from implreg.threads import use_threads

    names = list(CHECKS) if names is None else list(names)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise ValueError(f"unknown check {unknown[0]!r}; the checks are {', '.join(CHECKS)}")
    out = []
    with use_threads(1):
        for name in names:
            res = CHECKS[name](seed=seed)
            if log is not None:
                log(format_row(res))
            out.append(res)
    return out


def format_row(r: CheckResult) -> str:
    verdict = "pass" if r.passed else "FAIL"
    return (
        f"{r.name:20s} {verdict}  measured {r.measured:.2e}  tolerance {r.tolerance:.0e}  "
        f"({r.samples} states, {r.seconds:.1f} s)  {r.source}"
    )


def markdown_table(results: Sequence[CheckResult]) -> str:
    lines = [
        "| check | statement | source | measured | tolerance | verdict |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.statement} | {r.source} | {r.measured:.2e} | "
            f"{r.tolerance:.0e} | {'pass' if r.passed else 'FAIL'} |"
        )
    return "\n".join(lines)
