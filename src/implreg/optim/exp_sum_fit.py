"""Figure 4 fits to their minimum: exp-sum CP predictors over binary one-hot inputs.

Razin, Maman & Cohen (ICML 2021), Section 5.2 and Figure 4: for each rank ``k``
the CP predictor of rank ``k`` with the lowest train MSE.  The model is the one of
:mod:`implreg.factorizations.cp_exp` (a positive CP term is ``exp(b_r + w_r . std(x))``
over standardized one-hot features), and the starting point is the same draw as
:func:`~implreg.factorizations.cp_exp.fit_exp_sum`; what differs is how the fit gets to
the minimum (measured in ``bench/study_tensor_rank_convergence.py``):

* The one-hot features are binary with about 15% ones on MNIST; the objective
  (:class:`~implreg.factorizations.cp_exp_binary.BinaryExpSumObjective`) applies the
  standardization affinely, ``std(x) . w = x . (w / scale) - mean . (w / scale)``, and takes
  both products with the 0/1 matrix by table look-up over its bits on the CPU (sparse CSR
  products elsewhere).  Constant features (108 of MNIST's 784 pixels) are zero after
  standardization and carry no parameter: they are dropped.
* L-BFGS keeps ``memory`` = 100 curvature pairs (the fit spends most of its time in a
  slow "sharpening" phase where the weights grow; more pairs per iteration pay off there).
* A fit stops once its loss fell by less than ``rel_tol`` (relative) over its last
  ``window`` iterations, and reports whether it did (``converged``), its relative
  decrease over the last window and its final gradient norm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from implreg.factorizations.cp import _check_int, _check_real, _check_tensor
from implreg.factorizations.cp_exp import (
    ExpSumPredictor,
    Standardization,
    check_fit_data,
    one_hot_features,
)
from implreg.factorizations.cp_exp_binary import BinaryExpSumObjective
from implreg.optim.lbfgs import minimize

Tensor = torch.Tensor


@dataclass
class ConvergedFit:
    """A fitted :class:`~implreg.factorizations.cp_exp.ExpSumPredictor` and how the fit ended.

    ``train_loss``, ``grad_norm``, ``rel_change`` (relative decrease over the last
    ``window`` iterations) and ``converged`` are ``(T,)``, one per task.
    """

    predictor: ExpSumPredictor
    train_loss: Tensor
    iterations: int
    evaluations: int
    grad_norm: Tensor
    rel_change: Tensor
    converged: Tensor


def fit_exp_sum_converged(
    x: Tensor,
    targets: Tensor,
    rank: int,
    *,
    levels: int = 2,
    iterations: int = 4000,
    memory: int = 100,
    window: int = 100,
    rel_tol: float = 1e-3,
    init_scale: float = 0.05,
    seed: int = 0,
    signs: Tensor | None = None,
    callback: Callable[[int, Tensor], bool | None] | None = None,
) -> ConvergedFit:
    """Fit ``T`` rank-``rank`` CP predictors (one per column of ``targets``) to their minimum.

    Same model and initialization (``seed``, ``init_scale``) as
    :func:`implreg.factorizations.cp_exp.fit_exp_sum`, float64 arithmetic (the predictor
    is returned in float32); binary features (table look-up products), ``memory`` pairs,
    and a task stops once its loss fell by less than ``rel_tol`` (relative) over its last
    ``window`` iterations (``rel_tol = 0``: run all ``iterations``).
    """
    rank = _check_int("rank", rank, minimum=1)
    iterations = _check_int("iterations", iterations, minimum=0)
    memory = _check_int("memory", memory, minimum=1)
    window = _check_int("window", window, minimum=1)
    rel_tol = _check_real("rel_tol", rel_tol, nonnegative=True)
    init_scale = _check_real("init_scale", init_scale, nonnegative=True)
    seed = _check_int("seed", seed)
    targets = check_fit_data(x, targets)
    if targets.dim() != 2 or x.dim() != 2 or x.shape[0] != targets.shape[0]:
        raise ValueError(
            f"x must be (samples, features) and targets (samples, tasks) with one row per "
            f"sample: x has shape {tuple(x.shape)}, targets {tuple(targets.shape)}"
        )
    if not bool(torch.isfinite(targets).all()):
        raise ValueError("targets must be finite")
    # float64: on the raw 0/1 features the weights are w / scale (large for rare pixels) and
    # the bias absorbs -mean . w / scale, so float32 sums would lose two digits of ``z``
    # that the dense standardized product keeps -- enough to stall the line search late in
    # the fit, when an iteration gains 1e-5 (relative).
    dtype = torch.float64
    onehot = one_hot_features(x, levels, dtype)
    std = Standardization.of(onehot)
    d_all = onehot.shape[1]
    tasks = targets.shape[1]
    if signs is None:
        signs = torch.ones(tasks, rank, dtype=dtype)
    _check_tensor("signs", signs)
    if signs.shape != (tasks, rank) or not bool((signs.abs() == 1).all()):
        raise ValueError(f"signs must be ({tasks}, {rank}) of +1 and -1, got {tuple(signs.shape)}")
    # The starting point of fit_exp_sum (same generator draws), then the live features only.
    gen = torch.Generator().manual_seed(seed)
    mean_y = targets.to(torch.float64).mean(0).clamp_min(1e-6)
    w0 = torch.randn(tasks, rank, d_all, generator=gen, dtype=torch.float64)
    w0 = w0 * (init_scale / d_all**0.5)
    b0 = torch.log(mean_y / rank).view(tasks, 1, 1).expand(tasks, rank, 1)
    live = onehot.amax(0) > onehot.amin(0)
    live_idx = live.nonzero().squeeze(1)
    d = int(live_idx.numel())
    x0 = torch.cat([w0[:, :, live_idx], b0], dim=2).reshape(tasks, -1).to(dtype)
    objective = BinaryExpSumObjective(
        onehot[:, live_idx].contiguous(),
        std.mean[live_idx],
        std.scale[live_idx],
        targets.to(dtype),
        signs.to(dtype),
        engine="packed" if onehot.device.type == "cpu" else "csr",
    )
    res = minimize(
        objective,
        x0,
        max_iter=iterations,
        memory=memory,
        rel_tol=rel_tol,
        window=window,
        callback=callback,
    )
    p = res.x.view(tasks, rank, d + 1)
    weights = torch.zeros(tasks, rank, d_all, dtype=torch.float32)
    weights[:, :, live_idx] = p[:, :, :d].to(torch.float32)
    predictor = ExpSumPredictor(
        weights=weights,
        bias=p[:, :, d].to(torch.float32),
        signs=signs.to(torch.float32),
        standardization=std,
        levels=levels,
    )
    return ConvergedFit(
        predictor=predictor,
        train_loss=res.loss.to(torch.float32),
        iterations=res.iterations,
        evaluations=res.evaluations,
        grad_norm=res.grad_norm,
        rel_change=res.rel_change,
        converged=res.converged,
    )
