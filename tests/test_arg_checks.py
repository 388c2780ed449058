"""Public entry points refuse bad arguments with a TypeError/ValueError naming the argument.

Issue 9, item 7: every case below gives one wrong argument to an otherwise valid
call and checks the exception type and that the message names the argument
(and, where useful, what was given).  The last tests check that valid inputs,
including the accepted variants (integral floats as sizes, narrow integer index
dtypes, numpy scales), still work.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from implreg import matrix_metrics as mm
from implreg.baselines.linear import fit_linear, mse
from implreg.baselines.nuclear import nuclear_norm_sensing
from implreg.factorizations import cp_logdomain
from implreg.factorizations.cp import cp_gammas, cp_init, cp_to_tensor, cp_values
from implreg.factorizations.cp_engine import (
    DenseCompletion,
    DenseSensing,
    GatherCompletion,
    RankOneSensing,
    completion_engine,
    group_modes,
    linear_index,
)
from implreg.factorizations.cp_exp import fit_exp_sum, one_hot_features
from implreg.factorizations.det_sign import init_layers, run_gd
from implreg.factorizations.matrix import (
    MatrixCompletion,
    MatrixSensing,
    layer_sizes,
    mf_init,
)
from implreg.factorizations.network import CPNetwork
from implreg.losses import HuberLoss, L2Loss, make_loss
from implreg.metrics import learned_components, top_components
from implreg.optim import GD, Adam, AdaptiveGD, StopRule, make_optimizer
from implreg.optim.lbfgs import minimize
from implreg.problems.images import discretize, one_vs_all, rand_image
from implreg.problems.synthetic import (
    completion_problem,
    low_cp_rank_tensor,
    low_rank_matrix,
    sample_indices,
)

F64 = torch.float64
DIMS = [3, 4, 5]
M = 10


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _idx(dims=DIMS, m=M, seed=0) -> torch.Tensor:
    g = _gen(seed)
    return torch.stack([torch.randint(0, d, (m,), generator=g) for d in dims], dim=1)


def _y(m=M, dtype=F64) -> torch.Tensor:
    return torch.randn(m, generator=_gen(1), dtype=torch.float64).to(dtype)


def _factors(dims=DIMS, rank=2, batch=2, dtype=F64) -> list[torch.Tensor]:
    return [torch.randn(batch, d, rank, generator=_gen(2), dtype=dtype) for d in dims]


def _with(set: dict) -> torch.Tensor:  # noqa: A002 - reads as _with(set={(row, col): value})
    """A copy of ``_idx()`` with some entries replaced."""
    out = _idx().clone()
    for (i, j), v in set.items():
        out[i, j] = v
    return out


def _bad_factors(kind: str):
    f = _factors()
    if kind == "rank":
        f[1] = torch.randn(2, 4, 3, dtype=F64)
    elif kind == "mode":
        f[2] = torch.randn(2, 6, 2, dtype=F64)
    elif kind == "count":
        f = f[:2]
    elif kind == "dtype":
        f = [x.float() for x in f]
    elif kind == "2d":
        f[0] = f[0][0]
    elif kind == "batch":
        f[1] = torch.randn(3, 4, 2, dtype=F64)
    elif kind == "tensor":
        f = torch.stack([f[0][:, :3], f[1][:, :3], f[2][:, :3]])
    return f


def _engine(method: str):
    if method == "dense":
        return DenseCompletion(DIMS, _idx(), _y())
    if method == "gather":
        return GatherCompletion(DIMS, _idx(), _y(), table_max=4, chunk=3)
    if method == "sensing":
        x = torch.randn(M, math.prod(DIMS), generator=_gen(3), dtype=F64)
        return DenseSensing(DIMS, x, _y())
    vecs = [torch.randn(M, d, generator=_gen(4), dtype=F64) for d in DIMS]
    return RankOneSensing(vecs, _y(), chunk=4)


ENGINES = ["dense", "gather", "sensing", "rank_one"]
FACTOR_CASES = [
    ("rank", ValueError, r"factors\[1\] must have shape \(2, 4, 2\)"),
    ("mode", ValueError, r"factors\[2\] must have shape \(2, 5, 2\).*got \(2, 6, 2\)"),
    ("count", ValueError, r"factors must hold 3 tensors \(one per mode\), got 2"),
    ("dtype", TypeError, r"factors have dtype torch.float32 but the observations y"),
    ("2d", ValueError, r"factors\[0\] must have shape \(B, d_n, R\)"),
    ("batch", ValueError, r"factors\[1\] must have shape \(2, 4, 2\)"),
    ("tensor", TypeError, r"factors must be a sequence of tensors"),
]


@pytest.mark.parametrize("method", ENGINES)
@pytest.mark.parametrize("kind, exc, match", FACTOR_CASES, ids=[c[0] for c in FACTOR_CASES])
def test_engines_check_the_factors_of_every_call(method, kind, exc, match):
    eng = _engine(method)
    with pytest.raises(exc, match=match):
        eng.loss_and_grad(_bad_factors(kind), L2Loss())
    with pytest.raises(exc, match=match):
        eng.predict(_bad_factors(kind))


@pytest.mark.parametrize("method", ["auto", "dense", "gather"])
@pytest.mark.parametrize(
    "idx, y, exc, match",
    [
        (_idx()[:, :2], _y(), ValueError, r"idx must have shape \(m, 3\).*got shape \(10, 2\)"),
        (_idx().double(), _y(), TypeError, r"idx must be an integer tensor, got dtype"),
        (_idx() > 0, _y(), TypeError, r"idx must be an integer tensor, got dtype torch.bool"),
        (_idx().tolist(), _y(), TypeError, r"idx must be an integer tensor, got list"),
        (_with(set={(4, 1): 4}), _y(), ValueError, r"idx\[:, 1\] must lie in \[0, 4\).*got 4"),
        (_with(set={(0, 0): -1}), _y(), ValueError, r"idx\[:, 0\] must lie in \[0, 3\).*got -1"),
        (_idx()[:0], _y(0), ValueError, r"idx must hold at least one observation"),
        (_idx(), _y(9), ValueError, r"y must have shape \(10,\).*got \(9,\)"),
        (_idx(), _y().reshape(2, 5), ValueError, r"y must have shape \(10,\)"),
        (_idx(), torch.arange(M), TypeError, r"y must be a floating-point tensor"),
        (_idx(), _y().index_fill(0, torch.tensor([3]), math.nan), ValueError, r"y must be finite"),
        (_idx(), _y().numpy(), TypeError, r"y must be a floating-point tensor, got ndarray"),
    ],
    ids=[
        "width",
        "float-idx",
        "bool-idx",
        "list-idx",
        "too-large",
        "negative",
        "empty",
        "y-length",
        "y-2d",
        "y-int",
        "y-nan",
        "y-numpy",
    ],
)
def test_completion_engine_checks_observations(method, idx, y, exc, match):
    with pytest.raises(exc, match=match):
        completion_engine(DIMS, idx, y, method=method)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        # completion_engine options and sizes
        (lambda: completion_engine(DIMS, _idx(), _y(), method="sparse"), ValueError, "method"),
        (lambda: completion_engine(DIMS, _idx(), _y(), chunks=3), TypeError, r"\['chunks'\]"),
        (lambda: completion_engine(DIMS, _idx(), _y(), chunk=0), ValueError, "chunk must be"),
        (
            lambda: completion_engine(DIMS, _idx(), _y(), method="gather", table_max=-1),
            ValueError,
            "table_max must be a positive integer, got -1",
        ),
        (lambda: completion_engine([3, 0, 5], _idx(), _y()), ValueError, r"dims\[1\]"),
        (lambda: GatherCompletion(DIMS, _idx(), _y(), chunk=2.5), ValueError, "chunk"),
        (lambda: DenseCompletion([3, 4, "5"], _idx(), _y()), TypeError, r"dims\[2\]"),
        (lambda: linear_index(_with(set={(0, 2): 5}), DIMS), ValueError, r"idx\[:, 2\]"),
        (lambda: group_modes(DIMS, 0), ValueError, "table_max"),
        # sensing engines
        (
            lambda: DenseSensing(DIMS, torch.zeros(M, 59, dtype=F64), _y()),
            ValueError,
            r"measurements must have one column per tensor entry, shape \(m, 60\)",
        ),
        (
            lambda: DenseSensing(DIMS, torch.zeros(M, 60, dtype=torch.int64), _y()),
            TypeError,
            "measurements must be a floating-point tensor",
        ),
        (
            lambda: DenseSensing(DIMS, torch.zeros(M, 60, dtype=F64), _y(dtype=torch.float32)),
            TypeError,
            "y has dtype torch.float32 but measurements has dtype torch.float64",
        ),
        (
            lambda: DenseSensing(DIMS, torch.zeros(M, 60, dtype=F64), _y(M + 1)),
            ValueError,
            r"y must have shape \(10,\)",
        ),
        (
            lambda: RankOneSensing(
                [torch.zeros(M, 3), torch.zeros(M + 1, 4)], _y(dtype=torch.float32)
            ),
            ValueError,
            r"vectors\[1\] must have shape \(m, d_n\) with the m = 10 rows",
        ),
        (lambda: RankOneSensing([], _y()), ValueError, "vectors must hold at least one"),
        (lambda: RankOneSensing(torch.zeros(M, 3), _y()), TypeError, "vectors must be a sequence"),
        (
            lambda: RankOneSensing([torch.zeros(M, 3, dtype=F64)], _y(), chunk=0),
            ValueError,
            "chunk must be a positive integer",
        ),
        # cp_init (the audit: stds=[] and stds=[nan] were accepted)
        (lambda: cp_init(DIMS, 2, stds=[], generator=_gen()), ValueError, "stds must be a non-"),
        (lambda: cp_init(DIMS, 2, stds=[math.nan], generator=_gen()), ValueError, r"stds\[0\]"),
        (
            lambda: cp_init(DIMS, 2, stds=[0.1, -1.0], generator=_gen()),
            ValueError,
            r"stds\[1\] must be positive, got -1.0",
        ),
        (lambda: cp_init(DIMS, 2, stds=[math.inf], generator=_gen()), ValueError, r"stds\[0\]"),
        (lambda: cp_init(DIMS, 2, stds=0.1, generator=_gen()), TypeError, "stds must be a seq"),
        (lambda: cp_init(DIMS, 2, stds=["0.1"], generator=_gen()), TypeError, r"stds\[0\]"),
        (lambda: cp_init([3, 2.5], 2, stds=[0.1], generator=_gen()), ValueError, r"dims\[1\]"),
        (lambda: cp_init([], 2, stds=[0.1], generator=_gen()), ValueError, "dims must hold"),
        (lambda: cp_init(DIMS, 0, stds=[0.1], generator=_gen()), ValueError, "rank must be a pos"),
        (lambda: cp_init(DIMS, True, stds=[0.1], generator=_gen()), TypeError, "rank must be"),
        (
            lambda: cp_init(DIMS, 2, stds=[0.1], mean=math.inf, generator=_gen()),
            ValueError,
            "mean must be a finite number",
        ),
        (lambda: cp_init(DIMS, 2, stds=[0.1], generator=0), TypeError, "generator must be"),
        (
            lambda: cp_init(DIMS, 2, stds=[0.1], generator=_gen(), dtype=torch.int32),
            TypeError,
            "dtype must be a floating-point torch.dtype",
        ),
        # other CP functions
        (lambda: cp_values(_factors(), _idx().float()), TypeError, "idx must be an integer"),
        (lambda: cp_values(_factors(), _with(set={(1, 0): 3})), ValueError, r"idx\[:, 0\]"),
        (lambda: cp_values(_factors(), _idx(), chunk=0), ValueError, "chunk"),
        (
            lambda: cp_gammas(_factors(), torch.zeros(2, 3, 4, dtype=F64)),
            ValueError,
            r"grad_end must have shape \(2, 3, 4, 5\)",
        ),
        (
            lambda: cp_to_tensor([_factors()[0], _factors()[1].float()]),
            TypeError,
            r"factors\[1\] has dtype torch.float32 but factors\[0\] has dtype torch.float64",
        ),
        (lambda: cp_to_tensor([]), ValueError, "factors must hold at least one tensor"),
        (lambda: CPNetwork([2, 0], 2), ValueError, r"dims\[1\] must be a positive integer"),
        (lambda: CPNetwork([2, 3], 1.5), ValueError, "rank must be an integer, got 1.5"),
        (lambda: CPNetwork([2, 3], 2, dtype=torch.long), TypeError, "dtype"),
        # optimizers (the audit: AdaptiveGD(-1) and GD(0) were accepted)
        (lambda: GD(0), ValueError, "lr must be positive, got 0.0"),
        (lambda: GD(-1.0), ValueError, "lr must be positive"),
        (lambda: GD(math.nan), ValueError, "lr must be a finite number"),
        (lambda: GD("0.1"), TypeError, "lr must be a real number, got str"),
        (lambda: AdaptiveGD(-1), ValueError, "lr must be positive, got -1.0"),
        (lambda: AdaptiveGD(0.1, beta=1.0), ValueError, r"beta must lie in \[0, 1\), got 1.0"),
        (lambda: AdaptiveGD(0.1, beta=-0.1), ValueError, "beta must lie in"),
        (lambda: AdaptiveGD(0.1, eps=0.0), ValueError, "eps must be positive"),
        (lambda: Adam(0.1, betas=(0.9, 1.5)), ValueError, r"betas\[1\] must lie in \[0, 1\)"),
        (lambda: Adam(0.1, betas=0.9), TypeError, "betas must be a pair"),
        (lambda: Adam(math.inf), ValueError, "lr must be a finite number"),
        (lambda: make_optimizer(3, lr=0.1), TypeError, "name must be a string"),
        (lambda: make_optimizer("adaptive", lr=0.1, beta=1.0), ValueError, "beta must lie"),
        (lambda: StopRule(1e-8, 0, 25, 100), ValueError, "patience must be a positive integer"),
        (lambda: StopRule(math.nan, 5, 25, 100), ValueError, "tol must be a finite number"),
        (lambda: StopRule(-1.0, 5, 25, 100), ValueError, "tol must be non-negative"),
        (lambda: StopRule(1e-8, 5, 0, 100), ValueError, "check_every must be a positive"),
        (lambda: StopRule(1e-8, 5, 25, -1), ValueError, "max_iterations must be a non-negative"),
        (lambda: StopRule(1e-8, 5, 25.5, 100), ValueError, "check_every must be an integer"),
        (
            lambda: minimize(lambda x, i: None, torch.zeros(2, 3), memory=0),
            ValueError,
            "memory must be a positive integer",
        ),
        (lambda: minimize(lambda x, i: None, torch.zeros(2, 3), c1=1.5), ValueError, "c1"),
        (lambda: minimize(None, torch.zeros(2, 3)), TypeError, "fun must be callable"),
        (lambda: minimize(lambda x, i: None, torch.zeros(2, 3, dtype=torch.long)), TypeError, "x0"),
        # deep matrix factorization
        (
            lambda: MatrixCompletion((3, 4), torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), _y(2)),
            TypeError,
            "rows must be an integer tensor, got dtype torch.float32",
        ),
        (
            lambda: MatrixCompletion((3, 4), torch.tensor([0, 3]), torch.tensor([0, 1]), _y(2)),
            ValueError,
            r"rows must lie in \[0, 3\).*got 3",
        ),
        (
            lambda: MatrixCompletion((3, 4), torch.tensor([0, 1]), torch.tensor([-1, 1]), _y(2)),
            ValueError,
            r"cols must lie in \[0, 4\).*got -1",
        ),
        (
            lambda: MatrixCompletion((3, 4), torch.tensor([0, 1]), torch.tensor([0, 1]), _y(2)[:1]),
            ValueError,
            "rows, cols and y must be 1-D of the same length",
        ),
        (
            lambda: MatrixCompletion(
                (3, 4), torch.tensor([0]), torch.tensor([0]), torch.tensor([1])
            ),
            TypeError,
            "y must be a floating-point tensor",
        ),
        (
            lambda: MatrixSensing((3, 4), torch.zeros(5, 12, dtype=torch.int64), _y(5)),
            TypeError,
            "A must be a floating-point tensor",
        ),
        (
            lambda: MatrixSensing((3, 4), torch.zeros(5, 12), _y(5)),
            TypeError,
            "y has dtype torch.float64 but A has dtype torch.float32",
        ),
        (lambda: MatrixSensing((3, 4.5), torch.zeros(5, 12), _y(5)), ValueError, r"shape\[1\]"),
        (lambda: mf_init((3, 4), 2, scales=[1.0], generator=None), TypeError, "generator"),
        (lambda: mf_init((3, 4), 2, scales="1", generator=_gen()), TypeError, "scales must be"),
        (lambda: mf_init((3, 4), 2, scales=[1, -2], generator=_gen()), ValueError, r"scales\[1\]"),
        (lambda: layer_sizes((3, 4), 2, widths=[2.5]), ValueError, r"widths\[0\]"),
        (lambda: layer_sizes((3, 4), "2"), TypeError, "depth must be an integer"),
        # problems
        (lambda: low_cp_rank_tensor(DIMS, 2, norm=0.0, generator=_gen()), ValueError, "norm"),
        (lambda: low_cp_rank_tensor(DIMS, 2, norm=1.0, generator=3), TypeError, "generator"),
        (lambda: sample_indices(DIMS, 2.5, generator=_gen()), ValueError, "m must be an integer"),
        (lambda: completion_problem(_factors(), 3, generator=_gen()), TypeError, "truth must be"),
        (lambda: low_rank_matrix((3,), 2, norm=1.0, generator=_gen()), ValueError, "shape must"),
        (lambda: low_rank_matrix((3, 3), 0, norm=1.0, generator=_gen()), ValueError, "rank"),
        (lambda: discretize(np.zeros((2, 3, 3))), TypeError, "images must hold integer"),
        (lambda: discretize(np.full((1, 2, 2), 300)), ValueError, "images must hold byte"),
        (
            lambda: rand_image((4, 5), levels=300, rng=np.random.default_rng(0)),
            ValueError,
            "levels",
        ),
        (lambda: rand_image((4, 5), levels=2, rng=0), TypeError, "rng must be"),
        (lambda: one_vs_all(np.array([1, 2]), 2.5), ValueError, "cls must be an integer"),
        # exp-sum / log-domain CP predictors
        (lambda: one_hot_features(torch.zeros(3, 4), 2), TypeError, "x must be an integer tensor"),
        (lambda: one_hot_features(torch.zeros(3, 4, dtype=torch.long), 1), ValueError, "levels"),
        (
            lambda: fit_exp_sum(torch.zeros(4, 3, dtype=torch.long), torch.ones(4), 1, memory=0),
            ValueError,
            "memory must be a positive integer",
        ),
        (
            lambda: fit_exp_sum(
                torch.zeros(4, 3, dtype=torch.long), torch.ones(4), 1, signs=torch.full((1, 1), 2.0)
            ),
            ValueError,
            "signs must hold only",
        ),
        (
            lambda: cp_logdomain.values(torch.ones(4, 2, 1), torch.zeros(3, 4)),
            TypeError,
            "x must be an integer tensor",
        ),
        (
            lambda: cp_logdomain.values(torch.ones(4, 2, 1), torch.full((3, 4), 2)),
            ValueError,
            r"x must hold values in 0\.\.1",
        ),
        (
            lambda: cp_logdomain.plain_values(torch.ones(4, 2, 1), torch.full((3, 4), -1)),
            ValueError,
            "x must hold values",
        ),
        # det-sign loop
        (lambda: run_gd(_det_layers(), 0.0, 0.0, 1e-3, 10, 0.9), ValueError, "lr must be posit"),
        (lambda: run_gd(_det_layers(), 1e-2, 0.0, 1e-3, -1, 0.9), ValueError, "max_steps"),
        (lambda: run_gd(_det_layers(), 1e-2, 0.0, 1e-3, 10, 1.5), ValueError, "record_ratio"),
        (
            lambda: run_gd(_det_layers().astype(np.float32), 1e-2, 0.0, 1e-3, 10, 0.9),
            TypeError,
            "layers",
        ),
        (
            lambda: run_gd(_det_layers()[:, :1], 1e-2, 0.0, 1e-3, 10, 0.9),
            ValueError,
            "layers must have",
        ),
        (lambda: init_layers(0, "random", 1e-3, np.random.default_rng(0)), ValueError, "depth"),
        (lambda: init_layers(2, "random", -1.0, np.random.default_rng(0)), ValueError, "end_std"),
        (lambda: init_layers(2, "random", 1e-3, 0), TypeError, "rng must be"),
        # losses, metrics, baselines
        (lambda: HuberLoss("0.5"), TypeError, "huber_delta must be a real number"),
        (lambda: make_loss(None), TypeError, "name must be a string"),
        (lambda: top_components(np.ones((3, 4)), -1), ValueError, "k must be non-negative"),
        (lambda: top_components(np.ones((3, 4)), 1.5), TypeError, "k must be an integer"),
        (lambda: top_components(np.ones(4), 2), ValueError, r"norms must be \(T, R\)"),
        (
            lambda: learned_components(np.arange(2), np.ones((3, 4))),
            ValueError,
            r"iterations must have shape \(3,\)",
        ),
        (
            lambda: learned_components(np.arange(3), np.ones((3, 4)), fraction=0.0),
            ValueError,
            "fraction must be a finite positive",
        ),
        (lambda: mm.effective_rank(np.eye(3)), TypeError, "x must be a tensor"),
        (
            lambda: mm.reconstruction_errors(torch.eye(2), torch.eye(2), torch.ones(2, 2)),
            TypeError,
            "observed_mask must be a bool tensor, got dtype torch.float32",
        ),
        (
            lambda: mm.balancedness([torch.ones(1, 3, 2), torch.ones(1, 2, 4)]),
            ValueError,
            r"layers\[1\] takes 4 inputs but layers\[0\] has 3 outputs",
        ),
        (lambda: mm.schatten_quasi_norm(torch.eye(2), "1"), TypeError, "Schatten exponent p"),
        (lambda: fit_linear(np.ones((3, 2)), np.ones((3, 1)), rcond=-1.0), ValueError, "rcond"),
        (lambda: mse(np.ones(3), np.ones(3), clip="1"), TypeError, "clip must be"),
        (lambda: nuclear_norm_sensing((2, 2), np.ones((1, 4)), [1.0], tol="a"), TypeError, "tol"),
    ],
)
def test_bad_argument_is_named(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def _det_layers() -> np.ndarray:
    return init_layers(2, "random", 1e-1, np.random.default_rng(0))


# ---------------------------------------------------------------- optimizer steps


def _step_args(batch=3):
    params = [torch.zeros(batch, 2, 3, dtype=F64), torch.zeros(batch, 4, dtype=F64)]
    grads = [torch.ones_like(p) for p in params]
    return params, grads, torch.ones(batch, dtype=torch.bool)


STEP_CASES = [
    ("mask-length", lambda p, g, a: (p, g, a[:2]), ValueError, r"active must have shape \(3,\)"),
    ("mask-float", lambda p, g, a: (p, g, a.double()), TypeError, "active must be a bool tensor"),
    ("mask-list", lambda p, g, a: (p, g, [True] * 3), TypeError, "active must be a bool tensor"),
    ("grads-count", lambda p, g, a: (p, g[:1], a), ValueError, r"grads must hold one tensor per"),
    (
        "grads-shape",
        lambda p, g, a: (p, [g[0][:, :1], g[1]], a),
        ValueError,
        r"grads\[0\] must have the shape \(3, 2, 3\) of params\[0\], got \(3, 1, 3\)",
    ),
    (
        "broadcast-grad",
        lambda p, g, a: (p, [g[0][:1], g[1]], a),
        ValueError,
        r"grads\[0\] must have the shape",
    ),
    (
        "params-batch",
        lambda p, g, a: ([p[0], p[1][:2]], [g[0], g[1][:2]], a),
        ValueError,
        r"params\[1\] has 2 runs",
    ),
]


@pytest.mark.parametrize("make", [lambda: GD(0.1), lambda: AdaptiveGD(0.1), lambda: Adam(0.1)])
@pytest.mark.parametrize("case, change, exc, match", STEP_CASES, ids=[c[0] for c in STEP_CASES])
def test_optimizer_steps_check_their_arguments(make, case, change, exc, match):
    params, grads, active = change(*_step_args())
    before = [p.clone() for p in params]
    with pytest.raises(exc, match=match):
        make().step(params, grads, active)
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # nothing was applied


@pytest.mark.parametrize("make", [lambda: AdaptiveGD(0.1), lambda: Adam(0.1)])
def test_optimizer_state_must_match_the_runs(make):
    opt = make()
    opt.step(*_step_args(3))
    with pytest.raises(ValueError, match=r"compact\(keep\)"):
        opt.step(*_step_args(2))
    with pytest.raises(ValueError, match=r"keep must hold positions in \[0, 3\)"):
        opt.compact([0, 3])
    with pytest.raises(ValueError, match="keep must not repeat"):
        opt.compact([1, 1])
    opt.compact([2, 0])
    opt.step(*_step_args(2))  # the compacted state fits two runs


def test_state_dicts_and_stop_rule_updates_are_checked():
    with pytest.raises(ValueError, match="state must be a dict with the keys 'v' and 't'"):
        AdaptiveGD(0.1).load_state_dict({"v": [0.0]})
    with pytest.raises(ValueError, match=r"state\['v'\] and state\['t'\]"):
        AdaptiveGD(0.1).load_state_dict({"v": [0.0], "t": []})
    with pytest.raises(ValueError, match="state must be a dict with the keys 'm', 'v' and 't'"):
        Adam(0.1).load_state_dict({})
    rule = StopRule(1e-3, 2, 5, 100)
    state = rule.init_state(3)
    with pytest.raises(ValueError, match=r"loss must hold one value per run \(3\), got 2"):
        rule.update(state, 5, [1.0, 1.0])
    with pytest.raises(ValueError, match="batch must be a non-negative integer"):
        rule.init_state(-1)


def test_matrix_engines_check_the_layers_of_every_call():
    rows, cols = torch.tensor([0, 1, 2]), torch.tensor([3, 0, 1])
    eng = MatrixCompletion((3, 4), rows, cols, _y(3))
    sens = MatrixSensing((3, 4), torch.randn(5, 12, dtype=F64, generator=_gen()), _y(5))
    good = mf_init((3, 4), 2, scales=[1.0, 0.5], generator=_gen())
    for e in (eng, sens):
        e.loss_and_grad(good, L2Loss())
        with pytest.raises(ValueError, match=r"layers must give a 3 x 4 end matrix.*got 4 x 3"):
            e.loss_and_grad(mf_init((4, 3), 2, scales=[1.0], generator=_gen()), L2Loss())
        with pytest.raises(TypeError, match="layers have dtype torch.float32 but the observations"):
            e.predict([w.float() for w in good])
        with pytest.raises(ValueError, match=r"layers\[1\] takes 2 inputs but layers\[0\] has 3"):
            e.loss_and_grad([good[0], torch.zeros(2, 3, 2, dtype=F64)], L2Loss())
        with pytest.raises(TypeError, match="layers must be a sequence of tensors"):
            e.predict(good[0])


# ---------------------------------------------------------------- valid inputs still work


@pytest.mark.parametrize("method", ENGINES)
def test_valid_inputs_still_work(method):
    eng = _engine(method)
    f = _factors()
    val, grads = eng.loss_and_grad(f, HuberLoss(0.5))
    assert val.shape == (2,) and torch.isfinite(val).all()
    assert [g.shape for g in grads] == [x.shape for x in f]
    assert eng.predict(f).shape == (2, M)
    opt = AdaptiveGD(0.01)
    opt.step(f, grads, torch.tensor([True, False]))
    GD(0.01).step(f, grads, torch.ones(2, dtype=torch.bool))


def test_accepted_variants():
    # narrow integer index dtypes, integral floats and numpy integers as sizes
    idx = _idx().to(torch.int32)
    eng = completion_engine([3.0, np.int64(4), 5], idx, _y(), method="gather", chunk=np.int64(4))
    assert eng.chunk == 4 and eng.dims == [3, 4, 5]
    assert torch.equal(linear_index(idx.to(torch.uint8), DIMS), linear_index(_idx(), DIMS))
    # numpy and tuple scales; a 1-D tensor of stds
    f = cp_init((3, 4), 2, stds=np.array([0.1, 0.2]), generator=_gen())
    assert f[0].shape == (2, 3, 2)
    assert cp_init([3], 1, stds=torch.tensor([0.5]), generator=_gen())[0].shape == (1, 3, 1)
    assert len(mf_init((3, 3), 2, scales=(1.0, 2), generator=_gen())) == 2
    rule = StopRule(0, 1, 1, 10)
    assert rule.tol == 0.0 and isinstance(rule.tol, float)
    assert make_loss("huber", huber_delta=1).delta == 1.0
    assert isinstance(DenseCompletion([4], torch.tensor([[0], [3]]), _y(2)), DenseCompletion)
    # run_gd still runs (through the checking wrapper)
    status, steps, _ = run_gd(_det_layers(), 1e-2, 0.0, 1e-30, 5, 0.9)
    assert status == 1 and steps == 5


def test_order_one_dense_gradient_is_contiguous_and_can_be_updated_in_place():
    """Order 1: the dense engine used to return a stride-0 broadcast view."""
    eng = DenseCompletion([5], torch.tensor([[0], [2], [4]]), _y(3))
    f = _factors([5], rank=3)
    _, (g,) = eng.loss_and_grad(f, L2Loss())
    assert g.is_contiguous() and g.stride()[-1] == 1
    ref = g.clone()
    g.mul_(2.0)  # raised on the broadcast view
    assert torch.equal(g, 2 * ref)
    assert torch.equal(g[:, :, 0], g[:, :, 2])  # every component gets the same gradient
