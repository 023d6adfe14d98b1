"""Propagation of pruned input channels to the filters that produce them.

Filter methods decide which *input* channels of each layer to remove. A filter
(output channel) of a producing layer whose every consumer dropped it no longer
influences the output and can be zeroed for free. We find such filters without
any per-architecture map: with the consumers' columns masked, the gradient of a
random projection of the output with respect to a filter's kernel and bias is
exactly zero for every probe point. Probe points are the points of S plus
Gaussian noise points of the same shape, so input-dependent zeros (a dead ReLU)
are unlikely to pass for structural ones; as a last guard the zeroed model's
outputs must equal the unzeroed model's on the probes, layer by layer.

:func:`propagate` uses the channel groups of :mod:`sensprune.dependencies`
(joint removal across residual streams and concatenations);
:func:`propagate_by_gradient` is the older probe-based test, kept for reference:
there a filter that also feeds a skip connection is never zeroed.
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sensprune import paths
from sensprune.context import PruneContext


def _masked_params(ctx: PruneContext, kernel_masks: Mapping[str, np.ndarray]):
    params = ctx.params
    for layer in ctx.layers:
        if layer.name in kernel_masks:
            k = paths.get_kernel(params, layer)
            params = paths.set_kernel(params, layer, k * jnp.asarray(kernel_masks[layer.name], k.dtype))
    return params


def _probe_points(ctx: PruneContext, n: int = 16) -> jax.Array:
    data = np.asarray(ctx.data[:n], np.float32)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(data.shape).astype(np.float32) * (np.std(data) + 1e-3)
    return jnp.asarray(np.concatenate([data, noise + np.mean(data)], axis=0))


def _static(ctx: PruneContext) -> tuple:
    """Hashable description of how to call the model (static under jit)."""
    return ctx.model, ctx.apply_method, tuple(sorted(dict(ctx.apply_kwargs).items()))


@functools.partial(jax.jit, static_argnums=0)
def _apply_jit(static: tuple, variables, x):
    model, method, items = static
    kwargs = dict(items)
    if method is not None:
        kwargs["method"] = method
    return model.apply(variables, x, **kwargs)


def _apply(ctx: PruneContext, params, x):
    variables = {**ctx.variables, "params": params}
    try:
        return _apply_jit(_static(ctx), variables, x)
    except TypeError:  # unhashable apply options: run without the shared cache
        kwargs = dict(ctx.apply_kwargs)
        if ctx.apply_method is not None:
            kwargs["method"] = ctx.apply_method
        return ctx.model.apply(variables, x, **kwargs)


@functools.partial(jax.jit, static_argnums=0)
def _projected_grad(static: tuple, variables, x, proj):
    """Gradient w.r.t. params of a random projection of the model's outputs."""
    model, method, items = static
    kwargs = dict(items)
    if method is not None:
        kwargs["method"] = method

    def total(params):
        out = model.apply({**variables, "params": params}, x, **kwargs)
        return sum(jnp.sum(leaf * p) for leaf, p in zip(jax.tree_util.tree_leaves(out), proj))

    return jax.grad(total)(variables["params"])


def dead_filters(ctx: PruneContext, kernel_masks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Layer name -> bool [out] of filters with exactly zero gradient on all probes."""
    params = _masked_params(ctx, kernel_masks)
    x = _probe_points(ctx)
    out_shapes = jax.eval_shape(lambda p: _apply(ctx, p, x), params)
    keys = jax.random.split(jax.random.PRNGKey(0), len(jax.tree_util.tree_leaves(out_shapes)))
    proj = [jax.random.normal(k, s.shape, jnp.float32) for k, s in zip(keys, jax.tree_util.tree_leaves(out_shapes))]
    grads = _projected_grad(_static(ctx), {**ctx.variables, "params": params}, x, proj)
    out = {}
    for layer in ctx.layers:
        g = np.abs(np.asarray(paths.get_kernel(grads, layer)))
        dead = g.reshape(-1, layer.out_channels).sum(0) == 0
        if layer.use_bias:
            dead &= np.asarray(paths.get_path(grads, paths.bias_path(layer))) == 0
        out[layer.name] = dead
    return out


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


def propagate(ctx: PruneContext, kernel_masks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Makes in-mode channel choices consistent with the channel groups; returns new kernel masks.

    A group (:mod:`sensprune.dependencies`) is removed when *every* consumer
    dropped its input features: then its producers' filters go as well, in
    every layer of the group (a residual stream channel disappears from all
    blocks at once). Features of the other groups are kept in every consumer,
    so a stream is never half removed.
    """
    from sensprune import dependencies

    deps = ctx.dependencies()
    alive = ctx.alive()
    keep_in = {
        layer.name: np.asarray(kernel_masks[layer.name], bool)
        .reshape(-1, layer.in_channels, layer.out_channels)
        .any(axis=(0, 2))
        for layer in ctx.layers
        if layer.name in kernel_masks
    }
    removed = dependencies.joint_removal(deps, keep_in, allow=column_only_groups(ctx))
    group_masks = dependencies.kernel_masks_for(deps, removed)
    return {name: alive[name] & group_masks[name] for name in kernel_masks}


def propagate_by_gradient(ctx: PruneContext, kernel_masks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Zeroes the producing filters of dropped channels; returns new kernel masks.

    Only filters that still have nonzero kept weights are affected, and only
    when zeroing them leaves the model's outputs on the probe points unchanged.
    """
    dead = dead_filters(ctx, kernel_masks)
    candidate = {}
    for name, mask in kernel_masks.items():
        d = dead.get(name)
        if d is None or not np.any(d & mask.reshape(-1, mask.shape[-1]).any(0)):
            continue
        candidate[name] = mask & ~d
    if not candidate:
        return dict(kernel_masks)
    x = _probe_points(ctx)
    reference = _apply(ctx, _masked_params(ctx, kernel_masks), x)

    def same(masks):
        out = _apply(ctx, _masked_params(ctx, masks), x)
        return all(
            np.allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
            for a, b in zip(jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(out))
        )

    merged = {**kernel_masks, **candidate}
    if same(merged):
        return merged
    result = dict(kernel_masks)
    for name, mask in candidate.items():
        trial = {**result, name: mask}
        if same(trial):
            result = trial
    return result
