"""Deterministic selection of kept entries from scores: global and per-row top-k.

Scores are dicts ``layer name -> array``; entries that are already pruned must
be passed in ``alive=False`` and are never selected, so iterative pruning keeps
every previously pruned weight pruned. Ties are broken by position, so the
kept count always equals the requested budget (capped by the alive count).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np


def global_topk(
    scores: Mapping[str, np.ndarray], alive: Mapping[str, np.ndarray], budget: int
) -> dict[str, np.ndarray]:
    """Keeps the ``budget`` highest-scoring alive entries over all layers.

    Args:
      scores: layer name -> scores (any shape).
      alive: layer name -> bool array of the same shape (False = already pruned).
      budget: number of entries to keep in total.

    Returns:
      Layer name -> bool mask of the same shape as its scores.
    """
    names = list(scores)
    flat = [np.where(alive[n], np.asarray(scores[n], np.float64), -np.inf).ravel() for n in names]
    sizes = [f.size for f in flat]
    everything = np.concatenate(flat) if flat else np.zeros(0)
    n_alive = int(np.sum(np.isfinite(everything)))
    budget = int(min(max(budget, 0), n_alive))
    keep = np.zeros(everything.size, bool)
    if budget > 0:
        # Stable sort on -score: ties keep the earlier position first.
        order = np.argsort(-everything, kind="stable")[:budget]
        keep[order] = True
    out, start = {}, 0
    for name, size in zip(names, sizes):
        out[name] = keep[start : start + size].reshape(np.shape(scores[name]))
        start += size
    return out


def topk_per_row(scores: np.ndarray, alive: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Keeps, in each row of ``scores [rows, n]``, the ``counts[row]`` best alive entries."""
    s = np.where(alive, np.asarray(scores, np.float64), -np.inf)
    order = np.argsort(-s, axis=-1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(s.shape[-1])[None, :].repeat(s.shape[0], 0), axis=-1)
    counts = np.minimum(np.asarray(counts), np.sum(alive, axis=-1))
    return (ranks < counts[:, None]) & alive


def topk(scores: np.ndarray, alive: np.ndarray, k: int) -> np.ndarray:
    """Keeps the ``k`` best alive entries of one array (any shape)."""
    return topk_per_row(np.ravel(scores)[None], np.ravel(alive)[None], np.array([k]))[0].reshape(
        np.shape(scores)
    )
