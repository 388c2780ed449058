"""Nuclear-norm minimization baselines for matrix completion and matrix sensing.

The baseline of Arora, Cohen, Hu and Luo (NeurIPS 2019), "Implicit Regularization in Deep
Matrix Factorization": among all matrices that fit the observations
up to an absolute tolerance, return one of minimal nuclear norm,

    minimize ||X||_*  subject to  |<A_i, X> - y_i| <= tol,  i = 1, ..., m,

where for completion ``A_i`` selects the observed entry ``(rows[i], cols[i])``. The problem is
a semidefinite program solved with cvxpy (SCS by default, as in the reference). cvxpy is an
optional dependency and is imported only when a solver function is called.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["nuclear_norm_completion", "nuclear_norm_sensing"]

_ACCEPTED_STATUSES = ("optimal", "optimal_inaccurate")


def _import_cvxpy() -> Any:
    try:
        import cvxpy
    except ImportError as exc:
        raise ImportError(
            "The nuclear-norm baseline needs cvxpy, which is not installed; install it with "
            "`pip install cvxpy` (into the project's .venv set up by the Makefile)."
        ) from exc
    return cvxpy


def _check_shape(shape: Sequence[int]) -> tuple[int, int]:
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__len__"):
        raise TypeError(f"shape must be a pair (n_rows, n_cols), got {type(shape).__name__}.")
    if len(shape) != 2:
        raise ValueError(f"shape must have two entries (n_rows, n_cols), got {tuple(shape)}.")
    n_rows, n_cols = (int(s) for s in shape)
    if n_rows != shape[0] or n_cols != shape[1] or n_rows < 1 or n_cols < 1:
        raise ValueError(f"shape must be two positive integers, got {tuple(shape)}.")
    return n_rows, n_cols


def _check_tol(tol: float) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.integer, np.floating)):
        raise TypeError(f"tol must be a positive finite number, got {type(tol).__name__}.")
    tol = float(tol)
    if not np.isfinite(tol) or tol <= 0:
        raise ValueError(f"tol must be a positive finite number, got {tol}.")
    return tol


def _check_targets(y: npt.ArrayLike) -> np.ndarray:
    y_arr = np.asarray(y, dtype=np.float64)
    if y_arr.ndim != 1:
        raise ValueError(f"y must be one-dimensional, got shape {y_arr.shape}.")
    if y_arr.size == 0:
        raise ValueError("y must hold at least one observation.")
    if not np.all(np.isfinite(y_arr)):
        raise ValueError("y must hold only finite values.")
    return y_arr


def _solve(
    cp: Any,
    n_rows: int,
    n_cols: int,
    operator: Any,
    y: np.ndarray,
    tol: float,
    solver: str,
    solver_options: dict[str, Any],
) -> np.ndarray:
    """Minimize ||X||_* subject to |operator @ vec_C(X) - y| <= tol (one vector constraint)."""
    if not isinstance(solver, str):
        raise TypeError(f"solver must be a cvxpy solver name, got {type(solver).__name__}")
    if solver.upper() not in cp.installed_solvers():
        raise ValueError(
            f"solver {solver!r} is not installed for cvxpy; installed: {cp.installed_solvers()}."
        )
    X = cp.Variable((n_rows, n_cols))
    constraints = [cp.abs(operator @ cp.vec(X, order="C") - y) <= tol]
    problem = cp.Problem(cp.Minimize(cp.normNuc(X)), constraints)
    try:
        problem.solve(solver=solver, **solver_options)
    except cp.error.SolverError as exc:
        raise RuntimeError(f"cvxpy solver {solver} failed: {exc}") from exc
    if problem.status not in _ACCEPTED_STATUSES or X.value is None:
        raise RuntimeError(
            f"nuclear-norm minimization with {solver} ended with status {problem.status!r}, "
            "not 'optimal' or 'optimal_inaccurate'."
        )
    return np.array(X.value, dtype=np.float64)


def nuclear_norm_completion(
    shape: Sequence[int],
    rows: npt.ArrayLike,
    cols: npt.ArrayLike,
    y: npt.ArrayLike,
    *,
    tol: float = 1e-3,
    solver: str = "SCS",
    **solver_options: Any,
) -> np.ndarray:
    """Matrix completion by nuclear-norm minimization (Arora et al. 2019 baseline).

    Solves ``minimize ||X||_*`` subject to ``|X[rows[i], cols[i]] - y[i]| <= tol`` for every
    observation, the convex baseline of Arora, Cohen, Hu and Luo (NeurIPS 2019),
    "Implicit Regularization in Deep Matrix Factorization" (Arora et al. 2019, where
    ``tol = 1e-3`` and the solver is SCS). The observations enter as one vectorized
    constraint through a sparse selection matrix acting on the row-major vec of ``X``.

    Parameters
    ----------
    shape : sequence of int
        ``(n_rows, n_cols)`` of the unknown matrix.
    rows, cols : array_like of int, shape (m,)
        Row and column indices of the observed entries; the pairs must be distinct.
    y : array_like of float, shape (m,)
        Observed values.
    tol : float, default 1e-3
        Absolute tolerance of each equality constraint; must be positive.
    solver : str, default "SCS"
        Name of an installed cvxpy solver that handles semidefinite cones
        (e.g. ``"SCS"`` or ``"CLARABEL"``).
    **solver_options
        Passed to :meth:`cvxpy.Problem.solve` (e.g. ``eps=1e-6``, ``max_iters=...``).

    Returns
    -------
    numpy.ndarray
        The minimizer, float64 of shape ``shape``.

    Raises
    ------
    ImportError
        If cvxpy is not installed.
    ValueError
        For a non-positive ``tol``, mismatched lengths, out-of-range or repeated indices,
        more observations than entries, or an unknown solver.
    RuntimeError
        If the solver does not report an optimal (or optimal_inaccurate) status.

    References
    ----------
    S. Arora, N. Cohen, W. Hu, Y. Luo. Implicit Regularization in Deep Matrix Factorization.
    NeurIPS 2019.
    """
    n_rows, n_cols = _check_shape(shape)
    tol = _check_tol(tol)
    y_arr = _check_targets(y)
    rows_arr = np.asarray(rows)
    cols_arr = np.asarray(cols)
    for name, idx in (("rows", rows_arr), ("cols", cols_arr)):
        if idx.ndim != 1:
            raise ValueError(f"{name} must be one-dimensional, got shape {idx.shape}.")
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"{name} must hold integers, got dtype {idx.dtype}.")
    m = y_arr.size
    if rows_arr.size != m or cols_arr.size != m:
        raise ValueError(
            f"rows, cols and y must have the same length, got {rows_arr.size}, "
            f"{cols_arr.size} and {m}."
        )
    if m > n_rows * n_cols:
        raise ValueError(
            f"{m} observations is more than the {n_rows * n_cols} entries of a "
            f"{n_rows}x{n_cols} matrix."
        )
    rows_arr = rows_arr.astype(np.int64)
    cols_arr = cols_arr.astype(np.int64)
    if rows_arr.min() < 0 or rows_arr.max() >= n_rows:
        raise ValueError(f"rows must lie in [0, {n_rows}), got values outside it.")
    if cols_arr.min() < 0 or cols_arr.max() >= n_cols:
        raise ValueError(f"cols must lie in [0, {n_cols}), got values outside it.")
    flat = rows_arr * n_cols + cols_arr
    if np.unique(flat).size != m:
        raise ValueError("the observed (row, col) pairs must be distinct.")

    cp = _import_cvxpy()
    import scipy.sparse as sp  # a cvxpy dependency

    selection = sp.csr_matrix(
        (np.ones(m), (np.arange(m), flat)), shape=(m, n_rows * n_cols), dtype=np.float64
    )
    return _solve(cp, n_rows, n_cols, selection, y_arr, tol, solver, solver_options)


def nuclear_norm_sensing(
    shape: Sequence[int],
    A: npt.ArrayLike,
    y: npt.ArrayLike,
    *,
    tol: float = 1e-3,
    solver: str = "SCS",
    **solver_options: Any,
) -> np.ndarray:
    """Matrix sensing by nuclear-norm minimization (Arora et al. 2019 baseline).

    Solves ``minimize ||X||_*`` subject to ``|<A_i, X> - y_i| <= tol`` for every measurement,
    the sensing analogue of the convex baseline of Arora, Cohen, Hu and Luo (NeurIPS 2019),
    "Implicit Regularization in Deep Matrix Factorization". Row ``i``
    of ``A`` is the row-major vec of ``A_i``, so ``<A_i, X> = A[i] @ X.reshape(-1)`` and all
    measurements form one vectorized constraint.

    Parameters
    ----------
    shape : sequence of int
        ``(n_rows, n_cols)`` of the unknown matrix.
    A : array_like of float, shape (m, n_rows * n_cols)
        Measurement matrices, one per row, each flattened in row-major (C) order.
    y : array_like of float, shape (m,)
        Measurements.
    tol : float, default 1e-3
        Absolute tolerance of each equality constraint; must be positive.
    solver : str, default "SCS"
        Name of an installed cvxpy solver that handles semidefinite cones
        (e.g. ``"SCS"`` or ``"CLARABEL"``).
    **solver_options
        Passed to :meth:`cvxpy.Problem.solve`.

    Returns
    -------
    numpy.ndarray
        The minimizer, float64 of shape ``shape``.

    Raises
    ------
    ImportError
        If cvxpy is not installed.
    ValueError
        For a non-positive ``tol``, an ``A`` of the wrong shape, mismatched lengths of
        ``A`` and ``y``, non-finite values, or an unknown solver.
    RuntimeError
        If the solver does not report an optimal (or optimal_inaccurate) status.

    References
    ----------
    S. Arora, N. Cohen, W. Hu, Y. Luo. Implicit Regularization in Deep Matrix Factorization.
    NeurIPS 2019.
    """
    n_rows, n_cols = _check_shape(shape)
    tol = _check_tol(tol)
    y_arr = _check_targets(y)
    A_arr = np.asarray(A, dtype=np.float64)
    if A_arr.ndim != 2 or A_arr.shape[1] != n_rows * n_cols:
        raise ValueError(
            f"A must have shape (m, {n_rows * n_cols}) for a {n_rows}x{n_cols} matrix, "
            f"got {A_arr.shape}."
        )
    if A_arr.shape[0] != y_arr.size:
        raise ValueError(
            f"A and y must have the same number of measurements, got {A_arr.shape[0]} "
            f"and {y_arr.size}."
        )
    if not np.all(np.isfinite(A_arr)):
        raise ValueError("A must hold only finite values.")

    cp = _import_cvxpy()
    return _solve(cp, n_rows, n_cols, A_arr, y_arr, tol, solver, solver_options)
