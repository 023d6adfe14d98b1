"""The keep-ratio search over the nominal budget (sensprune.budget.search_budget): secant steps
safeguarded by bisection, against a plain bisection written here."""

import math

import numpy as np
import pytest

from sensprune import budget


def bisection(achieved, target, guess, upper, rtol=0.005, max_iters=48):
    """The search as it was before secant steps: bisection from the guess."""
    lo, hi, b, best = 0, upper, min(max(guess, 0), upper), None
    for _ in range(max_iters):
        size = achieved(b)
        if best is None or abs(size - target) < best[2]:
            best = (b, size, abs(size - target))
        if abs(size - target) <= rtol * target:
            return b, size, True
        lo, hi = (lo, b - 1) if size > target else (b + 1, hi)
        if lo > hi:
            break
        b = (lo + hi) // 2
    return best[0], best[1], False


def counted(fn):
    calls = []

    def achieved(b):
        calls.append(b)
        return int(fn(b))

    return achieved, calls


def zeroing_like(fixed, dead_share, upper):
    """Size as with zeroing: a share of the kept entries (growing with the budget) is dead."""
    return lambda b: fixed + b - int(dead_share * b * (1.0 + 0.3 * b / upper))


@pytest.mark.parametrize("dead_share", [0.0, 0.02, 0.07, 0.2])
def test_meets_the_tolerance_in_few_evaluations_where_bisection_needs_many(dead_share):
    upper, fixed = 270_000, 1_600
    target = 0.5 * (upper + fixed)
    fn = zeroing_like(fixed, dead_share, upper)
    achieved, calls = counted(fn)
    b, size, ok = budget.search_budget(achieved, target, int(target - fixed), upper)
    assert ok and abs(size - target) <= 0.005 * target and size == fn(b)
    assert len(calls) <= 3
    slow, slow_calls = counted(fn)
    bisection(slow, target, int(target - fixed), upper)
    if dead_share >= 0.07:
        assert len(slow_calls) >= 5  # what it replaces


@pytest.mark.parametrize("seed", range(8))
def test_out_of_reach_ends_where_bisection_ends(seed):
    """Staircases with steps wider than the tolerance (odd seeds: not monotone, as filter methods'
    sizes can be): out of reach, the answer is the bisection's; within reach, a size within it."""
    rng = np.random.default_rng(seed)
    upper = 50_000
    edges = np.sort(rng.choice(upper, 40, replace=False))
    heights = np.cumsum(rng.integers(500, 3000, 41) if seed % 2 == 0 else rng.integers(-800, 3000, 41)) + 40_000

    def fn(b):
        return heights[np.searchsorted(edges, b, side="right")]

    target = float(rng.integers(heights[3], heights[-3]))
    guess = int(rng.integers(0, upper))
    achieved, calls = counted(fn)
    got = budget.search_budget(achieved, target, guess, upper, rtol=0.001)
    want = bisection(lambda b: int(fn(b)), target, guess, upper, rtol=0.001)
    if not want[2]:
        assert got == want  # out of reach: the bisection's answer, as before
    else:
        assert got[2] and abs(got[1] - target) <= 0.001 * target
    assert len(set(calls)) <= 3 * math.ceil(math.log2(upper)) + 2


@pytest.mark.parametrize("seed", range(4))
def test_noisy_sizes_still_end_within_the_limit(seed):
    """Sampling methods are only about nondecreasing: the search stays bounded; a size within the
    tolerance, or the bisection's answer."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(-400, 400, 100_001)
    achieved, calls = counted(lambda b: 1_000 + b + noise[b])
    got = budget.search_budget(achieved, 40_000.0, 10, 100_000, rtol=0.0)
    assert len(calls) <= 64 + 48 and got[1] == 1_000 + got[0] + noise[got[0]]
    if not got[2]:
        assert got == bisection(lambda b: 1_000 + b + noise[b], 40_000.0, 10, 100_000, rtol=0.0)


@pytest.mark.parametrize("method,keep", [("sipp", 0.3), ("wt", 0.2), ("pfp", 0.5)])
def test_prune_with_zeroing_meets_the_ratio_in_no_more_selections_than_bisection(method, keep, monkeypatch):
    import sensprune as sp
    from tests.fixtures import CNN, digits, np_init

    x, y = digits()
    model = CNN()
    variables = np_init(model, x[:1], seed=2)

    def run():
        return sp.prune(model, variables, x[:32], method=method, keep_ratio=keep, labels=y[:32],
                        apply_kwargs={"train": False})

    new = run()
    monkeypatch.setattr(budget, "search_budget", bisection)
    old = run()
    assert new.info["zero_dead"]["kernel"] + new.info["zero_dead"]["other"] > 0  # zeroing freed budget
    for result in (new, old):
        assert result.info["reachable"] and abs(result.keep_ratio - keep) <= 0.005 * keep
    assert new.info["searches"] <= min(3, old.info["searches"])  # here 2/2/3 against 9/6/5
