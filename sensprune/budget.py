"""Budget accounting and the search for the nominal budget that meets a keep ratio.

The keep ratio is the fraction of *all* parameters (biases and norm parameters
included, counted as nonzero entries) that remain, relative to a reference
size (by default the dense parameter count). Only kernels of prunable layers
are pruned, so everything else counts as kept. Methods receive a nominal budget
of kernel entries; because rounding, sampling and channel propagation make the
achieved count differ from it, :func:`search_budget` bisects on the nominal
budget (with the method's scores computed once) until the achieved size is
within ``rtol`` of the target.
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

    Args:
      achieved: nominal budget -> achieved total size (about nondecreasing).
      target: the total size wanted.
      guess: first budget to try (exact for deterministic weight methods).
      upper: largest meaningful budget (all alive kernel entries).
      rtol: relative tolerance on the achieved size.
      max_iters: evaluation limit.

    Returns:
      ``(budget, achieved size, within_tolerance)``; when the tolerance cannot
      be met, the closest budget found.
    """
    lo, hi = 0, int(upper)
    b = int(min(max(guess, 0), upper))
    best: Optional[tuple[int, int, float]] = None
    for _ in range(max_iters):
        size = achieved(b)
        gap = abs(size - target)
        if best is None or gap < best[2]:
            best = (b, size, gap)
        if gap <= rtol * target:
            return b, size, True
        if size > target:
            hi = b - 1
        else:
            lo = b + 1
        if lo > hi:
            break
        b = (lo + hi) // 2
    assert best is not None  # the loop runs at least once
    return best[0], best[1], False
