"""What a filter method's removed channel groups leave behind in the masked model.

A filter method removes a channel group (a filter, an MLP unit, an attention head) by
masking its kernel rows and columns; :func:`sensprune.shrink.shrink` then drops the group
whole: also its producers' bias entries and its per-channel variables (e.g. the scale and
offset of a norm after a conv). Those entries influence nothing once the group's consumer
rows are masked, so they are removed with the group here as well: zero in the params, False
in the masks, and not counted as kept. The kept count then equals the shrunk model's
parameter count (for nonzero parameters), with or without data-dependent zeroing
(:mod:`sensprune.zeroing`, which finds the biases too, from their zero gradient, but never
norm parameters, and only when it runs).

The groups are the ones :func:`sensprune.shrink.removed_for` drops (whole heads only).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from sensprune import dependencies as deps_lib
from sensprune import paths, registry, zeroing
from sensprune import shrink_heads as heads
from sensprune import shrink_stacks as stacks
from sensprune.context import PruneContext

__all__ = ["apply", "removed_other", "zero_params"]

_KEY = "group_leftovers"


def _kernel_masks(deps: deps_lib.DependencyMap, sel: registry.Selection) -> dict[str, np.ndarray]:
    """The selection's kernel mask of every layer of ``deps`` (all kept where it has none)."""
    return {
        layer.name: np.asarray(sel.masks[layer.name], bool) if layer.name in sel.masks
        else np.ones(layer.kernel_shape, bool)
        for layer in deps.layers
    }


def leftover_tree(deps: deps_lib.DependencyMap, params: Any, removed: np.ndarray) -> Any:
    """A bool tree like ``params``: True at the producer biases and per-channel parameters of the
    ``removed`` groups (kernels excluded: the selection masks them)."""
    tree = jax.tree.map(lambda p: np.zeros(np.shape(p), bool), params)
    keep_out = deps_lib.producer_masks_for(deps, removed)
    for layer in deps.layers:
        if not layer.use_bias or keep_out[layer.name].all():
            continue
        gone = np.array(paths.get_path(tree, paths.bias_path(layer)), bool)
        at = layer.index or ()  # a scan slice owns its own row of the stacked bias
        gone[at] = (~keep_out[layer.name]).reshape(gone[at].shape)
        tree = paths.set_path(tree, paths.bias_path(layer), gone)
    for path, drop in deps_lib.variable_keep(deps, removed).items():
        leaf_path, at = stacks.split_slice(path)  # stacked per-channel leaves: '[i]' names the slice
        if leaf_path[0] != "params":
            continue
        gone = np.array(paths.get_path(tree, leaf_path[1:]), bool)
        gone[at][..., drop] = True  # gone[at]: a view (basic indexing), written through
        tree = paths.set_path(tree, leaf_path[1:], gone)
    return tree


def apply(ctx: PruneContext, sel: registry.Selection) -> registry.Selection:
    """``sel`` with the leftovers of its removed groups recorded in ``info['group_leftovers']``
    (``'dead'``: bool tree, ``'other'``: how many nonzero entries go that data-dependent zeroing
    did not already remove). Selections that rewrite kernels (low rank) are returned unchanged."""
    if sel.kernels or sel.sizes:
        return sel
    deps = ctx.dependencies()
    removed = heads.representable(deps, deps_lib.removed_groups(deps, _kernel_masks(deps, sel)))
    if not removed.any():
        return sel
    tree = leftover_tree(deps, ctx.params, removed)
    zeroed = sel.info.get("zero_dead", {}).get("dead")
    if zeroed is not None:  # counted there already
        tree = jax.tree.map(lambda t, z: t & ~np.asarray(z, bool), tree, zeroed)
    other = sum(  # only leaves with a leftover are read (no full copy of the params per searched budget)
        int(np.count_nonzero(np.asarray(p)[t]))
        for p, t in zip(jax.tree.leaves(ctx.params), jax.tree.leaves(tree)) if t.any()
    )
    return dataclasses.replace(sel, info=dict(sel.info, **{_KEY: {"dead": tree, "other": other}}))


def removed_other(sel: registry.Selection) -> int:
    """Nonzero entries outside the kernels that :func:`apply` removed (0 when it found none)."""
    return int(sel.info.get(_KEY, {}).get("other", 0))


def zero_params(params: Any, masks: Any, sel: registry.Selection) -> tuple[Any, Any]:
    """``(params, masks)`` with the leftovers :func:`apply` recorded set to zero / False."""
    record = sel.info.get(_KEY)
    if record is None:
        return params, masks
    return zeroing.clear(params, masks, record["dead"])
