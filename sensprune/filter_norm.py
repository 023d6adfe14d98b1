"""FT and SoftNet: output-filter pruning by filter norm ("out mode").

FT (Li et al. 2016, "Pruning Filters for Efficient ConvNets") scores every
output filter ``f`` of a layer by the L1 norm of its kernel slice
``kernel[..., f]``; SoftNet (the scoring step of He et al. 2018, "Soft Filter
Pruning") uses the L2 norm. Every prunable layer keeps the same fraction of
its alive filters (at least one), the highest-scoring ones; the fraction is
found by bisection so that the kernel entries left after propagation meet the
budget. The outputs of the last layer (in call order: the model's outputs) are
never pruned.

Filters are removed by channel group (:mod:`sensprune.dependencies`): a
filter, its consumers' input columns and every filter summed into the same
residual stream channel go together, or none of them (:func:`select_filters`).

The older consumer map (:func:`consumer_map`, still used by ThiNet's size
model) is found from the call order and checked on probe points:

* shape rule: the consumer is the next layer ``n`` in call order when
  ``n.in_channels = k * l.out_channels``; ``k = 1`` covers channel-preserving
  ops in between (activations, BatchNorm, pooling, global averaging), ``k > 1``
  a channel-last flatten (feature index = position * C + f);
* mapping check: perturbing filter ``f`` of ``l`` (its kernel slice and bias)
  changes exactly the predicted input columns of ``n`` on the probe points;
* isolation check: zeroing filter ``f`` (kernel slice and bias) together with
  its consumer columns gives the same model outputs as zeroing only the
  consumer columns, i.e. ``f`` reaches the output through those columns only
  (false for a filter that also feeds a residual stream or another layer).

Both checks run on a few filters per layer. Layers that fail the shape rule or
a check keep all their filters and are listed in ``info['skipped']`` with the
reason. The same machinery serves ``uniform_filters``
(:mod:`sensprune.random_pruning`).
"""

from __future__ import annotations

from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sensprune import paths, registry
from sensprune.context import PruneContext
from sensprune.types import Layer

_PROBES = 8  # points of S, plus as many Gaussian noise points


# --------------------------------------------------------------------------- helpers


def _call_kwargs(ctx: PruneContext) -> dict:
    kwargs = dict(ctx.apply_kwargs)
    if ctx.apply_method is not None:
        kwargs["method"] = ctx.apply_method
    return kwargs


def _apply_fn(ctx: PruneContext):
    """Jitted ``(params, x) -> list of output leaves`` (cached)."""
    if "out_mode_apply" not in ctx.cache:
        kwargs = _call_kwargs(ctx)
        returns_state = kwargs.get("mutable", False) not in (False, None)

        def apply(params, x):
            out = ctx.model.apply({**ctx.variables, "params": params}, x, **kwargs)
            if returns_state:
                out = out[0]
            return jax.tree_util.tree_leaves(out)

        ctx.cache["out_mode_apply"] = jax.jit(apply)
    return ctx.cache["out_mode_apply"]


def capture_fn(ctx: PruneContext):
    """Jitted ``(params, x) -> {layer name: input}`` for every layer (cached)."""
    if "out_mode_capture" not in ctx.cache:
        from sensprune.layers import capture_inputs

        kwargs = dict(ctx.apply_kwargs)
        layers = list(ctx.layers)

        def capture(params, x):
            variables = {**ctx.variables, "params": params}
            return capture_inputs(ctx.model, variables, x, method=ctx.apply_method, layers=layers, **kwargs)

        ctx.cache["out_mode_capture"] = jax.jit(capture)
    return ctx.cache["out_mode_capture"]


def probe_points(ctx: PruneContext, n: int = _PROBES) -> jax.Array:
    """The first ``n`` points of S and ``n`` Gaussian points with matching mean and scale."""
    data = np.asarray(ctx.data[:n], np.float32)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(data.shape).astype(np.float32) * (np.std(data) + 1e-3) + np.mean(data)
    return jnp.asarray(np.concatenate([data, noise], axis=0))


def consumer_columns(out_channels: int, factor: int, filters) -> np.ndarray:
    """Consumer input columns fed by the given producer filters (channel-last flatten order)."""
    filters = np.atleast_1d(np.asarray(filters, np.int64))
    return (filters[None, :] + out_channels * np.arange(factor)[:, None]).ravel()


def filter_alive(ctx: PruneContext) -> dict[str, np.ndarray]:
    """Layer name -> bool ``[out]``: output filters with any nonzero kernel entry."""
    alive = ctx.alive()
    return {layer.name: alive[layer.name].reshape(-1, layer.out_channels).any(axis=0) for layer in ctx.layers}


def _with_filter(params, layer: Layer, f: int, kernel_value, bias_value):
    """Params with filter ``f`` of ``layer`` set to the given kernel slice and bias (host-side edit)."""
    kernel = np.array(paths.get_kernel(params, layer))
    kernel[..., f] = kernel_value
    params = paths.set_kernel(params, layer, jnp.asarray(kernel))
    if layer.use_bias:
        bias = np.array(paths.get_path(params, paths.bias_path(layer)))
        bias[f] = bias_value
        params = paths.set_path(params, paths.bias_path(layer), jnp.asarray(bias))
    return params


def _without_columns(params, layer: Layer, columns: np.ndarray):
    kernel = np.array(paths.get_kernel(params, layer))
    kernel[..., columns, :] = 0
    return paths.set_kernel(params, layer, jnp.asarray(kernel))


def _same(a, b) -> bool:
    for x, y in zip(a, b):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = 1.0 + float(np.max(np.abs(x))) if x.size else 1.0
        if not np.allclose(x, y, rtol=1e-4, atol=1e-5 * scale):
            return False
    return True


def _check_layer(
    ctx: PruneContext, layer: Layer, nxt: Layer, factor: int, x, base_inputs, alive
) -> Optional[str]:
    """None when filter -> consumer-column mapping passes both checks, else the reason it failed."""
    apply, capture = _apply_fn(ctx), capture_fn(ctx)
    params = ctx.params
    live = np.flatnonzero(alive)
    if live.size == 0:
        return "no alive filter"
    tests = np.unique(live[[0, live.size // 2, live.size - 1]])
    a0 = np.asarray(base_inputs[nxt.name], np.float64).reshape(x.shape[0], -1, nxt.in_channels)
    kernel = np.asarray(paths.get_kernel(params, layer))
    big = 1e3 * (1.0 + float(np.max(np.abs(kernel))))
    rng = np.random.default_rng(layer.order)
    for f in tests:
        cols = consumer_columns(layer.out_channels, factor, f)
        expected = np.zeros(nxt.in_channels, bool)
        expected[cols] = True
        direction = rng.standard_normal(layer.kernel_shape[:-1])
        changed = np.zeros(nxt.in_channels, bool)
        for sign in (1.0, -1.0):
            perturbed = _with_filter(params, layer, int(f), sign * big * direction, sign * big)
            a1 = np.asarray(capture(perturbed, x)[nxt.name], np.float64).reshape(a0.shape)
            changed |= np.any(np.abs(a1 - a0) > 1e-4 * (1.0 + np.abs(a0)), axis=(0, 1))
        if not np.array_equal(changed, expected):
            return (
                f"filter {int(f)} does not map to input columns {cols.tolist()[:4]}... of {nxt.name!r} "
                f"(it changed {np.flatnonzero(changed).tolist()[:8]})"
            )
        only_cols = _without_columns(params, nxt, cols)
        both = _with_filter(only_cols, layer, int(f), 0.0, 0.0)
        if not _same(apply(only_cols, x), apply(both, x)):
            return (
                f"filter {int(f)} reaches the output other than through {nxt.name!r} "
                "(e.g. a skip connection)"
            )
    return None


def consumer_map(ctx: PruneContext) -> dict[str, Optional[tuple[str, int]]]:
    """Layer name -> ``(consumer name, factor)``, or None when its filters are not prunable (cached).

    The reasons for None (other than being the last layer) are in
    ``ctx.cache['consumer_skipped']`` (see :func:`skipped_layers`).
    """
    if "consumer_map" in ctx.cache:
        return ctx.cache["consumer_map"]
    layers = ctx.layers
    cmap: dict[str, Optional[tuple[str, int]]] = {}
    skipped: dict[str, str] = {}
    alive = filter_alive(ctx)
    x = probe_points(ctx)
    base_inputs = None
    for i, layer in enumerate(layers):
        cmap[layer.name] = None
        if i + 1 == len(layers):
            continue  # the model's outputs are never pruned
        nxt = layers[i + 1]
        if nxt.in_channels % layer.out_channels:
            skipped[layer.name] = (
                f"next layer {nxt.name!r} has {nxt.in_channels} input channels, "
                f"not a multiple of {layer.out_channels}"
            )
            continue
        factor = nxt.in_channels // layer.out_channels
        if base_inputs is None:
            base_inputs = capture_fn(ctx)(ctx.params, x)
        reason = _check_layer(ctx, layer, nxt, factor, x, base_inputs, alive[layer.name])
        if reason is None:
            cmap[layer.name] = (nxt.name, factor)
        else:
            skipped[layer.name] = reason
    ctx.cache["consumer_map"] = cmap
    ctx.cache["consumer_skipped"] = skipped
    return cmap


def skipped_layers(ctx: PruneContext) -> dict[str, str]:
    """Layer name -> why its filters are left dense (last layer excluded)."""
    consumer_map(ctx)
    return dict(ctx.cache["consumer_skipped"])


# --------------------------------------------------------------------------- out-mode selection


def alive_counts(ctx: PruneContext) -> dict[str, np.ndarray]:
    """Layer name -> ``[in, out]`` alive kernel entries per (input channel, filter) (cached)."""
    if "out_mode_counts" not in ctx.cache:
        ctx.cache["out_mode_counts"] = {
            layer.name: ctx.alive()[layer.name].reshape(-1, layer.in_channels, layer.out_channels).sum(0)
            for layer in ctx.layers
        }
    return ctx.cache["out_mode_counts"]


def _input_keep(ctx: PruneContext, cmap, keep_out: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Layer name -> bool ``[in]``: input columns whose producing filter is kept."""
    keep_in = {layer.name: np.ones(layer.in_channels, bool) for layer in ctx.layers}
    for layer in ctx.layers:
        target = cmap.get(layer.name)
        if target is not None:
            consumer, factor = target
            keep_in[consumer] = np.tile(keep_out[layer.name], factor)
    return keep_in


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


def _aligned(k: int, n: int, multiple: int) -> int:
    """``k`` rounded up to a multiple of ``multiple``, at most ``n``."""
    return min(n, -(-k // multiple) * multiple)


def select_filters(
    ctx: PruneContext,
    budget: int,
    filter_scores: Mapping[str, np.ndarray],
    iters: int = 50,
    *,
    joint: str = "best",
    round_to: int = 1,
) -> registry.Selection:
    """Out-mode selection shared by ``ft``, ``softnet`` and ``uniform_filters``.

    Filters are removed by channel group (:mod:`sensprune.dependencies`): a
    group goes when every one of its producer filters ranks below the kept
    fraction of its layer (a group is scored by its best member), and then in
    every layer at once (filters, consumer columns). Groups that touch the
    model input or output, or are not provably safe, are kept.

    Args:
      ctx: the prune context.
      budget: kernel entries to keep at most (the closest configuration with at
        most ``budget`` entries is returned; if even one filter per layer
        exceeds it, that minimal configuration).
      filter_scores: layer name -> scores ``[out]`` (higher = more important).
      iters: bisection steps over the kept fraction.
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
      The selection; ``info`` has ``fraction``, ``kept_filters`` (bool per
      layer), ``skipped`` (layer -> reason its filters are left dense, for
      reasons other than feeding the model output) and ``groups`` (removed /
      total).
    """
    from sensprune import dependencies

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
    ranks = {}
    for name in prunable:
        s = np.where(alive_f[name], np.asarray(filter_scores[name], np.float64), -np.inf)
        order = np.argsort(-s, kind="stable")
        r = np.empty_like(order)
        r[order] = np.arange(order.size)
        ranks[name] = r

    def removed_at(fraction: float) -> np.ndarray:
        kept = ~removable
        for layer in ctx.layers:
            name = layer.name
            keep = alive_f[name]
            if name in ranks:
                n = int(alive_f[name].sum())
                k = _aligned(max(1, int(np.round(fraction * n))), n, int(round_to))
                keep = (ranks[name] < k) & alive_f[name]
            kept[deps.out_group[name][keep]] = True
        return ~kept

    def size(removed: np.ndarray) -> int:
        keep_in = dependencies.consumer_masks_for(deps, removed)
        keep_out = dependencies.producer_masks_for(deps, removed)
        as_int = lambda v: v.astype(np.int64)
        return int(sum(as_int(keep_in[n]) @ counts[n] @ as_int(keep_out[n]) for n in counts))

    lo, hi = 0.0, 1.0
    if size(removed_at(hi)) <= budget:
        fraction = hi
    elif size(removed_at(lo)) > budget:
        fraction = lo
    else:
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            if size(removed_at(mid)) <= budget:
                lo = mid
            else:
                hi = mid
        fraction = lo
    removed = removed_at(fraction)
    group_masks = dependencies.kernel_masks_for(deps, removed)
    alive = ctx.alive()
    masks = {layer.name: alive[layer.name] & group_masks[layer.name] for layer in ctx.layers}
    keep_out = dependencies.producer_masks_for(deps, removed)
    info = {
        "fraction": fraction,
        "kept_filters": {n: keep_out[n] & alive_f[n] for n in prunable},
        "skipped": deps.layer_unsafe(),
        "groups": (int(removed.sum()), len(deps.groups)),
    }
    return registry.Selection(masks=masks, scores=dict(filter_scores), info=info)


# --------------------------------------------------------------------------- FT / SoftNet


def filter_norms(ctx: PruneContext, order: int) -> dict[str, np.ndarray]:
    """Layer name -> L1 (``order=1``) or L2 (``order=2``) norm of every output filter (cached)."""
    key = ("filter_norms", order)
    if key not in ctx.cache:
        out = {}
        for layer in ctx.layers:
            k = np.asarray(ctx.kernels()[layer.name], np.float64).reshape(-1, layer.out_channels)
            out[layer.name] = np.abs(k).sum(0) if order == 1 else np.sqrt(np.square(k).sum(0))
        ctx.cache[key] = out
    return ctx.cache[key]


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
