"""SiPP: sensitivity-informed provable weight pruning (arXiv 1910.05422).

Three variants, all scoring each weight by its empirical sensitivity (its
largest relative share of the same-sign, bias-free pre-activation of its output
unit over the points of S):

- ``sipp``: deterministic. Sensitivities averaged over output positions; the
  global top-B weights over all layers are kept, without reweighting.
- ``sipp_rand``: sampling. Sensitivities maxed over output positions. Each
  (sign, output unit) row r gets a number of distinct samples x_r from the
  separable convex program

      minimise  sum_l (1/rows_l) sum_{r in l} eps_r(x_r)
      s.t.      0 <= x_r <= nnz_r,  sum_r x_r <= B,

  with the Bernstein-type error eps_r(x) = (u + sqrt(u^2 + 6u)) / 2,
  u = a_r / (3x), a_r = alpha_l * S_r, alpha_l = 2 C log(8 (P_l + 1) kappa_l / delta),
  S_r the row's sensitivity mass. We solve it exactly by bisection on the
  Lagrange multiplier (each row's optimum is monotone in it), with no solver
  dependency. Rows are then sampled with replacement proportionally to the
  sensitivities and reweighted by count / (m p), which is unbiased.
- ``sipp_hybrid``: per row, the deterministic top-x_r choice when its error
  bound (the sensitivity mass it drops) is at most the sampling bound
  eps_r(x_r), sampling otherwise. Both are bounds on the same quantity, the
  relative error of the row's same-sign pre-activation; unlike the reference we
  do not multiply the deterministic bound by C (see README, "Differences").
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np

from sensprune import registry, sampling, selection
from sensprune.context import PruneContext
from sensprune.types import Layer

_EPS = float(np.finfo(np.float32).eps)


def alpha(layer: Layer, delta: float, c_constant: float) -> float:
    """alpha_l = 2 C log(8 (P_l + 1) kappa_l / delta)."""
    return 2.0 * c_constant * float(np.log(8.0 * (layer.num_patches + 1) * layer.window_size / delta))


def rand_error(a: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Relative error bound of a row sampled with x distinct samples (inf at x = 0)."""
    a = np.asarray(a, np.float64)
    x = np.asarray(x, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.where(x > 0, a / (3.0 * np.maximum(x, 1e-300)), np.inf)
        err = 0.5 * (u + np.sqrt(u * u + 6.0 * u))
    return np.where(a > 0, err, 0.0)


def samples_for_error(a: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rand_error`: distinct samples x with eps(x) = eps.

    Solving eps = (u + sqrt(u^2 + 6u)) / 2 for u = a / (3x) gives
    x = (3 + 2 eps) a / (6 eps^2). (The spec quotes (6 + 2 eps) a / (6 eps^2),
    which does not invert its own error formula; we keep the error formula,
    which is what the allocation minimises.)
    """
    eps = np.asarray(eps, np.float64)
    return (3.0 + 2.0 * eps) * np.asarray(a, np.float64) / (6.0 * eps * eps)


def _marginal(u: np.ndarray, a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """-d/dx [w eps(x)] written as a function of u = a / (3x); increasing in u."""
    return w * (3.0 * u * u / a) * 0.5 * (1.0 + (u + 3.0) / np.sqrt(u * u + 6.0 * u))


def _rows_at(lam: float, a: np.ndarray, w: np.ndarray, cap: np.ndarray, iters: int = 45) -> np.ndarray:
    """Each row's minimiser of w eps(x) + lam x over [0, cap]."""
    lo = np.full(a.shape, -60.0)  # log u
    hi = np.full(a.shape, 60.0)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        above = _marginal(np.exp(mid), a, w) > lam
        hi = np.where(above, mid, hi)
        lo = np.where(above, lo, mid)
    x = a / (3.0 * np.exp(0.5 * (lo + hi)))
    return np.clip(x, 0.0, cap)


def allocate_rows(a: np.ndarray, weight: np.ndarray, cap: np.ndarray, budget: float) -> np.ndarray:
    """Solves the SiPP-rand allocation program; returns real-valued x_r.

    Args:
      a: per-row coefficient a_r (0 for rows that take no part).
      weight: per-row objective weight (1 / rows of its layer).
      cap: per-row upper bound (nonzero weights of the row).
      budget: total distinct samples.
    """
    a = np.asarray(a, np.float64)
    active = (a > 0) & (cap > 0)
    x = np.zeros_like(a)
    if not np.any(active) or budget <= 0:
        return x
    aa, ww, cc = a[active], np.asarray(weight, np.float64)[active], np.asarray(cap, np.float64)[active]
    if cc.sum() <= budget:
        x[active] = cc
        return x
    lo, hi = -200.0, 200.0  # log lambda
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _rows_at(np.exp(mid), aa, ww, cc).sum() > budget:
            lo = mid
        else:
            hi = mid
    x[active] = _rows_at(np.exp(hi), aa, ww, cc)
    return x


def _row_view(kernel: np.ndarray) -> np.ndarray:
    """Kernel -> ``[out, fan_in]`` matrix (rows = output units)."""
    return np.moveaxis(np.asarray(kernel), -1, 0).reshape(kernel.shape[-1], -1)


def _from_rows(rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.moveaxis(rows.reshape((shape[-1],) + tuple(shape[:-1])), 0, -1)


def _sign_rows(ctx: PruneContext):
    """Per layer: stacked [plus rows; minus rows] sensitivities, alive masks and a_r."""
    sens = ctx.sensitivities("max")
    kernels, alive = ctx.kernels(), ctx.alive()
    per_layer = {}
    for layer in ctx.layers:
        name = layer.name
        w = _row_view(kernels[name])
        s = _row_view(np.asarray(sens[name].weight, np.float64))
        live = _row_view(alive[name])
        signs = np.concatenate([w > 0, w < 0], axis=0)
        s2 = np.concatenate([s, s], axis=0) * signs
        live2 = np.concatenate([live, live], axis=0) & signs
        mass = s2.sum(-1)
        coef = np.where(mass > _EPS, alpha(layer, ctx.delta, ctx.c_constant) * mass, 0.0)
        per_layer[name] = (s2, live2, coef)
    return per_layer


def _row_ranks(ctx: PruneContext) -> dict[str, np.ndarray]:
    """Per layer: ranks of the sign rows' sensitivities within each row, once per context."""
    return {name: selection.rank_rows(s2, live2) for name, (s2, live2, _) in ctx.memo(_sign_rows).items()}


def _allocation(ctx: PruneContext, budget: int):
    per_layer = ctx.memo(_sign_rows)
    names = list(per_layer)
    coef = np.concatenate([per_layer[n][2] for n in names])
    cap = np.concatenate([per_layer[n][1].sum(-1) for n in names]).astype(np.float64)
    weight = np.concatenate([np.full(per_layer[n][2].shape, 1.0 / per_layer[n][2].shape[0]) for n in names])
    x = np.ceil(allocate_rows(coef, weight, cap, float(budget)) - 1e-9)
    x = np.minimum(x, cap)
    out, start = {}, 0
    for n in names:
        rows = per_layer[n][2].shape[0]
        out[n] = x[start : start + rows]
        start += rows
    return per_layer, out


def _sample_rows(key, s2, live2, x):
    """Samples each row to about x distinct entries; returns (mask, scale, draws) rows.

    Rows whose allocation covers all their sensitive entries keep those entries
    exactly (no sampling needed); rows where the draw would not reduce the
    nonzero count are left untouched.
    """
    nnz = live2.sum(-1)
    mass = s2.sum(-1, keepdims=True)
    p = np.where(mass > 0, s2 / np.where(mass > 0, mass, 1.0), 0.0)
    support = (p > 0) & live2
    covered = x >= support.sum(-1)
    draws = np.where(covered, 0, sampling.draws_for_unique(p, x))
    counts = sampling.sample_counts(key, p, draws)
    factor = sampling.reweight_factors(counts, p, draws)
    kept = counts > 0
    untouched = (x >= nnz) | (kept.sum(-1) >= nnz)
    mask = np.where(untouched[:, None], live2, np.where(covered[:, None], support, kept & live2))
    scale = np.where((untouched | covered)[:, None], 1.0, factor)
    return mask, scale, draws


def _combine_signs(rows: np.ndarray, shape, how: str = "or") -> np.ndarray:
    half = rows.shape[0] // 2
    merged = (rows[:half] | rows[half:]) if how == "or" else rows[:half] + rows[half:]
    return _from_rows(merged, shape)


def select_det(ctx: PruneContext, budget: int, key: Optional[jax.Array] = None) -> registry.Selection:
    """Deterministic SiPP: global top-B by mean-over-patches sensitivity."""
    scores, ranking = ctx.memo(_det_ranking)
    return registry.Selection(masks=selection.top_of(ranking, budget), scores=scores)


def _det_ranking(ctx: PruneContext) -> tuple[dict[str, np.ndarray], selection.GlobalRanking]:
    """The deterministic scores and their global ranking, once per context (the keep-ratio
    search then selects each budget without sorting again)."""
    scores = {name: np.asarray(s.weight) for name, s in ctx.sensitivities("mean").items()}
    return scores, selection.rank_globally(scores, ctx.alive())


def _select_sampled(ctx: PruneContext, budget: int, key: Optional[jax.Array], hybrid: bool) -> registry.Selection:
    per_layer, alloc = _allocation(ctx, budget)
    kernels = ctx.kernels()
    masks, scales, eps, det_rows = {}, {}, {}, {}
    keys = sampling.split_key(key, len(per_layer))  # host-side: no key-splitting program
    for k, (name, (s2, live2, coef)) in zip(keys, per_layer.items()):
        x = alloc[name]
        shape = kernels[name].shape
        mask_r, scale_r, _ = _sample_rows(k, s2, live2, x)
        err = rand_error(coef, x)
        if hybrid:
            det_mask = selection.top_per_row(ctx.memo(_row_ranks)[name], live2, x.astype(np.int64))
            dropped = np.where(live2 & ~det_mask, s2, 0.0).sum(-1)
            use_det = (dropped <= err) | (x >= live2.sum(-1))
            mask_r = np.where(use_det[:, None], det_mask, mask_r)
            scale_r = np.where(use_det[:, None], 1.0, scale_r)
            err = np.where(use_det, dropped, err)
            det_rows[name] = use_det
        masks[name] = _combine_signs(mask_r, shape)
        scales[name] = _combine_signs(scale_r * mask_r, shape, how="sum")
        eps[name] = err.reshape(2, -1)
    info = {"epsilon": eps, "allocation": {n: a.reshape(2, -1) for n, a in alloc.items()}}
    if hybrid:
        info["deterministic_rows"] = {n: d.reshape(2, -1) for n, d in det_rows.items()}
    scores = {name: np.asarray(s.weight) for name, s in ctx.sensitivities("max").items()}
    return registry.Selection(masks=masks, scales=scales, scores=scores, info=info)


def select_rand(ctx: PruneContext, budget: int, key: Optional[jax.Array] = None) -> registry.Selection:
    """SiPP-rand: convex per-row allocation, sampling with importance reweighting."""
    return _select_sampled(ctx, budget, key, hybrid=False)


def select_hybrid(ctx: PruneContext, budget: int, key: Optional[jax.Array] = None) -> registry.Selection:
    """SiPP-hybrid: per row, deterministic top-k or sampling, whichever bound is lower."""
    return _select_sampled(ctx, budget, key, hybrid=True)


registry.register_method(
    "sipp", select_det, description="SiPP, deterministic: global top-B empirical sensitivity (mean over patches)"
)
registry.register_method(
    "sipp_rand", select_rand, stochastic=True,
    description="SiPP, sampling: per-row convex allocation, importance sampling with reweighting",
)
registry.register_method(
    "sipp_hybrid", select_hybrid, stochastic=True,
    description="SiPP, hybrid: per row deterministic or sampled, whichever error bound is lower",
)
