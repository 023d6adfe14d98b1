"""Tests for sensprune.sampling: E[#unique] relations and unbiased reweighting."""

import jax
import numpy as np
import pytest

from sensprune import sampling


def _random_p(rng, rows, n, zeros=0):
    p = rng.random((rows, n)) ** 3
    p[:, :zeros] = 0.0
    return p / p.sum(-1, keepdims=True)


def test_expected_unique_matches_monte_carlo():
    rng = np.random.default_rng(0)
    p = _random_p(rng, 3, 12)
    m = np.array([1.0, 7.0, 30.0])
    exact = sampling.expected_unique(p, m)
    draws = [
        np.mean([len(np.unique(rng.choice(12, size=int(mi), p=pi))) for _ in range(4000)])
        for pi, mi in zip(p, m)
    ]
    np.testing.assert_allclose(exact, draws, atol=0.1)
    assert exact[0] == pytest.approx(1.0)


def test_draws_for_unique_inverts_expected_unique():
    rng = np.random.default_rng(1)
    p = _random_p(rng, 5, 40, zeros=5)
    target = np.array([1, 3.5, 10, 20, 34])
    m = sampling.draws_for_unique(p, target)
    assert np.all(sampling.expected_unique(p, m) >= target - 1e-6)
    assert np.all(sampling.expected_unique(p, m - 1) < target)


def test_draws_for_unique_caps_and_zero_rows():
    p = np.zeros((3, 4))
    p[0] = [0.5, 0.5, 0, 0]
    p[1] = [0.25] * 4
    m = sampling.draws_for_unique(p, np.array([5.0, 0.5, 2.0]))
    # Row 0: target capped at support - 1 = 1 draw suffices; row 1: target < 1; row 2: empty support.
    assert m[0] == 1 and m[1] == 0 and m[2] == 0


def test_reweighted_counts_are_unbiased():
    """Mean over many keys of count/(m p) is 1 for every entry (5-sigma z-test per entry)."""
    rng = np.random.default_rng(2)
    p = _random_p(rng, 4, 10).astype(np.float32)
    draws = np.array([3, 8, 15, 40])
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    factors = np.stack([sampling.reweight_factors(sampling.sample_counts(k, p, draws), p, draws) for k in keys])
    mean = factors.mean(0)
    # Var[c/(mp)] = (1-p)/(m p); the standard error of the mean over K keys follows.
    se = np.sqrt((1 - p) / (draws[:, None] * p) / len(keys))
    assert np.all(np.abs(mean - 1.0) <= 5 * se + 1e-3), np.max(np.abs(mean - 1) / se)
    # Counts sum to the number of draws.
    counts = np.stack([sampling.sample_counts(k, p, draws) for k in keys[:10]])
    np.testing.assert_array_equal(counts.sum(-1), np.broadcast_to(draws, (10, 4)))


def test_same_key_same_sample():
    p = _random_p(np.random.default_rng(3), 2, 6).astype(np.float32)
    a = sampling.sample_counts(jax.random.PRNGKey(5), p, np.array([4, 9]))
    b = sampling.sample_counts(jax.random.PRNGKey(5), p, np.array([4, 9]))
    c = sampling.sample_counts(jax.random.key(5), p, np.array([4, 9]))  # new-style keys work too
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert not np.array_equal(a, sampling.sample_counts(jax.random.PRNGKey(6), p, np.array([4, 9])))


def test_split_key_host_seeds_deterministic_distinct_and_key_kinds_agree():
    """Per-layer seeds come from the key on the host: same key, same counts; layers and keys
    get different streams; a typed key and its legacy uint32 form give the same seeds."""
    p = np.full((3, 50), 1.0 / 50)
    draws = np.array([20, 20, 20])
    seeds = sampling.split_key(jax.random.PRNGKey(3), 4)
    again = sampling.split_key(jax.random.PRNGKey(3), 4)
    typed = sampling.split_key(jax.random.key(3), 4)
    for a, b, c in zip(seeds, again, typed):
        np.testing.assert_array_equal(sampling.sample_counts(a, p, draws), sampling.sample_counts(b, p, draws))
        np.testing.assert_array_equal(a, c)
    counts = [sampling.sample_counts(s, p, draws) for s in seeds]
    assert all(not np.array_equal(counts[0], c) for c in counts[1:])
    other = sampling.sample_counts(sampling.split_key(jax.random.PRNGKey(4), 1)[0], p, draws)
    assert not np.array_equal(counts[0], other)
    assert sampling.split_key(None, 2)[1].tolist() == sampling.split_key(jax.random.PRNGKey(0), 2)[1].tolist()
