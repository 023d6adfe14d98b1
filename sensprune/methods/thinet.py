"""ThiNet (Luo et al. 2017): input channels chosen to reconstruct each layer's output.

For every layer (the *consumer*) ThiNet decides which input channels to keep
("in mode", like PFP) so that the layer's pre-activation output stays as close
as possible to the original. For sampled triples ``t = (point, output filter
o, output position p)`` the contribution of input channel ``c`` is

    X[t, c] = sum over window positions k of  w[k, c, o] * patch_t[k, c],

so the output entry is ``sum_c X[t, c]`` (bias excluded; it cancels in the
error). Removing a set ``T`` of channels changes the sampled outputs by
``sum_{c in T} X[:, c]``. ThiNet builds ``T`` greedily: starting from the empty
set it repeatedly adds the channel ``c`` that minimises
``||sum_{t in T + {c}} X[:, t]||^2`` (one vectorised step over all
candidates: ``||s||^2 + 2 s.X + ||X_c||^2``). Channels chosen *first* are the
least harmful to remove, so a layer keeping ``k`` channels removes the first
``n - k`` of this order and keeps the rest. (The reference ranks the first
channel chosen highest and keeps it, which inverts the paper; we follow the
paper.)

Every layer keeps the same fraction of its alive input channels (at least
one), up to one channel: the layers' single-channel removals are interleaved by
the fraction at which each happens (:func:`sensprune.filter_fill.removal_schedule`), and the budget
picks a prefix of that schedule by bisection on a size model that accounts for
the producing filters that die with their channels (a shared fraction alone
moves every layer at once and can miss the budget by several percent). Input channels of layers that
read the model input are protected when ``ctx.protect_input_channels``. Dropped
channels are propagated to their producers by channel group
(:func:`sensprune.propagation.propagate`, on the jaxpr analysis of
:mod:`sensprune.dependencies`), and the size model counts exactly what that
propagation keeps. The reference's per-architecture
keep-ratio hacks (x0.75 for ResNets, x2 for DenseNets) are not reproduced.

In a DenseGeneral/Einsum kernel view (an attention output projection) the
channels of one removable group (a head) are one unit: the greedy order runs
over the units' summed contributions (:func:`sensprune.propagation.channel_units`).

Triples are drawn with a fixed numpy seed per layer: ``SAMPLES`` triples from
the first ``MAX_POINTS`` points of S, output filters among the alive ones.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from sensprune import dependencies, filter_fill, patches, points, propagation, registry
from sensprune.context import PruneContext
from sensprune.methods import filter_norm
from sensprune.sensitivity import capture_function
from sensprune.types import Layer

SAMPLES = 400
MAX_POINTS = 256
_GRAM_MAX = 4096  # channels up to which the greedy steps use the precomputed Gram matrix


def greedy_removal_order(x: np.ndarray, candidates: Optional[np.ndarray] = None) -> np.ndarray:
    """Channels in the order ThiNet removes them (least harmful first).

    Args:
      x: contributions ``[samples, channels]``.
      candidates: bool ``[channels]`` of channels that may be removed (default all).

    Returns:
      Indices of the candidate channels; the first ``r`` are the set of size
      ``r`` built greedily to minimise ``||sum of their columns||^2``.
    """
    x = np.asarray(x, np.float64)
    n = x.shape[1]
    remaining = np.ones(n, bool) if candidates is None else np.asarray(candidates, bool).copy()
    norms2 = np.einsum("tc,tc->c", x, x)
    gram = x.T @ x if n <= _GRAM_MAX else None
    v = np.zeros(n)  # s . x_c for the current removed sum s
    order = []
    for _ in range(int(remaining.sum())):
        cost = 2.0 * v + norms2  # ||s + x_c||^2 - ||s||^2
        c = int(np.argmin(np.where(remaining, cost, np.inf)))
        order.append(c)
        remaining[c] = False
        v += gram[c] if gram is not None else x[:, c] @ x
    return np.asarray(order, np.int64)


def _contribution_fn(layer: Layer):
    """Jitted ``(inputs, n, p, w_sel, valid) -> [T, C]`` for one layer."""

    def fn(inputs, n_idx, p_idx, w_sel, valid):
        pm = patches.input_patches(layer, jnp.asarray(inputs, jnp.float32))  # [B, P, C * K], channel-major
        rows = pm[n_idx, p_idx].reshape(n_idx.shape[0], layer.in_channels, layer.window_size)
        contrib = jnp.einsum("tck,tck->tc", rows, w_sel)
        return jnp.where(valid[:, None], contrib, 0.0)

    return jax.jit(fn)


def contributions(
    ctx: PruneContext, samples: int = SAMPLES, max_points: int = MAX_POINTS
) -> dict[str, np.ndarray]:
    """Layer name -> sampled per-channel contributions ``X [samples, in_channels]`` (cached)."""
    return ctx.memo(_contributions, samples, max_points)


def _contributions(ctx: PruneContext, samples: int, max_points: int) -> dict[str, np.ndarray]:
    data = points.take(ctx.data, 0, max_points)
    n_points = points.num_points(data)
    chunk = max(1, min(int(ctx.chunk_size), n_points))
    alive_f = filter_norm.filter_alive(ctx)
    kernels = ctx.kernels()
    plans = {}
    for layer in ctx.layers:
        rng = np.random.default_rng(1000 + layer.order)
        filters = np.flatnonzero(alive_f[layer.name])
        if filters.size == 0:
            filters = np.arange(layer.out_channels)
        n_idx = rng.integers(0, n_points, samples)
        o_idx = filters[rng.integers(0, filters.size, samples)]
        p_idx = rng.integers(0, layer.num_patches, samples)
        # Kernel as [C, K, O] in the patch column order, then the sampled filters: [T, C, K].
        w = np.moveaxis(kernels[layer.name], -2, 0).reshape(layer.in_channels, layer.window_size, -1)
        w_sel = jnp.asarray(np.moveaxis(w[:, :, o_idx], -1, 0), jnp.float32)
        plans[layer.name] = (n_idx, jnp.asarray(p_idx), w_sel, _contribution_fn(layer))
    capture = capture_function(ctx.adapter, ctx.layers)
    totals = {layer.name: np.zeros((samples, layer.in_channels)) for layer in ctx.layers}
    for start in range(0, n_points, chunk):
        x = points.take(data, start, start + chunk)
        held = points.num_points(x)
        if held < chunk:  # pad to keep one compiled shape
            x = points.concat([x] + [points.take(x, held - 1, held)] * (chunk - held))
        inputs = capture(ctx.variables, jax.tree_util.tree_map(jnp.asarray, x))
        for layer in ctx.layers:
            rows_idx, plan_p, w_sel, fn = plans[layer.name]
            local = rows_idx - start
            valid = (local >= 0) & (local < min(chunk, n_points - start))
            rows = jnp.asarray(np.clip(local, 0, chunk - 1))
            out = fn(inputs[layer.name], rows, plan_p, w_sel, jnp.asarray(valid))
            totals[layer.name] += np.asarray(out, np.float64)
    return totals


def channel_alive(ctx: PruneContext) -> dict[str, np.ndarray]:
    """Layer name -> bool ``[in]`` of input channels with any nonzero weight."""
    return {
        layer.name: np.asarray(
            ctx.alive()[layer.name].reshape(-1, layer.in_channels, layer.out_channels).any(axis=(0, 2))
        )
        for layer in ctx.layers
    }


def _unit_order(x: np.ndarray, live: np.ndarray, units: np.ndarray) -> np.ndarray:
    """Channels in removal order when the channels of one unit (an attention head) go together:
    the greedy order over the units' summed contributions (removing a unit removes their sum),
    each unit expanded to its alive channels."""
    n_units = int(units.max()) + 1
    if n_units == units.size:
        return greedy_removal_order(x, live)
    summed = np.zeros((x.shape[0], n_units))
    np.add.at(summed.T, units, np.where(live, x, 0.0).T)
    live_u = np.bincount(units, weights=live, minlength=n_units) > 0
    order = greedy_removal_order(summed, live_u)
    return np.concatenate([np.flatnonzero((units == u) & live) for u in order]).astype(np.int64)


def _removal_orders(ctx: PruneContext) -> dict[str, np.ndarray]:
    x = contributions(ctx)
    live = channel_alive(ctx)
    units = {layer.name: propagation.channel_units(ctx, layer) for layer in ctx.layers}
    return {name: _unit_order(x[name], live[name], units[name]) for name in x}


def removal_orders(ctx: PruneContext) -> dict[str, np.ndarray]:
    """Layer name -> alive input channels in ThiNet's removal order (cached)."""
    return ctx.memo(_removal_orders)


def channel_ranks(ctx: PruneContext) -> dict[str, np.ndarray]:
    """Layer name -> ``[in]`` importance: position in the removal order (higher = removed later; -1 dead)."""
    out = {}
    for layer in ctx.layers:
        r = np.full(layer.in_channels, -1, np.int64)
        order = removal_orders(ctx)[layer.name]
        r[order] = np.arange(order.size)
        out[layer.name] = r
    return out


def select(ctx: PruneContext, budget: int, key: Optional[jax.Array] = None) -> registry.Selection:
    """ThiNet: (nearly) the same fraction of input channels per layer, greedy reconstruction order.

    Takes the shortest prefix of :func:`sensprune.filter_fill.removal_schedule` whose group-wise
    propagation keeps at most ``budget`` kernel entries (:func:`sensprune.filter_fill.fill_schedule`:
    a layer whose next removal is too coarse for the budget stops before or after it while the
    others fill the budget).
    """
    orders = removal_orders(ctx)
    live = channel_alive(ctx)
    protected = ctx.input_layers() if ctx.protect_input_channels else set()
    deps = ctx.dependencies()
    allow = propagation.column_only_groups(ctx)
    counts = filter_norm.alive_counts(ctx)
    schedule = filter_fill.removal_schedule(ctx.layers, orders, live, protected)

    def size_of(removals: list[tuple[str, int]]) -> int:
        """Kernel entries the group-wise propagation keeps after these removals."""
        removed = dependencies.joint_removal(deps, filter_fill.keep_after(live, removals), allow=allow)
        return propagation.kept_entries(deps, removed, counts)

    slack = int(filter_fill.SLACK * size_of([]))
    removals, frozen = filter_fill.fill_schedule(size_of, schedule, budget, slack)
    keep = filter_fill.keep_after(live, removals)
    alive = ctx.alive()
    masks = {layer.name: alive[layer.name] & keep[layer.name][:, None] for layer in ctx.layers}
    masks = propagation.propagate(ctx, masks)
    fractions = [float(keep[n][live[n]].mean()) for n in live if n not in protected and live[n].any()]
    info = {"fraction": float(np.mean(fractions)) if fractions else 1.0, "frozen": frozen, "kept_channels": keep,
            "removal_order": orders}
    return registry.Selection(masks=masks, scores=channel_ranks(ctx), info=info)


registry.register_method(
    "thinet", select, structured=True,
    description="ThiNet: same fraction of input channels per layer, greedy output-reconstruction order",
)
