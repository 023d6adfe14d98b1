"""Uniform and norm-based entry-wise sampling of weights, with reweighting.

The budget is spread uniformly: with ``f = budget / (alive kernel entries)``,
every output unit (row: the kernel slice ``kernel[..., o]``) with ``n`` alive
weights keeps ``x = max(1, round(f * n))`` distinct weights (capped at ``n``);
the rounding offset is staggered over rows (:func:`row_targets`) so the total
moves in steps of one entry rather than one entry per row of a layer.
Each row is sampled with replacement from a distribution ``p`` over its alive
weights, with ``m`` draws chosen so that ``E[#distinct] = x``
(:func:`sensprune.sampling.draws_for_unique`); every drawn weight is rescaled
by ``count / (m p)``, so the reweighted row is an unbiased estimate of the
original one. Rows whose target is all of their alive weights are left as
they are (no sampling, no rescaling).

Unlike SiPP (and the reference's sparsifier), a row is *not* reset to its
original values when the draws happen to hit every alive weight: resetting
would bias the estimate for non-uniform ``p``. The kept count is random (its
expectation is the target); each row draws from its own fixed stream derived
from the key (:func:`sample_rows`), so for one key the kept set only grows with
the budget and the keep-ratio search in :func:`sensprune.prune` converges
despite the sampling noise.

Methods (``p`` per row, proportional to):
- ``uniform``: 1 for every alive weight;
- ``norm_l1``: ``|w|``;
- ``norm_l2``: ``w^2``;
- ``norm_l1l2``: ``(|w| + w^2) / 2`` (the reference's "EllOneAndTwo").
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import numpy as np

from sensprune import registry, sampling
from sensprune.context import PruneContext

_GOLDEN = (np.sqrt(5.0) - 1.0) / 2.0
_MAX_STREAM = 1 << 22  # draws per row beyond which counts come from numpy's multinomial

SCORES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "uniform": lambda w: np.ones_like(w, np.float64),
    "norm_l1": lambda w: np.abs(w).astype(np.float64),
    "norm_l2": lambda w: np.square(w.astype(np.float64)),
    "norm_l1l2": lambda w: 0.5 * (np.abs(w).astype(np.float64) + np.square(w.astype(np.float64))),
}


def row_view(kernel: np.ndarray) -> np.ndarray:
    """Kernel ``[..., in, out]`` -> ``[out, fan_in]`` (rows = output units)."""
    kernel = np.asarray(kernel)
    return np.moveaxis(kernel, -1, 0).reshape(kernel.shape[-1], -1)


def from_rows(rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`row_view`."""
    return np.moveaxis(np.asarray(rows).reshape((shape[-1],) + tuple(shape[:-1])), 0, -1)


def rounding_offsets(rows: int, start: int = 0) -> np.ndarray:
    """Fixed, evenly spread offsets in [0, 1) for rows ``start .. start + rows - 1`` (golden-ratio sequence)."""
    return np.mod((np.arange(start, start + rows) + 0.5) * _GOLDEN, 1.0)


def row_targets(alive_rows: np.ndarray, fraction: float, offsets: np.ndarray) -> np.ndarray:
    """Distinct weights each row keeps: ``max(1, floor(fraction * n_alive + offset))``, at most ``n_alive``.

    With ``offset = 0.5`` this is rounding; staggering the offsets over rows
    makes rows of equal size step up at different fractions, so the total
    grows about one row at a time (and stays within about one entry of
    ``fraction * sum n_alive`` over many rows), and it never decreases as the
    fraction grows.
    """
    nnz = alive_rows.sum(-1)
    x = np.maximum(1, np.floor(fraction * nnz + offsets)).astype(np.int64)
    return np.where(nnz > 0, np.minimum(x, nnz), 0)


def _row_counts(rng: np.random.Generator, p: np.ndarray, m: int) -> np.ndarray:
    """Counts of ``m`` draws with replacement from ``p``: the first ``m`` of one fixed stream."""
    if m > _MAX_STREAM:  # only for rows asked to keep nearly everything under a very skewed p
        return rng.multinomial(m, p / p.sum()).astype(np.float64)
    cdf = np.cumsum(p)
    u = rng.random(m) * cdf[-1]
    idx = np.minimum(np.searchsorted(cdf, u, side="right"), p.size - 1)
    return np.bincount(idx, minlength=p.size).astype(np.float64)


def sample_rows(
    seed: tuple[int, ...], score_rows: np.ndarray, alive_rows: np.ndarray, targets: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Samples each row to about ``targets`` distinct alive entries.

    Row ``r`` draws from its own numpy stream seeded by ``(*seed, r)``; its
    ``m`` draws are the first ``m`` uniforms of that stream mapped through the
    row's CDF. Counts are therefore exactly multinomial, and for one seed the
    kept entries grow monotonically with ``m`` (so with the budget), which lets
    the keep-ratio search converge despite the sampling noise.

    Args:
      seed: integers seeding the streams (key bits and layer index).
      score_rows: nonnegative scores ``[rows, n]`` (p is proportional to them on alive entries).
      alive_rows: bool ``[rows, n]``.
      targets: distinct entries wanted per row ``[rows]``.

    Returns:
      ``(mask, scale, draws)``: bool and float ``[rows, n]`` and int ``[rows]``.
      Rows with ``targets >= n_alive`` keep all alive entries with scale 1.
    """
    s = np.where(alive_rows, np.asarray(score_rows, np.float64), 0.0)
    mass = s.sum(-1, keepdims=True)
    p = np.where(mass > 0, s / np.where(mass > 0, mass, 1.0), 0.0)
    nnz = alive_rows.sum(-1)
    untouched = np.asarray(targets) >= nnz
    draws = np.where(untouched, 0, sampling.draws_for_unique(p, targets))
    counts = np.zeros_like(p)
    for r in np.flatnonzero(draws > 0):
        counts[r] = _row_counts(np.random.default_rng([*seed, int(r)]), p[r], int(draws[r]))
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where(counts > 0, counts / (draws[:, None] * p), 0.0)
    kept = (counts > 0) & alive_rows
    mask = np.where(untouched[:, None], alive_rows, kept)
    scale = np.where(untouched[:, None], 1.0, np.where(kept, factor, 1.0))
    return mask, scale, draws


def _select(kind: str, ctx: PruneContext, budget: int, key: Optional[jax.Array]) -> registry.Selection:
    if key is None:
        raise ValueError(f"method {kind!r} samples: pass key=jax.random.PRNGKey(seed)")
    kernels, alive = ctx.kernels(), ctx.alive()
    total = sum(int(a.sum()) for a in alive.values())
    fraction = float(np.clip(budget / max(total, 1), 0.0, 1.0))
    score_fn = SCORES[kind]
    words = sampling.key_words(key)
    masks, scales, scores, draws, targets = {}, {}, {}, {}, {}
    first_row = 0
    for i, layer in enumerate(ctx.layers):
        name = layer.name
        shape = kernels[name].shape
        live = row_view(alive[name])
        s = score_fn(row_view(kernels[name]))
        x = row_targets(live, fraction, rounding_offsets(live.shape[0], first_row))
        first_row += live.shape[0]
        mask, scale, m = sample_rows((*words, i), s, live, x)
        masks[name] = from_rows(mask, shape)
        scales[name] = from_rows(scale, shape)
        scores[name] = from_rows(np.where(live, s, 0.0), shape)
        draws[name], targets[name] = m, x
    info = {"fraction": fraction, "draws": draws, "row_targets": targets}
    return registry.Selection(masks=masks, scales=scales, scores=scores, info=info)


def select_uniform(ctx: PruneContext, budget: int, key: Optional[jax.Array] = None) -> registry.Selection:
    """Uniform sampling per row, reweighted."""
    return _select("uniform", ctx, budget, key)


def select_l1(ctx: PruneContext, budget: int, key: Optional[jax.Array] = None) -> registry.Selection:
    """Per-row sampling with p proportional to |w|, reweighted."""
    return _select("norm_l1", ctx, budget, key)


def select_l2(ctx: PruneContext, budget: int, key: Optional[jax.Array] = None) -> registry.Selection:
    """Per-row sampling with p proportional to w^2, reweighted."""
    return _select("norm_l2", ctx, budget, key)


def select_l1l2(ctx: PruneContext, budget: int, key: Optional[jax.Array] = None) -> registry.Selection:
    """Per-row sampling with p proportional to (|w| + w^2) / 2, reweighted."""
    return _select("norm_l1l2", ctx, budget, key)


registry.register_method(
    "uniform", select_uniform, stochastic=True,
    description="Uniform: same fraction of every row, sampled uniformly with reweighting",
)
registry.register_method(
    "norm_l1", select_l1, stochastic=True,
    description="Entry-wise sampling p ~ |w|, same fraction of every row, with reweighting",
)
registry.register_method(
    "norm_l2", select_l2, stochastic=True,
    description="Entry-wise sampling p ~ w^2, same fraction of every row, with reweighting",
)
registry.register_method(
    "norm_l1l2", select_l1l2, stochastic=True,
    description="Entry-wise sampling p ~ (|w| + w^2)/2, same fraction of every row, with reweighting",
)
