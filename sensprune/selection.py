"""Deterministic selection of kept entries from scores: global and per-row top-k.

Scores are dicts ``layer name -> array``; entries that are already pruned must
be passed in ``alive=False`` and are never selected, so iterative pruning keeps
every previously pruned weight pruned. Ties are broken by position, so the
kept count always equals the requested budget (capped by the alive count).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class GlobalRanking:
    """Every entry of every layer ranked once, best alive first: a top-B at any budget is then
    one comparison per entry (:func:`top_of`), not a sort per budget.

    Attributes:
      rank: flat int array over the layers' entries (in ``names`` order): position of each
        entry in the stable descending order of its score (dead entries score -inf).
      alive: how many entries may be kept (the budget's cap).
      names, shapes: the layers and their score shapes.
    """

    rank: np.ndarray
    alive: int
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]


def rank_globally(scores: Mapping[str, np.ndarray], alive: Mapping[str, np.ndarray]) -> GlobalRanking:
    """Ranks the alive entries of all layers by score (ties: the earlier position first)."""
    names = tuple(scores)
    flat = [np.where(alive[n], np.asarray(scores[n], np.float64), -np.inf).ravel() for n in names]
    everything = np.concatenate(flat) if flat else np.zeros(0)
    n_alive = int(np.sum(np.isfinite(everything)))
    order = np.argsort(-everything, kind="stable")  # stable on -score: ties keep the earlier position first
    rank = np.empty(order.size, np.int32 if order.size < 2**31 else np.int64)
    rank[order] = np.arange(order.size, dtype=rank.dtype)
    return GlobalRanking(rank, n_alive, names, tuple(np.shape(scores[n]) for n in names))


def top_of(ranking: GlobalRanking, budget: int) -> dict[str, np.ndarray]:
    """Layer name -> bool mask of the ``budget`` best-ranked entries (at most the alive ones):
    the first ``budget`` entries of the ranking's order, i.e. exactly :func:`global_topk`."""
    budget = int(min(max(budget, 0), ranking.alive))
    keep = ranking.rank < budget
    out, start = {}, 0
    for name, shape in zip(ranking.names, ranking.shapes):
        size = int(np.prod(shape, dtype=np.int64))
        out[name] = keep[start : start + size].reshape(shape)
        start += size
    return out


def global_topk(
    scores: Mapping[str, np.ndarray], alive: Mapping[str, np.ndarray], budget: int
) -> dict[str, np.ndarray]:
    """Keeps the ``budget`` highest-scoring alive entries over all layers.

    Args:
      scores: layer name -> scores (any shape).
      alive: layer name -> bool array of the same shape (False = already pruned).
      budget: number of entries to keep in total.

    Returns:
      Layer name -> bool mask of the same shape as its scores. Selecting at many
      budgets from the same scores: rank once (:func:`rank_globally`), then :func:`top_of`.
    """
    return top_of(rank_globally(scores, alive), budget)


def rank_rows(scores: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """Per row of ``scores [rows, n]``: each entry's position in the row's stable descending
    order of alive scores (dead entries score -inf)."""
    s = np.where(alive, np.asarray(scores, np.float64), -np.inf)
    order = np.argsort(-s, axis=-1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(s.shape[-1])[None, :].repeat(s.shape[0], 0), axis=-1)
    return ranks


def top_per_row(ranks: np.ndarray, alive: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The ``counts[row]`` best alive entries of each row, from :func:`rank_rows`' ``ranks``."""
    counts = np.minimum(np.asarray(counts), np.sum(alive, axis=-1))
    return (ranks < counts[:, None]) & alive


def topk_per_row(scores: np.ndarray, alive: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Keeps, in each row of ``scores [rows, n]``, the ``counts[row]`` best alive entries."""
    return top_per_row(rank_rows(scores, alive), alive, counts)


def topk(scores: np.ndarray, alive: np.ndarray, k: int) -> np.ndarray:
    """Keeps the ``k`` best alive entries of one array (any shape)."""
    return topk_per_row(np.ravel(scores)[None], np.ravel(alive)[None], np.array([k]))[0].reshape(
        np.shape(scores)
    )
