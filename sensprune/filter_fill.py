"""Meeting a kernel budget removal by removal (shared by the filter methods).

A filter method orders every layer's removals (its own rule: ThiNet's greedy
reconstruction order, PFP's sensitivities, FT's filter norms) and says *when*
each removal happens as its one global knob moves (a kept fraction shared by
all layers, PFP's epsilon): :func:`interleave` sorts all removals by that time
into one schedule, so any prefix of it is the method's own configuration at
some value of the knob, up to one removal. :func:`fill_schedule` picks the
removals meeting a budget: the shortest prefix keeping at most the budget,
unless its last step is coarse (it frees a whole channel group, e.g. an
attention head, and undershoots the budget); then that layer either stops
before the step while the others keep removing, or takes it while the others
remove less, whichever keeps more entries within the budget.

A step is ``(layer name, item)``; an item is whatever the method's size model
reads, usually a channel index or a tuple of them (:func:`keep_after`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from sensprune.types import Layer

Step = tuple[str, Any]
SLACK = 0.002  # undershoot of the budget (fraction of the kernel entries) above which a layer stops


def interleave(layers: Sequence[Layer], timed: Mapping[str, Sequence[tuple[float, Any]]]) -> list[Step]:
    """All removals ``(layer name, item)`` sorted by time, latest-first knob order.

    ``timed``: layer name -> ``(time, item)`` of each removal in the layer's own order, with
    nonincreasing times (a larger time happens earlier; ``inf``: at once). Ties go by layer
    order, then by the layer's own order.
    """
    order = {layer.name: layer.order for layer in layers}
    steps = [(-float(t), order[name], i, name, item) for name, seq in timed.items() for i, (t, item) in enumerate(seq)]
    steps.sort(key=lambda s: s[:3])
    return [(name, item) for *_, name, item in steps]


def fraction_times(order: Sequence[Any], round_to: int = 1) -> list[tuple[float, Any]]:
    """``(time, item)`` removals of a layer keeping a fraction ``f`` of its ``n`` live channels.

    The layer keeps ``round(f * n)`` channels (at least one; with ``round_to > 1`` rounded up to
    a multiple of it, or all ``n``); ``order`` holds its live channels in removal order. A step
    goes once ``f`` drops below ``(k + 0.5) / n``, ``k`` the count it leaves; its item is a
    channel (``round_to == 1``) or the tuple of channels it removes.
    """
    n = len(order)
    if round_to == 1:
        return [((n - j + 0.5) / n, int(order[j - 1])) for j in range(1, n)]
    counts = [k for k in range(n - 1, 0, -1) if k % round_to == 0]
    out, gone = [], 0
    for k in counts:
        out.append(((k + 0.5) / n, tuple(int(c) for c in order[gone : n - k])))
        gone = n - k
    return out


def removal_schedule(layers: Sequence[Layer], orders, live, protected, round_to: int = 1) -> list[Step]:
    """Every removal in the order a falling kept fraction makes them (:func:`fraction_times`).

    ``orders``: layer name -> its live channels in removal order (the last one is never removed);
    ``live``: layer name -> bool ``[channels]``; layers in ``protected`` and without live channels
    are left out. Any prefix keeps every layer within one removal of one common fraction, so the
    budget can be met removal by removal instead of in the coarse steps of one shared fraction.
    """
    timed = {}
    for layer in layers:
        name = layer.name
        n = int(np.sum(live[name]))
        if name in protected or n == 0:
            continue
        timed[name] = fraction_times(list(orders[name][:n]), round_to)
    return interleave(layers, timed)


def keep_after(live: Mapping[str, np.ndarray], removals: Sequence[Step]) -> dict[str, np.ndarray]:
    """Channels kept once these removals (items: a channel or a tuple of channels) are made."""
    keep = {name: np.array(mask, bool) for name, mask in live.items()}
    for name, item in removals:
        keep[name][np.asarray(item, np.int64)] = False
    return keep


def shortest_prefix(size: Callable[[int], int], steps: int, budget: int) -> int:
    """Fewest steps ``m`` in ``[0, steps]`` with ``size(m) <= budget`` (``steps`` if none); ``size`` nonincreasing."""
    lo, hi = 0, steps
    while lo < hi:
        mid = (lo + hi) // 2
        if size(mid) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return lo


def fill_schedule(
    size_of: Callable[[list[Step]], int], schedule: Sequence[Step], budget: int, slack: int
) -> tuple[list[Step], list[str]]:
    """The removals meeting ``budget``: a prefix of ``schedule``, unless its last step is coarse.

    ``size_of(removals)`` is the kept size after a list of removals (nonincreasing along any
    prefix). The shortest prefix keeping at most ``budget`` is taken; when it undershoots the
    budget by more than ``slack`` (its last step freed a whole channel group, e.g. an attention
    head), that step's layer stops: either before the step, the later removals of the other
    layers filling the budget (repeated while it helps), or right after it, the other layers
    removing only as much as the budget still needs. Of all these the one keeping the most
    entries within the budget is returned (the first such on ties).

    Returns:
      ``(removals, layers stopped at a coarse step)``.
    """
    taken: list[Step] = []
    frozen: list[str] = []
    rest = list(schedule)
    best: tuple[list[Step], int, list[str]] | None = None

    def consider(candidate: list[Step], stopped: list[str]) -> int:
        nonlocal best
        kept = size_of(candidate)
        if best is None or best[1] > budget or budget >= kept > best[1]:
            best = (candidate, kept, stopped)
        return kept

    for _ in range(len(schedule) + 1):
        m = shortest_prefix(lambda k: size_of(taken + rest[:k]), len(rest), budget)
        kept = consider(taken + rest[:m], list(frozen))
        if m == 0 or kept > budget or budget - kept <= slack:
            break
        layer = rest[m - 1][0]
        # the layer takes its coarse step; the others remove only what the budget still needs
        pinned = taken + [step for step in rest[:m] if step[0] == layer]
        others = [step for step in rest[: m - 1] if step[0] != layer]
        k = shortest_prefix(lambda j: size_of(pinned + others[:j]), len(others), budget)
        consider(pinned + others[:k], frozen + [layer])
        # or it stops before the step, and the others go on
        frozen.append(layer)
        taken = taken + rest[: m - 1]
        rest = [step for step in rest[m:] if step[0] != layer]
    assert best is not None
    return best[0], best[2]
