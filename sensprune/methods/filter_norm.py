"""FT and SoftNet: output-filter pruning by filter norm ("out mode").

FT (Li et al. 2016, "Pruning Filters for Efficient ConvNets") scores every
output filter ``f`` of a layer by the L1 norm of its kernel slice
``kernel[..., f]``; SoftNet (the scoring step of He et al. 2018, "Soft Filter
Pruning") uses the L2 norm. Every prunable layer keeps the same fraction of
its alive filters (at least one), the highest-scoring ones, up to one filter:
the layers' single-filter removals are interleaved by the fraction at which
each happens and the budget (kernel entries left after propagation) picks a
prefix of that schedule (:mod:`sensprune.filter_fill`; a layer whose next
removal frees too much, e.g. a whole attention head, stops before or after it
while the others fill the budget). The outputs of the last layer (in call order: the model's outputs) are
never pruned.

Filters are removed by channel group (:mod:`sensprune.dependencies`): a
filter, its consumers' input columns and every filter summed into the same
residual stream channel go together, or none of them (:func:`select_filters`).

The same machinery serves ``uniform_filters`` (:mod:`sensprune.random_pruning`).
"""

from __future__ import annotations

from typing import Mapping, Optional

import jax
import numpy as np

from sensprune import dependencies, filter_fill, propagation, registry
from sensprune.context import PruneContext

# --------------------------------------------------------------------------- helpers


def filter_alive(ctx: PruneContext) -> dict[str, np.ndarray]:
    """Layer name -> bool ``[out]``: output filters with any nonzero kernel entry."""
    alive = ctx.alive()
    return {
        layer.name: np.asarray(alive[layer.name].reshape(-1, layer.out_channels).any(axis=0)) for layer in ctx.layers
    }


# --------------------------------------------------------------------------- out-mode selection


def _alive_counts(ctx: PruneContext) -> dict[str, np.ndarray]:
    return {
        layer.name: ctx.alive()[layer.name].reshape(-1, layer.in_channels, layer.out_channels).sum(0)
        for layer in ctx.layers
    }


def alive_counts(ctx: PruneContext) -> dict[str, np.ndarray]:
    """Layer name -> ``[in, out]`` alive kernel entries per (input channel, filter) (cached)."""
    return ctx.memo(_alive_counts)


_JOINT = ("best", "mean")


def joint_scores(ctx: PruneContext, filter_scores: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every filter's score replaced by its channel group's mean normalised score.

    Each layer's scores are first divided by the mean over its alive filters
    (so layers of different fan-in weigh alike); a group's score is then the
    mean over all its producer filters. All producers of a residual stream
    channel get the same score, so they rank the stream's channels alike and
    drop the same ones: the stream itself gets narrower.
    """
    deps = ctx.dependencies()
    alive_f = filter_alive(ctx)
    total = np.zeros(len(deps.groups))
    count = np.zeros(len(deps.groups))
    for layer in ctx.layers:
        name = layer.name
        s = np.asarray(filter_scores[name], np.float64)
        live = alive_f[name]
        scale = float(np.mean(s[live])) if live.any() else 1.0
        norm = s / (scale if scale > 0 else 1.0)
        np.add.at(total, deps.out_group[name][live], norm[live])
        np.add.at(count, deps.out_group[name][live], 1.0)
    mean = total / np.maximum(count, 1.0)
    return {layer.name: mean[deps.out_group[layer.name]] for layer in ctx.layers}


def select_filters(
    ctx: PruneContext,
    budget: int,
    filter_scores: Mapping[str, np.ndarray],
    *,
    joint: str = "best",
    round_to: int = 1,
) -> registry.Selection:
    """Out-mode selection shared by ``ft``, ``softnet`` and ``uniform_filters``.

    Filters are removed by channel group (:mod:`sensprune.dependencies`): a
    group goes when every one of its producer filters ranks below the kept
    fraction of its layer (a group is scored by its best member), and then in
    every layer at once (filters, consumer columns). Groups that touch the
    model input or output, or are not provably safe, are kept. The layers'
    removals follow one falling fraction, removal by removal
    (:func:`sensprune.filter_fill.fill_schedule`).

    Args:
      ctx: the prune context.
      budget: kernel entries to keep at most (the closest configuration with at
        most ``budget`` entries is returned; if even one filter per layer
        exceeds it, that minimal configuration).
      filter_scores: layer name -> scores ``[out]`` (higher = more important).
      joint: how the producers of one group are ranked. ``'best'``: each
        layer ranks its own scores and a group goes only when every producer
        ranks it out (a group is as good as its best member; residual streams
        rarely narrow). ``'mean'``: every producer scores the group by the mean
        normalised score of all its members (:func:`joint_scores`), so stream
        channels are dropped jointly.
      round_to: each layer keeps a multiple of this many filters (or all of
        them): 8 suits CPU SIMD and GPUs, 128 TPUs. With ``joint='mean'`` the
        kept channel counts then stay multiples, and ``sensprune.shrink``
        needs no padding.

    Returns:
      The selection; ``info`` has ``fraction`` (mean kept fraction of the
      prunable layers), ``kept_filters`` (bool per
      layer), ``skipped`` (layer -> reason its filters are left dense, for
      reasons other than feeding the model output), ``groups`` (removed /
      total) and ``frozen`` (layers stopped at a coarse removal).
    """
    if joint not in _JOINT:
        raise ValueError(f"joint must be one of {', '.join(map(repr, _JOINT))}, got {joint!r}")
    round_to = dependencies.check_round_to(round_to)
    if joint == "mean":
        filter_scores = joint_scores(ctx, filter_scores)
    deps = ctx.dependencies()
    counts = alive_counts(ctx)
    alive_f = filter_alive(ctx)
    removable = deps.removable
    prunable = [
        layer.name for layer in ctx.layers
        if np.any(removable[deps.out_group[layer.name]] & alive_f[layer.name])
    ]
    orders = {}
    for name in prunable:  # alive filters, lowest score first
        s = np.where(alive_f[name], np.asarray(filter_scores[name], np.float64), -np.inf)
        orders[name] = np.argsort(-s, kind="stable")[: int(alive_f[name].sum())][::-1]
    protected = {layer.name for layer in ctx.layers} - set(prunable)
    schedule = filter_fill.removal_schedule(ctx.layers, orders, alive_f, protected, round_to=round_to)

    def removed_by(removals: list[filter_fill.Step]) -> np.ndarray:
        kept = ~removable
        for name, keep in filter_fill.keep_after(alive_f, removals).items():
            kept[deps.out_group[name][keep]] = True
        return ~kept

    def size(removals: list[filter_fill.Step]) -> int:
        return propagation.kept_entries(deps, removed_by(removals), counts)

    removals, frozen = filter_fill.fill_schedule(size, schedule, budget, int(filter_fill.SLACK * size([])))
    removed = removed_by(removals)
    kept_now = filter_fill.keep_after(alive_f, removals)
    fraction = float(np.mean([kept_now[n][alive_f[n]].mean() for n in prunable])) if prunable else 1.0
    group_masks = dependencies.kernel_masks_for(deps, removed)
    alive = ctx.alive()
    masks = {layer.name: alive[layer.name] & group_masks[layer.name] for layer in ctx.layers}
    keep_out = dependencies.producer_masks_for(deps, removed)
    info = {
        "fraction": fraction,
        "kept_filters": {n: keep_out[n] & alive_f[n] for n in prunable},
        "skipped": deps.layer_unsafe(),
        "groups": (int(removed.sum()), len(deps.groups)),
        "frozen": frozen,
    }
    return registry.Selection(masks=masks, scores=dict(filter_scores), info=info)


# --------------------------------------------------------------------------- FT / SoftNet


def _filter_norms(ctx: PruneContext, order: int) -> dict[str, np.ndarray]:
    out = {}
    for layer in ctx.layers:
        k = np.asarray(ctx.kernels()[layer.name], np.float64).reshape(-1, layer.out_channels)
        out[layer.name] = np.abs(k).sum(0) if order == 1 else np.sqrt(np.square(k).sum(0))
    return out


def filter_norms(ctx: PruneContext, order: int) -> dict[str, np.ndarray]:
    """Layer name -> L1 (``order=1``) or L2 (``order=2``) norm of every output filter (cached)."""
    return ctx.memo(_filter_norms, order)


def select_ft(
    ctx: PruneContext, budget: int, key: Optional[jax.Array] = None, *, joint: str = "best", round_to: int = 1
) -> registry.Selection:
    """FT: keep the same fraction of filters per layer, largest L1 norms (options: :func:`select_filters`)."""
    return select_filters(ctx, budget, filter_norms(ctx, 1), joint=joint, round_to=round_to)


def select_softnet(
    ctx: PruneContext, budget: int, key: Optional[jax.Array] = None, *, joint: str = "best", round_to: int = 1
) -> registry.Selection:
    """SoftNet: keep the same fraction of filters per layer, largest L2 norms (options: :func:`select_filters`)."""
    return select_filters(ctx, budget, filter_norms(ctx, 2), joint=joint, round_to=round_to)


registry.register_method(
    "ft", select_ft, structured=True,
    description="FT (Li et al. 2016): same fraction of output filters per layer, largest L1 norm",
)
registry.register_method(
    "softnet", select_softnet, structured=True,
    description="SoftNet (He et al. 2018, scoring step): same fraction of filters per layer, largest L2 norm",
)
