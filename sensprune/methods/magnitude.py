"""WT: global magnitude pruning (Han et al. 2015, "Deep Compression").

Every alive kernel entry of every prunable layer is scored by ``|w|`` and the
``B`` largest over the whole network are kept (one global threshold). Already
pruned (zero) entries are never revived. No data and no reweighting are used;
the reference's extra per-row top-k step selects the same set, so it is not
repeated here.
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np

from sensprune import registry, selection
from sensprune.context import PruneContext


def _magnitudes(ctx: PruneContext) -> dict[str, np.ndarray]:
    return {name: np.abs(k) for name, k in ctx.kernels().items()}


def scores(ctx: PruneContext) -> dict[str, np.ndarray]:
    """Layer name -> ``|kernel|`` (cached)."""
    return ctx.memo(_magnitudes)


def _ranking(ctx: PruneContext) -> selection.GlobalRanking:
    return selection.rank_globally(scores(ctx), ctx.alive())


def select(ctx: PruneContext, budget: int, key: Optional[jax.Array] = None) -> registry.Selection:
    """Keeps the ``budget`` alive kernel entries of largest magnitude over all layers
    (ranked once per context: each budget of the keep-ratio search is a threshold)."""
    masks = selection.top_of(ctx.memo(_ranking), budget)
    return registry.Selection(masks=masks, scores=scores(ctx))


registry.register_method("wt", select, description="WT: global magnitude pruning, top-B |w| over all layers")
