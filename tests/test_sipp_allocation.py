"""The SiPP-rand allocation solves its convex program (checked against SciPy)."""

import numpy as np
import pytest
from scipy import optimize

from sensprune.methods import sipp


def _objective(x, a, w):
    return float(np.sum(w * sipp.rand_error(a, x)))


def test_rand_error_inverts_sample_complexity():
    a = np.array([3.7, 0.2, 50.0])
    eps = np.array([0.4, 0.05, 2.0])
    x = sipp.samples_for_error(a, eps)
    np.testing.assert_allclose(sipp.rand_error(a, x), eps, rtol=1e-9)
    # More samples, smaller error.
    assert np.all(np.diff(sipp.rand_error(np.full(5, 2.0), np.array([1, 2, 5, 10, 100]))) < 0)


def test_allocation_matches_scipy_on_small_problem():
    rng = np.random.default_rng(0)
    a = rng.random(8) * 5 + 0.1
    w = np.repeat([1 / 3, 1 / 5], [3, 5])
    cap = rng.integers(5, 40, size=8).astype(float)
    budget = 60.0
    ours = sipp.allocate_rows(a, w, cap, budget)
    assert ours.sum() == pytest.approx(budget, rel=1e-6)
    assert np.all(ours >= 0) and np.all(ours <= cap + 1e-9)
    ref = optimize.minimize(
        lambda x: _objective(x, a, w),
        x0=np.full(8, budget / 8),
        bounds=[(1e-6, c) for c in cap],
        constraints=[{"type": "ineq", "fun": lambda x: budget - x.sum()}],
        method="SLSQP",
        options={"ftol": 1e-12, "maxiter": 500},
    )
    assert ref.success
    assert _objective(ours, a, w) <= _objective(ref.x, a, w) + 1e-6


def test_allocation_kkt_equal_marginals():
    rng = np.random.default_rng(1)
    a = rng.random(20) + 0.05
    w = np.full(20, 0.05)
    cap = np.full(20, 1e6)
    x = sipp.allocate_rows(a, w, cap, 300.0)
    h = 1e-4
    marg = w * (sipp.rand_error(a, x - h) - sipp.rand_error(a, x + h)) / (2 * h)
    np.testing.assert_allclose(marg, marg.mean(), rtol=1e-3)


def test_allocation_edge_cases():
    a = np.array([1.0, 0.0, 2.0])
    cap = np.array([5.0, 5.0, 0.0])
    w = np.ones(3)
    # Rows with a = 0 or cap = 0 get nothing; a budget above the capacity fills the caps.
    np.testing.assert_array_equal(sipp.allocate_rows(a, w, cap, 100.0), [5.0, 0.0, 0.0])
    np.testing.assert_array_equal(sipp.allocate_rows(a, w, cap, 0.0), [0.0, 0.0, 0.0])
