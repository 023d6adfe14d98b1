"""Ranking once per prune call (sensprune.selection.rank_globally / top_of, rank_rows / top_per_row)
selects exactly what a sort per budget selected: unit level and whole prune calls."""

import jax
import numpy as np
import pytest

import sensprune as sp
from sensprune import selection
from tests.fixtures import CNN, digits, mlp, np_init


def sorted_per_budget(scores, alive, budget):
    """The selection as it was before ranking once: a fresh stable sort at each budget."""
    names = list(scores)
    flat = np.concatenate([np.where(alive[n], np.asarray(scores[n], np.float64), -np.inf).ravel() for n in names])
    budget = int(min(max(budget, 0), np.sum(np.isfinite(flat))))
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-flat, kind="stable")[:budget]] = True
    out, start = {}, 0
    for n in names:
        out[n] = keep[start : start + np.size(scores[n])].reshape(np.shape(scores[n]))
        start += np.size(scores[n])
    return out


def rows_sorted_per_budget(scores, alive, counts):
    """Per row, the ``counts[row]`` best alive entries by a fresh per-row sort (ties: earlier first)."""
    out = np.zeros(scores.shape, bool)
    for r in range(scores.shape[0]):
        idx = np.flatnonzero(alive[r])
        order = idx[np.argsort(-scores[r][idx], kind="stable")]
        out[r, order[: int(counts[r])]] = True
    return out


def test_top_of_equals_a_sort_per_budget_at_every_budget():
    rng = np.random.default_rng(3)
    scores = {"a": rng.integers(0, 5, (6, 7)).astype(np.float32), "b": rng.random(11), "c": np.zeros((2, 3))}
    alive = {n: rng.random(np.shape(s)) > 0.25 for n, s in scores.items()}
    ranking = selection.rank_globally(scores, alive)
    n_alive = sum(int(a.sum()) for a in alive.values())
    for budget in [-3, 0, 1, 5, 17, n_alive - 1, n_alive, n_alive + 4]:
        got, want = selection.top_of(ranking, budget), sorted_per_budget(scores, alive, budget)
        for n in scores:
            np.testing.assert_array_equal(got[n], want[n], err_msg=f"{n} at budget {budget}")
        assert sum(int(m.sum()) for m in got.values()) == min(max(budget, 0), n_alive)


def test_top_per_row_equals_a_sort_per_row_and_count():
    rng = np.random.default_rng(4)
    s = rng.integers(0, 4, (6, 9)).astype(np.float64)  # many ties
    alive = rng.random((6, 9)) > 0.3
    ranks = selection.rank_rows(s, alive)
    for _ in range(5):
        counts = rng.integers(0, 11, 6)
        np.testing.assert_array_equal(
            selection.top_per_row(ranks, alive, counts), rows_sorted_per_budget(s, alive, counts)
        )


@pytest.fixture
def sort_per_budget(monkeypatch):
    """Routes the methods' selection through a fresh sort at every budget (the old path)."""
    monkeypatch.setattr(selection, "rank_globally", lambda scores, alive: (scores, alive))
    monkeypatch.setattr(selection, "top_of", lambda ranked, budget: sorted_per_budget(*ranked, budget))
    monkeypatch.setattr(selection, "rank_rows", lambda scores, alive: (scores, alive))
    monkeypatch.setattr(selection, "top_per_row", lambda ranked, alive, counts: rows_sorted_per_budget(
        *ranked, np.minimum(counts, alive.sum(-1))))


def _prune_all(model, variables, x, y, methods):
    out = {}
    for method, keep in methods:
        result = sp.prune(model, variables, x, method=method, keep_ratio=keep, labels=y,
                          key=jax.random.PRNGKey(7), apply_kwargs={"train": False})
        out[method] = (jax.tree.map(np.asarray, result.masks), result.info["nominal_budget"], result.keep_ratio)
    return out


CASES = [
    ("mlp", [("wt", 0.2), ("sipp", 0.15), ("random", 0.3), ("snip", 0.25), ("sipp_hybrid", 0.2)]),
    ("cnn", [("sipp", 0.3), ("wt", 0.4)]),
]


@pytest.mark.parametrize("net,methods", CASES, ids=[c[0] for c in CASES])
def test_prune_masks_identical_to_sorting_per_budget(net, methods, request):
    x, y = digits()
    x, y = x[:48], y[:48]
    if net == "mlp":
        model, variables = mlp()
    else:
        model = CNN()
        variables = np_init(model, x[:1], seed=1)
    fast = _prune_all(model, variables, x, y, methods)
    request.getfixturevalue("sort_per_budget")
    slow = _prune_all(model, variables, x, y, methods)
    for method, _ in methods:
        (masks_f, budget_f, ratio_f), (masks_s, budget_s, ratio_s) = fast[method], slow[method]
        assert budget_f == budget_s and ratio_f == ratio_s, method
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, err_msg=method), masks_f, masks_s)
