"""Group-wise propagation of the input channels a filter method drops.

Filter methods such as PFP and ThiNet decide which *input* channels of each
layer to remove. Through the channel groups of :mod:`sensprune.dependencies`
(the one channel-dependency analysis, from the model's jaxpr) a group is
removed when every consumer dropped its features; then its producers' filters
go as well, in every layer of the group, so a residual stream channel
disappears from all blocks at once and is never half removed.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from sensprune import dependencies
from sensprune.context import PruneContext
from sensprune.types import Layer


def column_only_groups(ctx: PruneContext) -> np.ndarray:
    """bool ``[groups]`` that may go: removable groups, plus (unless inputs are
    protected) groups of model-input channels that no layer produces, whose
    consumer columns can be masked while the model input stays as it is."""
    deps = ctx.dependencies()
    allow = deps.removable.copy()
    if not ctx.protect_input_channels:
        for gid, g in enumerate(deps.groups):
            if len(g.inputs) and not g.producers and not g.output:
                allow[gid] = True
    return allow


def channel_units(ctx: PruneContext, layer: Layer) -> np.ndarray:
    """``[in]`` unit id (``0 .. U-1``, in channel order) of each input channel of ``layer``.

    In-mode filter methods (PFP, ThiNet) choose units. A channel is its own unit, except in a
    DenseGeneral/Einsum kernel view (an attention output projection), where the channels of one
    removable group (a head's ``head_dim`` inputs) form one unit: a head is kept or dropped whole.
    """
    n = layer.in_channels
    if not layer.param_shape or layer.transposed:
        return np.arange(n)
    deps = ctx.dependencies()
    ids = deps.in_group[layer.name]
    grouped = (ids >= 0) & deps.removable[np.maximum(ids, 0)]
    key = np.where(grouped, ids, -1 - np.arange(n))  # channels outside removable groups stay alone
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    rank = np.empty(first.size, np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank[inverse.reshape(-1)]


def kept_entries(deps: dependencies.DependencyMap, removed: np.ndarray, counts: Mapping[str, np.ndarray]) -> int:
    """Kernel entries left when the ``removed`` groups go.

    ``counts``: layer name -> ``[in, out]`` alive entries per (input channel,
    filter) (:func:`sensprune.filter_norm.alive_counts`).
    """
    keep_in = dependencies.consumer_masks_for(deps, removed)
    keep_out = dependencies.producer_masks_for(deps, removed)
    return int(sum(keep_in[n].astype(np.int64) @ counts[n] @ keep_out[n].astype(np.int64) for n in counts))


def input_keep(ctx: PruneContext, kernel_masks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Layer name -> bool ``[in]``: input channels with any kept entry in ``kernel_masks``."""
    return {
        layer.name: np.asarray(
            np.asarray(kernel_masks[layer.name], bool)
            .reshape(-1, layer.in_channels, layer.out_channels)
            .any(axis=(0, 2))
        )
        for layer in ctx.layers
        if layer.name in kernel_masks
    }


def propagate(ctx: PruneContext, kernel_masks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Makes in-mode channel choices consistent with the channel groups; returns new kernel masks.

    A group (:mod:`sensprune.dependencies`) is removed when *every* consumer
    dropped its input features: then its producers' filters go as well, in
    every layer of the group (a residual stream channel disappears from all
    blocks at once). Features of the other groups are kept in every consumer,
    so a stream is never half removed.
    """
    deps = ctx.dependencies()
    alive = ctx.alive()
    removed = dependencies.joint_removal(deps, input_keep(ctx, kernel_masks), allow=column_only_groups(ctx))
    group_masks = dependencies.kernel_masks_for(deps, removed)
    return {name: alive[name] & group_masks[name] for name in kernel_masks}
