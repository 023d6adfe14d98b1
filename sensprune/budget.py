"""Budget accounting and the search for the nominal budget that meets a keep ratio.

The keep ratio is the fraction of *all* parameters (biases and norm parameters
included, counted as nonzero entries) that remain, relative to a reference
size (by default the dense parameter count). Only kernels of prunable layers
are pruned, so everything else counts as kept. Methods receive a nominal budget
of kernel entries; because rounding, sampling and channel propagation make the
achieved count differ from it, :func:`search_budget` searches the nominal
budget (secant steps, safeguarded by bisection; the method's scores computed
once) until the achieved size is within ``rtol`` of the target.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np


def validate_keep_ratio(keep_ratio: float, field: str = "keep_ratio") -> float:
    """Returns ``keep_ratio`` as float or raises a ValueError naming the field."""
    if isinstance(keep_ratio, (bool, np.bool_, str, bytes)):  # float(True) == 1.0, float("0.5") == 0.5
        raise ValueError(f"{field} must be a number in (0, 1], got {keep_ratio!r}")
    try:
        value = float(keep_ratio)
    except (TypeError, ValueError):
        raise ValueError(f"{field} must be a number in (0, 1], got {keep_ratio!r}") from None
    if not (0.0 < value <= 1.0) or not np.isfinite(value):
        raise ValueError(f"{field} must be in (0, 1], got {keep_ratio!r}")
    return value


def search_budget(
    achieved: Callable[[int], int],
    target: float,
    guess: int,
    upper: int,
    rtol: float = 0.005,
    max_iters: int = 48,
) -> tuple[int, int, bool]:
    """Finds a nominal budget ``b`` in [0, upper] with ``achieved(b)`` close to ``target``.

    First a safeguarded secant search (as the reference's Brent search over the
    nominal ratio): each step aims at the target along the line through the last
    two evaluations (slope 1 after the first: one nominal entry, one kept entry),
    inside the bracket of budgets not yet ruled out; a step outside the bracket,
    a non-increasing line, or a secant step that halved neither its bracket nor
    the gap to the target makes the next step bisect. With data-dependent zeroing
    (each evaluation a gradient pass over S) it typically meets ``rtol`` in 2-3
    evaluations where bisecting took 7-9; the budget it returns is then another
    one within ``rtol``. Where it does not meet ``rtol``, the plain bisection from
    ``guess`` runs (evaluations shared), and its answer is returned: a target out
    of reach ends exactly where it always did.

    Args:
      achieved: nominal budget -> achieved total size (about nondecreasing).
      target: the total size wanted.
      guess: first budget to try (exact for deterministic weight methods).
      upper: largest meaningful budget (all alive kernel entries).
      rtol: relative tolerance on the achieved size.
      max_iters: evaluation limit of the bisection (the secant search: 4/3 of it).

    Returns:
      ``(budget, achieved size, within_tolerance)``; when the tolerance cannot
      be met, the closest budget the bisection found.
    """
    sizes: dict[int, int] = {}

    def cached(b: int) -> int:
        if b not in sizes:
            sizes[b] = int(achieved(b))
        return sizes[b]

    found = _bracket_search(cached, target, guess, upper, rtol, max_iters + max_iters // 3)
    return found if found[2] else _bracket_search(cached, target, guess, upper, rtol, max_iters, secant=False)


def _bracket_search(
    achieved: Callable[[int], int], target: float, guess: int, upper: int, rtol: float, max_iters: int,
    *, secant: bool = True,
) -> tuple[int, int, bool]:
    """Bisection on the budget from ``guess``, with secant steps where they shrink the bracket
    (``secant``, :func:`search_budget`); the first budget within ``rtol``, else
    ``(budget, size, False)`` of the closest evaluated."""
    lo, hi = 0, int(upper)
    b = int(min(max(guess, 0), upper))
    best: Optional[tuple[int, int, float]] = None
    previous: Optional[tuple[int, int]] = None
    from_secant = False  # whether b came from a secant step
    for _ in range(max_iters):
        size = achieved(b)
        gap = abs(size - target)
        if best is None or gap < best[2]:
            best = (b, size, gap)
        if gap <= rtol * target:
            return b, size, True
        width = hi - lo
        if size > target:
            hi = b - 1
        else:
            lo = b + 1
        if lo > hi:
            break
        # a secant step that neither halved the bracket nor the gap to the target: bisect next
        slow = from_secant and 2 * (hi - lo) > width and previous is not None and 2 * gap > abs(previous[1] - target)
        step = None if slow or not secant else _secant_step(b, size, previous, target)
        previous = (b, size)
        from_secant = step is not None and lo <= step <= hi
        b = step if from_secant and step is not None else (lo + hi) // 2
    assert best is not None  # the loop runs at least once
    return best[0], best[1], False


def _secant_step(b: int, size: int, previous: Optional[tuple[int, int]], target: float) -> Optional[int]:
    """The budget where the line through ``(b, size)`` and ``previous`` (slope 1 without one)
    reaches ``target``; None when that line does not increase."""
    slope = 1.0 if previous is None else (size - previous[1]) / (b - previous[0]) if b != previous[0] else 0.0
    if not slope > 0:
        return None
    return int(round(b + (target - size) / slope))
