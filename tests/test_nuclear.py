"""Nuclear-norm minimization baseline (Arora et al. 2019, REFERENCE section 3) on small problems."""

from __future__ import annotations

import numpy as np
import pytest

cvxpy = pytest.importorskip(
    "cvxpy", reason="the nuclear-norm baseline needs cvxpy, installed by make test"
)

from implreg.baselines.nuclear import nuclear_norm_completion, nuclear_norm_sensing  # noqa: E402

# SCS accuracy used throughout (its defaults are 1e-4): tight enough for the checks below, loose
# enough to report "optimal" (a tighter eps gives "optimal_inaccurate" and a cvxpy warning).
SCS_OPTS = {"eps_abs": 1e-5, "eps_rel": 1e-5, "max_iters": 100_000}
SLACK = 1e-4  # allowed constraint violation beyond tol at that accuracy


def low_rank(rng: np.random.Generator, n: int, rank: int) -> np.ndarray:
    """A rank-`rank` n x n matrix with entries of RMS 1."""
    w = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, n))
    return w * (n / np.linalg.norm(w))


def observe(rng: np.random.Generator, w: np.ndarray, m: int):
    flat = rng.choice(w.size, size=m, replace=False)
    rows, cols = np.unravel_index(flat, w.shape)
    return rows, cols, w[rows, cols]


def nuc(x: np.ndarray) -> float:
    return float(np.linalg.norm(x, "nuc"))


@pytest.fixture(scope="module")
def completion_case():
    rng = np.random.default_rng(1234)
    w = low_rank(rng, 20, 2)
    rows, cols, y = observe(rng, w, 300)
    x = nuclear_norm_completion(w.shape, rows, cols, y, tol=1e-3, **SCS_OPTS)
    return w, rows, cols, y, x


def test_completion_returns_float64_of_shape(completion_case):
    w, *_, x = completion_case
    assert isinstance(x, np.ndarray)
    assert x.dtype == np.float64
    assert x.shape == w.shape


def test_completion_satisfies_constraints(completion_case):
    _, rows, cols, y, x = completion_case
    assert np.max(np.abs(x[rows, cols] - y)) <= 1e-3 + SLACK


def test_completion_recovers_low_rank_matrix(completion_case):
    w, *_, x = completion_case
    assert np.linalg.norm(x - w) / np.linalg.norm(w) < 1e-2


def test_completion_nuclear_norm_not_above_ground_truth(completion_case):
    w, *_, x = completion_case
    # The ground truth is feasible, so the minimizer's nuclear norm cannot exceed it.
    assert nuc(x) <= nuc(w) * (1 + 1e-4) + 1e-4


def test_completion_with_clarabel_matches_scs(completion_case):
    w, rows, cols, y, x_scs = completion_case
    x = nuclear_norm_completion(w.shape, rows, cols, y, tol=1e-3, solver="CLARABEL")
    assert np.max(np.abs(x[rows, cols] - y)) <= 1e-3 + 1e-6
    assert nuc(x) == pytest.approx(nuc(x_scs), rel=1e-4)


def test_completion_few_observations_is_feasible_and_minimal():
    # Too few observations to recover: still feasible and no larger in nuclear norm.
    rng = np.random.default_rng(7)
    w = low_rank(rng, 8, 2)
    rows, cols, y = observe(rng, w, 20)
    x = nuclear_norm_completion((8, 8), rows, cols, y, tol=1e-2, **SCS_OPTS)
    assert np.max(np.abs(x[rows, cols] - y)) <= 1e-2 + SLACK
    assert nuc(x) <= nuc(w) + 1e-4


def test_completion_rectangular_and_list_inputs():
    # Vec-order check for completion: on a rectangular matrix a row/column-major mix-up
    # would put the observations in the wrong places.
    rng = np.random.default_rng(11)
    w = rng.standard_normal((4, 1)) @ rng.standard_normal((1, 7))
    rows, cols = np.nonzero(np.ones_like(w))
    x = nuclear_norm_completion(
        [4, 7], rows.tolist(), cols.tolist(), w[rows, cols].tolist(), tol=1e-4, **SCS_OPTS
    )
    np.testing.assert_allclose(x, w, atol=1e-4 + SLACK)


def test_sensing_recovers_low_rank_matrix():
    rng = np.random.default_rng(2024)
    n, rank, m = 10, 1, 60
    w = low_rank(rng, n, rank)
    a = rng.standard_normal((m, n * n)) / n  # Gaussian measurements, entries N(0, 1/n^2)
    y = a @ w.reshape(-1)
    x = nuclear_norm_sensing((n, n), a, y, tol=1e-4, **SCS_OPTS)
    assert x.dtype == np.float64 and x.shape == (n, n)
    assert np.max(np.abs(a @ x.reshape(-1) - y)) <= 1e-4 + SLACK
    assert np.linalg.norm(x - w) / np.linalg.norm(w) < 1e-2
    assert nuc(x) <= nuc(w) * (1 + 1e-4) + 1e-4


def test_sensing_vec_order_is_row_major():
    # Measurements that read single entries of a non-symmetric rectangular matrix, flattened
    # in numpy's row-major order, must pin exactly those entries.
    target = np.arange(6.0).reshape(2, 3) + 1.0
    a = np.eye(6)
    x = nuclear_norm_sensing((2, 3), a, target.reshape(-1), tol=1e-6, solver="CLARABEL")
    np.testing.assert_allclose(x, target, atol=1e-5)
    # An A_i that is not a single entry, <A_0, X> = X[0, 0] + 2 X[1, 2], with X[0, 0] left
    # to be determined by it (the other five entries are pinned).
    a0 = np.zeros((2, 3))
    a0[0, 0], a0[1, 2] = 1.0, 2.0
    a = np.vstack([a0.reshape(-1), np.eye(6)[1:]])
    y = a @ target.reshape(-1)
    x = nuclear_norm_sensing((2, 3), a, y, tol=1e-6, solver="CLARABEL")
    np.testing.assert_allclose(x, target, atol=1e-5)


def test_sensing_equals_completion_for_selection_measurements(completion_case):
    w, rows, cols, y, x_completion = completion_case
    a = np.zeros((y.size, w.size))
    a[np.arange(y.size), np.ravel_multi_index((rows, cols), w.shape)] = 1.0
    x = nuclear_norm_sensing(w.shape, a, y, tol=1e-3, **SCS_OPTS)
    assert nuc(x) == pytest.approx(nuc(x_completion), rel=1e-4)


OK = {"shape": (3, 3), "rows": [0, 1], "cols": [1, 2], "y": [1.0, 2.0]}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"tol": 0.0}, "tol must be a positive"),
        ({"tol": -1e-3}, "tol must be a positive"),
        ({"rows": [0, 1, 2]}, "same length"),
        ({"y": [1.0]}, "same length"),
        ({"rows": [0, 3]}, "rows must lie in"),
        ({"cols": [-1, 0]}, "cols must lie in"),
        ({"rows": [0, 0], "cols": [1, 1]}, "distinct"),
        ({"rows": [0.0, 1.0]}, "integers"),
        ({"shape": (3,)}, "two entries"),
        ({"shape": (0, 3)}, "positive integers"),
        ({"y": [1.0, np.nan]}, "finite"),
        ({"shape": (1, 1)}, "more than the 1 entries"),
        ({"solver": "NOT_A_SOLVER"}, "not installed"),
    ],
)
def test_completion_bad_inputs(change, match):
    kwargs = {**OK, **change}
    extra = {k: kwargs.pop(k) for k in ("tol", "solver") if k in kwargs}
    with pytest.raises(ValueError, match=match):
        nuclear_norm_completion(
            kwargs["shape"], kwargs["rows"], kwargs["cols"], kwargs["y"], **extra
        )


@pytest.mark.parametrize(
    ("shape", "a", "y", "tol", "match"),
    [
        ((2, 2), np.ones((3, 4)), np.ones(3), 0.0, "tol must be a positive"),
        ((2, 2), np.ones((3, 5)), np.ones(3), 1e-3, "A must have shape"),
        ((2, 2), np.ones(4), np.ones(1), 1e-3, "A must have shape"),
        ((2, 2), np.ones((3, 4)), np.ones(2), 1e-3, "same number of measurements"),
        ((2, 2), np.ones((3, 4)), np.ones((3, 1)), 1e-3, "one-dimensional"),
        ((2, 2), np.full((1, 4), np.inf), np.ones(1), 1e-3, "finite"),
    ],
)
def test_sensing_bad_inputs(shape, a, y, tol, match):
    with pytest.raises(ValueError, match=match):
        nuclear_norm_sensing(shape, a, y, tol=tol)


def test_infeasible_problem_raises_runtime_error():
    # The same entry measured twice with values 1 apart cannot be met within tol.
    a = np.array([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    with pytest.raises(RuntimeError, match="status"):
        nuclear_norm_sensing((2, 2), a, np.array([0.0, 1.0]), tol=1e-3, solver="CLARABEL")


def test_missing_cvxpy_gives_install_hint(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cvxpy", None)  # makes `import cvxpy` raise ImportError
    with pytest.raises(ImportError, match="pip install cvxpy"):
        nuclear_norm_completion((2, 2), [0], [1], [1.0])
    with pytest.raises(ImportError, match="pip install cvxpy"):
        nuclear_norm_sensing((2, 2), np.ones((1, 4)), [1.0])
