"""PFP: provable filter pruning (ICLR 2020, arXiv 1911.07412).

PFP removes *input channels* of every layer (the feature maps produced by the
layer before), scored by their empirical sensitivity: the largest relative
contribution of the channel to any output unit, at any output position, over
the points of S. Per layer, with S_l the channel sensitivities' sum,
p_c = s_c / S_l and a_l = alpha_l S_l, one global epsilon fixes the number of
samples of every layer,

    m_l(eps) = max(1, ceil(3 (6 + 2 eps) a_l / eps^2)),

turned into an expected number of distinct channels
u_l = ceil(sum_c 1 - (1 - p_c)^m_l). As epsilon grows the layers give up their
least sensitive channels one at a time, in an order fixed by these sample
sizes (:func:`removal_times`); the budget picks a prefix of that schedule on
the exact group-wise propagation of the ``pfp`` choice (:mod:`sensprune.filter_fill`:
a layer whose next removal frees too much at once, e.g. a whole attention head,
stops before or after it while the others fill the budget). The sampling
variants keep each layer's count; their sampled channels may propagate to a
slightly different size, which the outer keep-ratio search corrects.

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

from sensprune import dependencies, filter_fill, propagation, registry, sampling
from sensprune.context import PruneContext
from sensprune.methods import filter_norm
from sensprune.methods.sipp import alpha

_EPS = float(np.finfo(np.float32).eps)
_ROWS_X_UNITS = 1 << 22  # probabilities held at once while solving for the draws of every count


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


def max_draws(p: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """``[len(ks)]``: the most draws from ``p`` whose expected unique count is at most ``k`` (``k >= 1``,
    below the support), with the ``1e-9`` slack of the sample-size rounding."""
    out = []
    rows = max(1, _ROWS_X_UNITS // max(p.size, 1))
    for start in range(0, ks.size, rows):
        k = ks[start : start + rows]
        probs = np.broadcast_to(p, (k.size, p.size))
        d = sampling.draws_for_unique(probs, k).astype(np.float64)  # ceil of the real solution
        out.append(np.where(sampling.expected_unique(probs, d) <= k + 1e-9, d, d - 1.0))
    return np.concatenate(out) if out else np.zeros(0)


def removal_times(stats) -> dict[str, list[tuple[float, int]]]:
    """Layer name -> ``(time, unit)`` of each unit removal as epsilon grows (:mod:`sensprune.filter_fill`).

    A layer draws ``m_l(eps) = ceil(g(eps) a_l)`` samples, ``g(eps) = 3 (6 + 2 eps) / eps^2``
    falling in eps and shared by all layers, and keeps ``u_l = ceil(E[#unique])`` units (at least
    one), its most sensitive ones for ``pfp``. It keeps at most ``k`` units once ``m_l`` is at
    most :func:`max_draws` ``M_k``, i.e. once ``g(eps) <= M_k / a_l``: that ratio is the time of
    its removal from ``k + 1`` to ``k`` units (larger = earlier; ``inf`` for units of zero
    sensitivity and layers of zero mass, which no sample size reaches). Sorting every layer's
    removals by it gives the paper's per-layer sample sizes as epsilon grows.
    """
    out = {}
    for name, (s, p, coef, live, protected) in stats.items():
        n_live = int(live.sum())
        if protected or n_live <= 1:
            continue
        order = np.argsort(-np.where(live, s, -np.inf), kind="stable")[:n_live]  # most sensitive first
        ks = np.arange(n_live - 1, 0, -1)  # going from k + 1 to k units removes order[k]
        times = np.full(ks.shape, np.inf)
        finite = ks < int(np.sum(p > 0))
        if coef > 0:
            times[finite] = max_draws(p, ks[finite]) / coef
        out[name] = [(float(t), int(u)) for t, u in zip(times, order[ks])]
    return out


def epsilon_at(time: float) -> float:
    """The epsilon with ``g(eps) = 3 (6 + 2 eps) / eps^2 = time`` (0 for ``time = inf``)."""
    if not np.isfinite(time):
        return 0.0
    return float((6.0 + np.sqrt(36.0 + 72.0 * time)) / (2.0 * time))


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
    kernels, alive, live_channels = ctx.kernels(), ctx.alive(), channel_alive(ctx)
    deps, allow, entries = ctx.dependencies(), propagation.column_only_groups(ctx), filter_norm.alive_counts(ctx)
    times = removal_times(stats)
    schedule = filter_fill.interleave(ctx.layers, times)
    live_units = {name: st[3] for name, st in stats.items()}

    def size_of(removals: list[filter_fill.Step]) -> int:
        """Kernel entries the group-wise propagation keeps when the top units are kept (``pfp``)."""
        keep = filter_fill.keep_after(live_units, removals)
        keep_ch = {name: keep[name][units[name]] & live_channels[name] for name in keep}
        return propagation.kept_entries(deps, dependencies.joint_removal(deps, keep_ch, allow=allow), entries)

    removals, frozen = filter_fill.fill_schedule(size_of, schedule, budget, int(filter_fill.SLACK * size_of([])))
    top = filter_fill.keep_after(live_units, removals)
    counts = {name: int(k.sum()) for name, k in top.items()}
    keys = _layer_keys(variant, key, len(ctx.layers))
    masks, scales, kept_channels = {}, {}, {}
    for k, layer in zip(keys, ctx.layers):
        s, p, _, live, _ = stats[layer.name]
        if variant == "pfp":
            kept, scale = top[layer.name], np.ones_like(p)
        else:
            kept, scale = _choose(variant, k, s, p, live, counts[layer.name])
        ids = units[layer.name]
        kept, scale = kept[ids] & live_channels[layer.name], scale[ids]  # units -> channels
        shape = kernels[layer.name].shape
        masks[layer.name] = channel_axis_mask(shape, kept) & alive[layer.name]
        if variant != "pfp":
            scales[layer.name] = np.broadcast_to(scale[:, None], shape[-2:]) * np.ones(shape)
        kept_channels[layer.name] = kept
    masks = propagation.propagate(ctx, masks)
    time_of = {(name, unit): t for name, seq in times.items() for t, unit in seq}
    eps = epsilon_at(min((time_of[step] for step in removals), default=np.inf))  # at the latest removal
    info = {"epsilon": eps, "channels": counts, "kept_channels": kept_channels, "frozen": frozen}
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
