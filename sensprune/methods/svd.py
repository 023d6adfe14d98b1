"""SVD: per-layer truncated singular value decomposition (the low-rank baseline).

Each kernel is viewed as a matrix ``W`` of shape ``(n, d)``: rows are the inputs
of one output unit (``window * in_channels`` for a conv, Flax's HWIO layout
flattened), columns the output channels. Keeping rank ``k`` replaces ``W`` by
``U_k diag(s_k) V_k^T``, the best rank-``k`` approximation in Frobenius and
spectral norm (Eckart-Young), which a deployed model runs as two thin layers.

Counting is honest to that deployment (spec §1.4): a rank-``k`` layer costs
``k (n + d + 1)`` parameters (both factors and the singular values) and
``k (n + d)`` multiply-accumulates per output position. Every layer keeps the
same fraction of its parameters (the rank whose factorisation reaches that
fraction); a layer whose factorisation would not be smaller than the dense
kernel stays dense. The search over the fraction that meets the global keep
ratio is the shared one of :func:`sensprune.prune`.

The result is not a sparsity pattern: masks are all True and masked retraining
would leave the low-rank structure, so the method is registered as not
retrainable (the experiment package evaluates it without retraining).
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np

from sensprune import registry
from sensprune.context import PruneContext

__all__ = ["factorize", "low_rank", "rank_for_fraction", "select"]


def rank_for_fraction(n: int, d: int, fraction: float) -> int:
    """Largest rank whose factorisation costs at most ``fraction * n * d``, at least 1.

    Returns 0 when no rank below ``min(n, d)`` is cheaper than the dense
    ``(n, d)`` matrix at this fraction (the layer then stays dense).
    """
    if n < 1 or d < 1:
        raise ValueError(f"matrix shape must be positive, got ({n}, {d})")
    if fraction >= 1.0:
        return 0
    k = int(np.floor(fraction * n * d / (n + d + 1)))
    k = max(k, 1)
    if k >= min(n, d) or k * (n + d + 1) >= n * d:
        return 0
    return k


def factorize(kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SVD of the kernel's ``(n, d)`` matrix view: ``(u, s, vt)``, ``s`` descending."""
    matrix = np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1])
    return np.linalg.svd(matrix, full_matrices=False)


def low_rank(kernel: np.ndarray, rank: int, factors=None) -> np.ndarray:
    """Best rank-``rank`` approximation of ``kernel`` (same shape and dtype)."""
    u, s, vt = factors if factors is not None else factorize(kernel)
    approx = (u[:, :rank] * s[:rank]) @ vt[:rank]
    return approx.reshape(kernel.shape).astype(kernel.dtype)


def _all_factors(ctx: PruneContext) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return {name: factorize(k) for name, k in ctx.kernels().items()}


def _factors(ctx: PruneContext) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Layer name -> SVD factors of its kernel matrix (cached)."""
    return ctx.memo(_all_factors)


def select(ctx: PruneContext, budget: int, key: Optional[jax.Array] = None) -> registry.Selection:
    """Gives every layer the rank that keeps ``budget / (alive entries)`` of its size."""
    alive = ctx.alive()
    total = sum(int(a.sum()) for a in alive.values())
    fraction = min(max(budget, 0) / max(total, 1), 1.0)
    factors = _factors(ctx)
    masks, kernels, sizes, flops, ranks, scores = {}, {}, {}, {}, {}, {}
    for layer in ctx.layers:
        kernel = ctx.kernels()[layer.name]
        n, d = kernel.size // kernel.shape[-1], kernel.shape[-1]
        masks[layer.name] = np.ones(kernel.shape, bool)
        scores[layer.name] = factors[layer.name][1]
        k = rank_for_fraction(n, d, fraction)
        ranks[layer.name] = k if k else min(n, d)
        if k == 0:
            masks[layer.name] = alive[layer.name]
            continue
        kernels[layer.name] = low_rank(kernel, k, factors[layer.name])
        sizes[layer.name] = k * (n + d + 1)
        flops[layer.name] = k * (n + d) * layer.num_patches
    return registry.Selection(
        masks=masks, scores=scores, kernels=kernels, sizes=sizes, flops=flops,
        info={"ranks": ranks, "fraction": fraction},
    )


registry.register_method(
    "svd", select, retrainable=False,
    description="SVD: per-layer truncated SVD, same parameter fraction per layer (low rank, not retrained)",
)
