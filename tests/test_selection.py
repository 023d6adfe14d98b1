"""Tests for sensprune.selection (global and per-row top-k)."""

import numpy as np

from sensprune import selection


def test_global_topk_keeps_largest_over_layers():
    rng = np.random.default_rng(0)
    scores = {"a": rng.random((4, 5)), "b": rng.random((3,))}
    alive = {"a": np.ones((4, 5), bool), "b": np.array([True, False, True])}
    masks = selection.global_topk(scores, alive, 7)
    assert sum(m.sum() for m in masks.values()) == 7
    kept = np.concatenate([scores["a"][masks["a"]], scores["b"][masks["b"]]])
    dropped = np.concatenate([scores["a"][~masks["a"]], scores["b"][alive["b"] & ~masks["b"]]])
    assert kept.min() >= dropped.max()
    assert not masks["b"][1]  # pruned entries are never revived


def test_global_topk_budget_larger_than_alive():
    scores = {"a": np.array([0.0, 0.0, 1.0])}
    alive = {"a": np.array([True, False, True])}
    masks = selection.global_topk(scores, alive, 10)
    np.testing.assert_array_equal(masks["a"], alive["a"])


def test_global_topk_ties_hit_budget_exactly():
    scores = {"a": np.ones((10,)), "b": np.ones((10,))}
    alive = {k: np.ones(10, bool) for k in scores}
    masks = selection.global_topk(scores, alive, 13)
    assert masks["a"].sum() + masks["b"].sum() == 13


def test_topk_per_row_matches_sorting():
    rng = np.random.default_rng(1)
    s = rng.random((5, 8))
    alive = rng.random((5, 8)) > 0.2
    counts = np.array([0, 1, 3, 8, 2])
    mask = selection.topk_per_row(s, alive, counts)
    for r in range(5):
        want = min(counts[r], alive[r].sum())
        assert mask[r].sum() == want
        assert not np.any(mask[r] & ~alive[r])
        if want:
            assert s[r][mask[r]].min() >= np.max(s[r][alive[r] & ~mask[r]], initial=-1)
