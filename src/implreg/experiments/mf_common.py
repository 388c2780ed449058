"""Fitting one deep matrix factorization (Arora et al. 2019; REFERENCE §3), as a grid unit.

A unit's parameters are plain JSON values; :func:`fit` rebuilds the problem
from its seed, trains with the papers' adaptive-step GD until the train MSE
reaches ``tol`` (or ``max_iterations``), and returns final metrics and, when
asked, the trajectory of the top singular values.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from implreg import matrix_metrics as mm
from implreg.factorizations.matrix import MatrixCompletion, mf_init, mf_product
from implreg.losses import L2Loss
from implreg.metrics import Recorder
from implreg.optim import AdaptiveGD, StopRule
from implreg.problems.synthetic import low_rank_matrix, sample_indices
from implreg.training import train

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


def fit(params: dict) -> dict:
    """Train one deep matrix factorization; JSON-able result."""
    shape = tuple(params["shape"])
    truth, idx = problem(shape, params["gt_rank"], params["gt_norm"], params["m"], params["seed"])
    rows, cols = idx[:, 0], idx[:, 1]
    dtype = DTYPES[params.get("dtype", "float32")]
    engine = MatrixCompletion(shape, rows, cols, truth[rows, cols].to(dtype))
    layers = mf_init(
        shape,
        params["depth"],
        scales=[params["init_scale"]],
        scheme=params.get("init", "gaussian"),
        generator=torch.Generator().manual_seed(params["seed"] + 1),
        dtype=dtype,
    )
    observed = torch.zeros(shape, dtype=torch.bool)
    observed[rows, cols] = True
    loss = L2Loss()
    top_k = int(params.get("top_k", 10))

    def evaluate(ls):
        w = mf_product(ls).double()
        sv = torch.linalg.svdvals(w)[:, :top_k].numpy()
        test = (((w - truth) ** 2)[:, ~observed]).mean(1).numpy()
        return {"singular_values": sv, "test_mse": test}

    recorder = Recorder(log_every=int(params.get("log_every", 100)), max_records=2000)
    stop = StopRule(params["tol"], 1, 1, int(params["max_iterations"]))
    start = time.perf_counter()
    state, _ = train(
        params=layers,
        loss_and_grad=lambda ls: engine.loss_and_grad(ls, loss),
        optimizer=AdaptiveGD(params["lr"], eps=params["eps"]),
        stop=stop,
        recorder=recorder,
        evaluate=evaluate,
    )
    seconds = time.perf_counter() - start
    out = {
        "depth": params["depth"],
        "init_scale": params["init_scale"],
        "m": params["m"],
        "status": state.stop["status"][0],
        "iterations": state.iteration,
        "seconds": seconds,
        "final_train_loss": float(recorder.last("train_loss")[0]),
        **matrix_summary(mf_product(layers)[0], truth, observed),
    }
    if params.get("history", False):
        its, arrays = recorder.arrays()
        out["history"] = {
            "iteration": its.tolist(),
            "singular_values": np.asarray(arrays["singular_values"])[:, 0, :].tolist(),
            "test_mse": np.asarray(arrays["test_mse"])[:, 0].tolist(),
            "train_loss": np.asarray(arrays["train_loss"])[:, 0].tolist(),
        }
    return out


def nuclear(params: dict) -> dict:
    """The nuclear-norm minimization baseline on the same problem (cvxpy + SCS)."""
    from implreg.baselines.nuclear import nuclear_norm_completion

    shape = tuple(params["shape"])
    truth, idx = problem(shape, params["gt_rank"], params["gt_norm"], params["m"], params["seed"])
    rows, cols = idx[:, 0].numpy(), idx[:, 1].numpy()
    start = time.perf_counter()
    x = nuclear_norm_completion(
        shape,
        rows,
        cols,
        truth.numpy()[rows, cols],
        tol=params["nuclear_tol"],
        solver=params.get("solver", "SCS"),
    )
    observed = torch.zeros(shape, dtype=torch.bool)
    observed[idx[:, 0], idx[:, 1]] = True
    return {
        "method": "nuclear",
        "m": params["m"],
        "seconds": time.perf_counter() - start,
        **matrix_summary(torch.from_numpy(x), truth, observed),
    }


def truth_summary(params: dict) -> dict:
    shape = tuple(params["shape"])
    truth, _ = problem(shape, params["gt_rank"], params["gt_norm"], params["m"], params["seed"])
    return matrix_summary(truth, truth, torch.zeros(shape, dtype=torch.bool))
