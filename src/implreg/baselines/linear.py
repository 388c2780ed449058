"""Least-squares linear predictors, the baseline of Razin et al. 2021 Appendix B (Figure 4).

Section 5.2 fits one-vs-all MNIST and Fashion-MNIST tasks with CP predictors of
low tensor rank; the appendix contrasts them with linear predictors, which
cannot fit these data accurately.  :func:`fit_linear` solves, for every task
(column of ``targets``) at once,

    minimize ||[X, 1] w - y||_2,  and among the minimizers the one of least ||w||_2,

in float64.  :func:`mse` is the error of the paper: the mean squared error per
task, optionally with each sample's squared error clipped (the test error of
Figure 4 clips at 1 on the 0/1 label scale).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

__all__ = ["LinearFit", "fit_linear", "mse"]


def _real_or_none(name: str, value, *, positive: bool) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number or None, got {type(value).__name__}")
    out = float(value)
    if not math.isfinite(out) or out < 0 or (positive and out == 0):
        raise ValueError(
            f"{name} must be {'positive' if positive else 'non-negative'} and finite, got {out}"
        )
    return out


def _as_matrix(value, name: str) -> torch.Tensor:
    try:
        out = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(
            f"{name} must be a numeric array or tensor, got {type(value).__name__}"
        ) from exc
    if out.is_complex():
        raise TypeError(f"{name} must be real, got dtype {out.dtype}")
    if out.ndim != 2:
        raise ValueError(f"{name} must be a matrix (n, columns), got shape {tuple(out.shape)}")
    return out


@dataclass(frozen=True)
class LinearFit:
    """Affine predictors ``x -> weights @ x + bias``, one per task.

    ``weights`` is ``(T, D)`` and ``bias`` ``(T,)``, both float64; ``rank`` is the
    numerical rank of ``[features, 1]`` found by the solver.
    """

    weights: torch.Tensor
    bias: torch.Tensor
    rank: int | None = None

    def predict(self, features) -> torch.Tensor:
        """Predictions ``(n, T)`` in float64 for features ``(n, D)``."""
        x = _as_matrix(features, "features")
        if x.shape[1] != self.weights.shape[1]:
            raise ValueError(
                f"features have {x.shape[1]} columns but the fit has {self.weights.shape[1]}"
            )
        x = x.to(device=self.weights.device, dtype=torch.float64)
        return x @ self.weights.T + self.bias


def fit_linear(features, targets, *, rcond: float | None = None) -> LinearFit:
    """Minimum-norm least-squares fit of ``[features, 1] w = targets``, every column at once.

    ``features`` is ``(n, D)`` and ``targets`` ``(n, T)`` (tensors or arrays of any
    real dtype); the computation is in float64 on the CPU.

    Solver: ``torch.linalg.lstsq`` with LAPACK's ``gelsd`` driver, the SVD-based
    solver behind ``numpy.linalg.lstsq``.  It is exact for rank-deficient designs
    (MNIST's always-zero border pixels, one-hot pixel encodings whose columns sum
    to the bias column, ``n < D + 1``): singular values below ``rcond * s_max``
    are treated as zero and the returned ``w`` is the pseudo-inverse solution, so
    a never-active feature gets weight 0.  Normal equations would square the
    condition number, and QR-based drivers (``gels``, ``gelsy``) either assume
    full rank or do not give the minimum-norm solution in general.
    ``rcond=None`` is LAPACK's and numpy's default, machine epsilon times
    ``max(n, D + 1)``.

    The bias is part of ``w`` and hence of the norm being minimized; this changes
    only which of several equally good fits is returned, never the train error.
    """
    rcond = _real_or_none("rcond", rcond, positive=False)
    x = _as_matrix(features, "features")
    y = _as_matrix(targets, "targets")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"features have {x.shape[0]} rows but targets have {y.shape[0]}")
    if x.shape[0] == 0 or y.shape[1] == 0:
        raise ValueError("need at least one sample and one task")
    device = x.device
    x = x.detach().to(device="cpu", dtype=torch.float64)
    y = y.detach().to(device="cpu", dtype=torch.float64)
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("features and targets must be finite")
    design = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64, device=x.device)], dim=1)
    sol = torch.linalg.lstsq(design, y, rcond=rcond, driver="gelsd")
    w = sol.solution.T.contiguous().to(device)
    rank = int(sol.rank) if sol.rank.numel() else None
    return LinearFit(weights=w[:, :-1].contiguous(), bias=w[:, -1].contiguous(), rank=rank)


def mse(pred, y, clip: float | None = None) -> torch.Tensor:
    """Per-task mean squared error ``(T,)`` (a scalar for vectors), computed in float64.

    With ``clip`` each sample's squared error is replaced by ``min(err^2, clip)``
    before averaging over samples (axis 0): the test error of Figure 4 uses
    ``clip=1`` on the 0/1 label scale.
    """
    p, t = torch.as_tensor(pred), torch.as_tensor(y)
    if p.is_complex() or t.is_complex():
        raise TypeError(f"pred and y must be real, got dtypes {p.dtype} and {t.dtype}")
    if p.shape != t.shape:
        raise ValueError(
            f"predictions {tuple(p.shape)} and targets {tuple(t.shape)} differ in shape"
        )
    if p.ndim not in (1, 2) or p.shape[0] == 0:
        raise ValueError(f"expected (n,) or (n, T) with n >= 1, got {tuple(p.shape)}")
    if clip is not None and not (isinstance(clip, numbers.Real) and clip > 0):
        if isinstance(clip, bool) or not isinstance(clip, numbers.Real):
            raise TypeError(f"clip must be a positive number or None, got {type(clip).__name__}")
        raise ValueError(f"clip must be positive, got {clip}")
    err = (p.to(torch.float64) - t.to(device=p.device, dtype=torch.float64)) ** 2
    if clip is not None:
        err = err.clamp(max=float(clip))
    return err.mean(dim=0)
