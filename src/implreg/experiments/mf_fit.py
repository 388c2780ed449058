"""Fitting one deep matrix factorization as a grid unit (Arora, Cohen, Hu & Luo, "Implicit
Regularization in Deep Matrix Factorization", NeurIPS 2019, Section 5 settings).

A :class:`FitUnit` holds plain values; :func:`fit` rebuilds the problem from
its seed, trains with the papers' adaptive-step GD until the train MSE reaches
``tol`` (or ``max_iterations``), and returns final metrics and, when asked,
the trajectory of the top singular values.  :class:`NuclearUnit` solves the
nuclear-norm minimization baseline on the same problem.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from implreg import matrix_metrics as mm
from implreg.factorizations.matrix import MatrixCompletion, mf_init, mf_product
from implreg.flow import FlowRecorder, FlowSpec, flow_train
from implreg.losses import L2Loss
from implreg.optim import AdaptiveGD, StopRule
from implreg.problems.synthetic import low_rank_matrix, sample_indices
from implreg.training import Poll, Recorder, train

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def problem(shape, rank: int, norm: float, m: int, seed: int):
    """Ground truth and ``m`` observed entries (drawn uniformly without replacement)."""
    gen = torch.Generator().manual_seed(seed)
    truth = low_rank_matrix(shape, rank, norm=norm, generator=gen)
    idx = sample_indices(list(shape), m, generator=gen)
    return truth, idx


def matrix_summary(w: torch.Tensor, truth: torch.Tensor, observed: torch.Tensor) -> dict:
    """Test MSE (unobserved entries), MSE over all entries, norms and effective rank (float64)."""
    w = w.double()
    err = mm.reconstruction_errors(w, truth, observed)
    sv = mm.singular_values(w)
    return {
        "test_mse": float(err["test_mse"]) if bool((~observed).any()) else 0.0,
        "mse_all": float(err["mse"]),
        "nuclear_norm": float(mm.nuclear_norm(w)),
        "frobenius_norm": float(mm.frobenius_norm(w)),
        "spectral_norm": float(mm.spectral_norm(w)),
        "effective_rank": float(mm.effective_rank(w)),
        "singular_values_top10": sv[:10].tolist(),
    }


@dataclass(frozen=True)
class MatrixProblem:
    """A completion problem: a rank-``gt_rank`` truth and ``m`` entries drawn from ``seed``."""

    name: str
    shape: tuple[int, ...]
    gt_rank: int
    gt_norm: float
    m: int
    seed: int


@dataclass(frozen=True)
class FitUnit(MatrixProblem):
    """One deep matrix factorization fit (a unit of a grid)."""

    depth: int
    init_scale: float
    lr: float
    eps: float
    tol: float
    max_iterations: int
    dtype: str = "float32"
    init: str = "gaussian"
    log_every: int = 100
    top_k: int = 10
    history: bool = False
    device: str = "cpu"
    flow: FlowSpec | None = None  # integrate the gradient flow (float64) instead of GD

    def execute(self, should_stop=None) -> dict | None:
        return fit(self, should_stop)


@dataclass(frozen=True)
class NuclearUnit(MatrixProblem):
    """The nuclear-norm minimization baseline on the same problem."""

    nuclear_tol: float
    solver: str = "SCS"

    def execute(self, should_stop=None) -> dict:
        return nuclear(self)


def fit(u: FitUnit, should_stop=None) -> dict | None:
    """Train one deep matrix factorization; JSON-able result (None if ``should_stop()``)."""
    shape = tuple(u.shape)
    truth, idx = problem(shape, u.gt_rank, u.gt_norm, u.m, u.seed)
    rows, cols = idx[:, 0], idx[:, 1]
    dtype = DTYPES[u.dtype]
    dev = torch.device(u.device)  # drawn on the CPU, moved: every device starts the same
    engine = MatrixCompletion(shape, rows.to(dev), cols.to(dev), truth[rows, cols].to(dev, dtype))
    layers = mf_init(
        shape,
        u.depth,
        scales=[u.init_scale],
        scheme=u.init,
        generator=torch.Generator().manual_seed(u.seed + 1),
        dtype=dtype,
    )
    layers = [layer.to(dev) for layer in layers]
    observed = torch.zeros(shape, dtype=torch.bool)
    observed[rows, cols] = True
    loss = L2Loss()
    top_k = u.top_k
    truth_d, unobserved_d = truth.to(dev), (~observed).to(dev)

    def evaluate(ls):
        w = mf_product(ls).double()
        sv = torch.linalg.svdvals(w)[:, :top_k].cpu().numpy()
        test = (((w - truth_d) ** 2)[:, unobserved_d]).mean(1).cpu().numpy()
        return {"singular_values": sv, "test_mse": test}

    start = time.perf_counter()
    if u.flow is not None:
        recorder = FlowRecorder()
        state, interrupted = flow_train(
            params=layers,
            loss_and_grad=lambda ls: engine.loss_and_grad(ls, loss),
            spec=u.flow,
            recorder=recorder,
            evaluate=evaluate,
            interrupt=Poll(should_stop),
        )
        state.iteration = round(state.optimizer["time"] / u.flow.lr)
    else:
        recorder = Recorder(log_every=u.log_every, max_records=2000)
        state, interrupted = train(
            params=layers,
            loss_and_grad=lambda ls: engine.loss_and_grad(ls, loss),
            optimizer=AdaptiveGD(u.lr, eps=u.eps),
            stop=StopRule(u.tol, 1, 1, u.max_iterations),
            recorder=recorder,
            evaluate=evaluate,
            interrupt=Poll(should_stop),
        )
    if interrupted:
        return None
    seconds = time.perf_counter() - start
    out = {
        "depth": u.depth,
        "init_scale": u.init_scale,
        "m": u.m,
        "status": state.stop["status"][0],
        "iterations": state.iteration,
        "seconds": seconds,
        "initial_train_loss": float(recorder.values["train_loss"][0][0]),
        "final_train_loss": float(recorder.last("train_loss")[0]),
        **matrix_summary(mf_product(layers)[0].cpu(), truth, observed),
    }
    if u.flow is not None:
        out["flow"] = {
            "time": state.optimizer["time"],
            "gradient_evaluations": state.optimizer["evaluations"],
            "method": u.flow.method,
            "rtol": u.flow.rtol,
            "atol": u.flow.atol,
        }
    if u.history:
        its, arrays = recorder.arrays()
        out["history"] = {
            "iteration": its.tolist(),
            "singular_values": np.asarray(arrays["singular_values"])[:, 0, :].tolist(),
            "test_mse": np.asarray(arrays["test_mse"])[:, 0].tolist(),
            "train_loss": np.asarray(arrays["train_loss"])[:, 0].tolist(),
        }
    return out


def nuclear(u: NuclearUnit) -> dict:
    """The nuclear-norm minimization baseline on the same problem (cvxpy + SCS)."""
    from implreg.baselines.nuclear import nuclear_norm_completion

    shape = tuple(u.shape)
    truth, idx = problem(shape, u.gt_rank, u.gt_norm, u.m, u.seed)
    rows, cols = idx[:, 0].numpy(), idx[:, 1].numpy()
    start = time.perf_counter()
    x = nuclear_norm_completion(
        shape,
        rows,
        cols,
        truth.numpy()[rows, cols],
        tol=u.nuclear_tol,
        solver=u.solver,
    )
    observed = torch.zeros(shape, dtype=torch.bool)
    observed[idx[:, 0], idx[:, 1]] = True
    return {
        "method": "nuclear",
        "m": u.m,
        "seconds": time.perf_counter() - start,
        **matrix_summary(torch.from_numpy(x), truth, observed),
    }


def fit_memory(shape, depth: int, m: int, dtype: str = "float32") -> int:
    """Peak bytes of one :func:`fit` (one worker), from its sizes alone (nothing is allocated).

    What persists (the float64 truth, the observed masks, the observations, the
    layers and their gradients) plus the largest transient: a step (the prefix
    products ``W_j ... W_1``, the end-matrix gradient and two running products),
    an evaluation or the final summary (about five float64 end matrices), or
    building the problem (a permutation of the entries, the float64 init).
    """
    n_rows, n_cols = (int(x) for x in shape)
    size, s = n_rows * n_cols, DTYPES[dtype].itemsize
    sizes = [n_cols] + [min(n_rows, n_cols)] * (depth - 1) + [n_rows]
    layers = sum(sizes[j + 1] * sizes[j] for j in range(depth))
    prefix = sum(sizes[2:]) * n_cols  # W_2 W_1, ..., W_N ... W_1 (W_1 is not copied)
    keep = 10 * size + 40 * m + 2 * layers * s
    build = max(8 * size if size <= 1 << 24 else 192 * m, 16 * layers)
    step = s * (prefix + size + 2 * max(sizes) * n_cols) + 3 * m * s
    evaluate = max(s * prefix + 8 * size, 40 * size)  # boolean-mask indices: 16 B per entry
    return (keep + max(build, step, evaluate)) * 5 // 4  # and blocks malloc keeps after a free


def nuclear_memory(shape, m: int, solver: str = "SCS") -> int:
    """Peak bytes of one :func:`nuclear` (one worker), measured with cvxpy 1.9.

    cvxpy's import and compilation (about 140 MB), then with SCS about 1 KB per
    entry of the ``(n_rows + n_cols)``-square semidefinite block and 8 KB per
    observation; CLARABEL factorizes that block's KKT system densely, about
    ``12 (n_rows + n_cols)^4`` bytes (19 GB at 100 x 100).
    """
    n_rows, n_cols = (int(x) for x in shape)
    side = n_rows + n_cols
    peak = 144 * 2**20 + 1024 * side**2 + 8192 * m + 40 * n_rows * n_cols
    if solver.upper() == "CLARABEL":
        peak += 12 * side**4
    return peak


def truth_summary(shape, gt_rank: int, gt_norm: float, m: int, seed: int) -> dict:
    truth, _ = problem(tuple(shape), gt_rank, gt_norm, m, seed)
    return matrix_summary(truth, truth, torch.zeros(tuple(shape), dtype=torch.bool))
