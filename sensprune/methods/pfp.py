"""PFP: provable filter pruning (ICLR 2020, arXiv 1911.07412).

PFP removes *input channels* of every layer (the feature maps produced by the
layer before), scored by their empirical sensitivity: the largest relative
contribution of the channel to any output unit, at any output position, over
the points of S. Per layer, with S_l the channel sensitivities' sum,
p_c = s_c / S_l and a_l = alpha_l S_l, one global epsilon fixes the number of
samples of every layer,

    m_l(eps) = max(1, ceil(3 (6 + 2 eps) a_l / eps^2)),

turned into an expected number of distinct channels
u_l = ceil(sum_c 1 - (1 - p_c)^m_l). Epsilon is found by bisection so that the
resulting size meets the budget; the size model removes a layer's output filters
in proportion to the channels its next layer keeps (the outer keep-ratio search
in :func:`sensprune.prune` then corrects for the real propagation).

Variants choose the u_l channels differently:
- ``pfp``: the u_l most sensitive channels, no reweighting (used in the paper's
  experiments);
- ``pfp_rand``: m draws with replacement from p (m such that E[#unique] = u_l),
  each kept channel rescaled by count / (m p_c);
- ``pfp_top``: channels with p_c >= 1/m kept deterministically, the rest of the
  budget sampled from the renormalised remaining mass, with reweighting.

Pruned channels are then propagated to the producing filters
(:mod:`sensprune.propagation`). Unlike the reference, input channels of layers
that read the model input (e.g. RGB channels) are not pruned unless
``protect_input_channels=False``.
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np

from sensprune import propagation, registry, sampling
from sensprune.context import PruneContext
from sensprune.methods.sipp import alpha

_EPS = float(np.finfo(np.float32).eps)


def channel_axis_mask(kernel_shape: tuple[int, ...], channels: np.ndarray) -> np.ndarray:
    """Broadcasts a per-input-channel vector to the kernel's shape."""
    return np.broadcast_to(np.asarray(channels)[:, None], kernel_shape[-2:]) * np.ones(kernel_shape, bool)


def channel_alive(ctx: PruneContext) -> dict[str, np.ndarray]:
    """Layer name -> bool [in] of input channels with any nonzero weight."""
    out = {}
    for layer in ctx.layers:
        alive = ctx.alive()[layer.name]
        out[layer.name] = np.asarray(alive.reshape(-1, layer.in_channels, layer.out_channels).any(axis=(0, 2)))
    return out


def _layer_stats(ctx: PruneContext):
    """Per layer ``(s, p, coef, live, protected)`` over its *units*
    (:func:`sensprune.propagation.channel_units`: channels, or whole attention heads), and the
    unit id of each channel. A unit's sensitivity is the sum of its channels' (its probability
    mass in PFP's sampling distribution)."""
    sens = ctx.sensitivities("max")
    live = channel_alive(ctx)
    protected = ctx.input_layers() if ctx.protect_input_channels else set()
    stats, units = {}, {}
    for layer in ctx.layers:
        ids = propagation.channel_units(ctx, layer)
        n_units = int(ids.max()) + 1 if ids.size else 0
        s_ch = np.where(live[layer.name], np.asarray(sens[layer.name].channel, np.float64), 0.0)
        s = np.bincount(ids, weights=s_ch, minlength=n_units)
        live_u = np.bincount(ids, weights=live[layer.name], minlength=n_units) > 0
        mass = s.sum()
        p = s / mass if mass > _EPS else np.zeros_like(s)
        coef = alpha(layer, ctx.delta, ctx.c_constant) * mass
        stats[layer.name] = (s, p, coef, live_u, layer.name in protected)
        units[layer.name] = ids
    return stats, units


def _channels_for(stats, eps: float) -> dict[str, int]:
    counts = {}
    for name, (s, p, coef, live, protected) in stats.items():
        n_live = int(live.sum())
        if protected or coef <= 0:
            counts[name] = n_live if protected else min(1, n_live)
            continue
        with np.errstate(over="ignore", divide="ignore"):  # eps -> 0: unbounded samples, capped
            m = min(max(1.0, np.ceil(3.0 * (6.0 + 2.0 * eps) * coef / eps**2)), 1e300)
        u = int(np.ceil(sampling.expected_unique(p[None], np.array([m]))[0] - 1e-9))
        counts[name] = int(min(max(u, 1), n_live))
    return counts


def _model_size(ctx: PruneContext, stats, counts: dict[str, int]) -> float:
    """Kernel entries kept if each layer keeps counts[l] input channels.

    A layer's size is its *nonzero* entries (already sparse nets count what is
    left, not the dense rows), scaled by the fraction of its live input
    channels it keeps and by the fraction of its live output filters that
    survive; the latter shrink in proportion to the channels its successor (in
    call order) keeps. On a dense layer this is ``counts[l] * out * window``.
    The outer keep-ratio search corrects for graphs where that is not exact.
    """
    layers = ctx.layers
    alive = ctx.alive()
    size = 0.0
    for i, layer in enumerate(layers):
        entries = float(alive[layer.name].sum())
        entries *= counts[layer.name] / max(int(stats[layer.name][3].sum()), 1)
        if i + 1 < len(layers):
            nxt = layers[i + 1]
            entries *= counts[nxt.name] / max(int(stats[nxt.name][3].sum()), 1)
        size += entries
    return size


def solve_epsilon(ctx: PruneContext, stats, budget: int) -> tuple[float, dict[str, int]]:
    """Bisection over log(eps) in [1e-300, 1e150] so that the size model meets the budget."""
    lo, hi = np.log(1e-300), np.log(1e150)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _model_size(ctx, stats, _channels_for(stats, float(np.exp(mid)))) > budget:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-6:
            break
    eps = float(np.exp(hi))
    return eps, _channels_for(stats, eps)


def _choose(variant: str, key, s, p, live, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Chooses k channels; returns (kept bool [in], scale [in])."""
    n_live = int(live.sum())
    ones = np.ones_like(p)
    if k >= n_live:
        return live.copy(), ones
    if variant != "pfp" and k >= int(np.sum(p > 0)):
        return (p > 0) & live, ones  # the budget covers every sensitive channel
    order = np.argsort(-np.where(live, s, -np.inf), kind="stable")
    if variant == "pfp":
        kept = np.zeros_like(live)
        kept[order[:k]] = True
        return kept, ones
    draws = int(sampling.draws_for_unique(p[None], np.array([k]))[0])
    fixed = np.zeros_like(live)
    if variant == "pfp_top":
        n_fixed = min(int(np.sum(p >= 1.0 / max(draws, 1))), k)
        fixed[order[:n_fixed]] = True
        rest = np.where(fixed, 0.0, p)
        if rest.sum() <= 0 or n_fixed >= k:
            return fixed, ones
        p = rest / rest.sum()
        draws = int(sampling.draws_for_unique(p[None], np.array([k - n_fixed]))[0])
    if draws <= 0:
        return fixed, ones
    counts = sampling.sample_counts(key, p[None], np.array([draws]))[0]
    factor = sampling.reweight_factors(counts[None], p[None], np.array([draws]))[0]
    sampled = (counts > 0) & live
    kept = fixed | sampled
    scale = np.where(fixed, 1.0, np.where(sampled, factor, 1.0))
    return kept, scale


def _layer_keys(variant: str, key: Optional[jax.Array], count: int) -> list[Optional[np.ndarray]]:
    """One seed per layer for the sampling variants (host-side, :func:`sampling.split_key`: no
    program compiled); none for ``pfp``, which reads no key."""
    if variant == "pfp":
        return [None] * count
    return list(sampling.split_key(key, count))


def _select(variant: str, ctx: PruneContext, budget: int, key: Optional[jax.Array]) -> registry.Selection:
    stats, units = _layer_stats(ctx)
    eps, counts = solve_epsilon(ctx, stats, budget)
    kernels, alive, live_channels = ctx.kernels(), ctx.alive(), channel_alive(ctx)
    keys = _layer_keys(variant, key, len(ctx.layers))
    masks, scales, kept_channels = {}, {}, {}
    for k, layer in zip(keys, ctx.layers):
        s, p, _, live, _ = stats[layer.name]
        kept, scale = _choose(variant, k, s, p, live, counts[layer.name])
        ids = units[layer.name]
        kept, scale = kept[ids] & live_channels[layer.name], scale[ids]  # units -> channels
        shape = kernels[layer.name].shape
        masks[layer.name] = channel_axis_mask(shape, kept) & alive[layer.name]
        if variant != "pfp":
            scales[layer.name] = np.broadcast_to(scale[:, None], shape[-2:]) * np.ones(shape)
        kept_channels[layer.name] = kept
    masks = propagation.propagate(ctx, masks)
    info = {"epsilon": eps, "channels": counts, "kept_channels": kept_channels}
    scores = {name: st[0][units[name]] for name, st in stats.items()}
    return registry.Selection(masks=masks, scales=scales, scores=scores, info=info)


def select_det(ctx: PruneContext, budget: int, key: Optional[jax.Array] = None) -> registry.Selection:
    """PFP: top-u_l channels by sensitivity, no reweighting."""
    return _select("pfp", ctx, budget, key)


def select_rand(ctx: PruneContext, budget: int, key: Optional[jax.Array] = None) -> registry.Selection:
    """PFP-rand: sampled channels with importance reweighting."""
    return _select("pfp_rand", ctx, budget, key)


def select_top(ctx: PruneContext, budget: int, key: Optional[jax.Array] = None) -> registry.Selection:
    """PFP-top: heavy channels kept, the rest sampled with reweighting."""
    return _select("pfp_top", ctx, budget, key)


registry.register_method(
    "pfp", select_det, structured=True,
    description="PFP, deterministic: top channels by empirical sensitivity, one global epsilon",
)
registry.register_method(
    "pfp_rand", select_rand, structured=True, stochastic=True,
    description="PFP, sampling: channels sampled by sensitivity with reweighting",
)
registry.register_method(
    "pfp_top", select_top, structured=True, stochastic=True,
    description="PFP, partial: heavy channels kept, the rest sampled with reweighting",
)
