"""Random baselines: the sanity floor for weight and filter pruning.

- ``random``: keeps ``B`` alive kernel entries chosen uniformly at random over
  all layers (i.i.d. uniform scores, global top-B), no reweighting. Budgets are
  met exactly, and for one key the kept sets are nested across budgets.
- ``uniform_filters``: random scores per output filter, the same fraction of
  filters kept in every layer with the out-mode machinery of ``ft``
  (:func:`sensprune.filter_norm.select_filters`): the "train a small dense
  network" baseline.
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np

from sensprune import registry, sampling, selection
from sensprune.context import PruneContext
from sensprune.methods import filter_norm


def _need_key(name: str, key: Optional[jax.Array]) -> jax.Array:
    if key is None:
        raise ValueError(f"method {name!r} samples: pass key=jax.random.PRNGKey(seed)")
    return key


def random_scores(ctx: PruneContext, key: jax.Array, per_filter: bool) -> dict[str, np.ndarray]:
    """Layer name -> i.i.d. uniform scores (kernel-shaped, or ``[out]`` per filter), cached per key.

    Drawn with numpy streams seeded by the key's bits and the layer index (no
    XLA compilation per kernel shape).
    """
    return ctx.memo(_draw_scores, sampling.key_words(key), per_filter)


def _draw_scores(ctx: PruneContext, words: tuple[int, ...], per_filter: bool) -> dict[str, np.ndarray]:
    out = {}
    for i, layer in enumerate(ctx.layers):
        shape = (layer.out_channels,) if per_filter else layer.kernel_shape
        out[layer.name] = np.random.default_rng([*words, i, int(per_filter)]).random(shape)
    return out


def select_random(ctx: PruneContext, budget: int, key: Optional[jax.Array] = None) -> registry.Selection:
    """Keeps ``budget`` alive entries chosen uniformly at random over all layers."""
    words = sampling.key_words(_need_key("random", key))
    masks = selection.top_of(ctx.memo(_ranking, words), budget)  # ranked once per context and key
    return registry.Selection(masks=masks, scores=ctx.memo(_draw_scores, words, False))


def _ranking(ctx: PruneContext, words: tuple[int, ...]) -> selection.GlobalRanking:
    return selection.rank_globally(ctx.memo(_draw_scores, words, False), ctx.alive())


def select_uniform_filters(
    ctx: PruneContext, budget: int, key: Optional[jax.Array] = None
) -> registry.Selection:
    """Keeps the same random fraction of output filters in every layer."""
    scores = random_scores(ctx, _need_key("uniform_filters", key), per_filter=True)
    return filter_norm.select_filters(ctx, budget, scores)


registry.register_method(
    "random", select_random, stochastic=True,
    description="Random: B alive weights chosen uniformly at random over all layers, no reweighting",
)
registry.register_method(
    "uniform_filters", select_uniform_filters, structured=True, stochastic=True,
    description="Uniform filters: same fraction of randomly chosen output filters per layer",
)
