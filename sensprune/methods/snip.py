"""SNIP: connection sensitivity (Lee et al. 2019).

Each kernel entry is scored by ``|g * w|`` where ``g`` is the gradient of the
loss ``ctx.loss_fn(model outputs, labels)`` with respect to ``w``, averaged over
the points of S; the ``B`` highest-scoring alive entries over all layers are
kept (deterministic, no reweighting).

The gradient is accumulated *signed* over chunks of ``ctx.chunk_size`` points
and the absolute value is taken only at the end. Chunks are weighted by their
number of points, so for a batch-mean loss (the default cross-entropy) the
result is exactly the gradient of the mean loss over S, independent of the
chunk size. (The reference keeps a running mean over its loader batches, which
is the same thing for equal batch sizes.) Nothing assumes trained weights: at
initialisation this is the original SNIP criterion.

Batch-dependent layers (BatchNorm with ``train=True``) see one chunk at a time;
pass ``apply_kwargs={'train': False}`` to use running statistics.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from sensprune import paths, points, registry, selection
from sensprune.adapter import with_params
from sensprune.context import PruneContext


def _kernel_grad_fn(ctx: PruneContext):
    """Jitted ``(params, x, y) -> [dL/dkernel per layer]``."""
    adapter, variables, loss_fn = ctx.adapter, ctx.variables, ctx.loss_fn
    layers = list(ctx.layers)

    def loss(params, x, y):
        return loss_fn(adapter.apply(with_params(variables, params), x), y)

    def kernel_grads(params, x, y):
        g = jax.grad(loss)(params, x, y)
        return [paths.get_kernel(g, layer) for layer in layers]

    return jax.jit(kernel_grads)


def loss_gradients(ctx: PruneContext) -> dict[str, np.ndarray]:
    """Layer name -> gradient of the mean loss over S w.r.t. the kernel (cached).

    Full chunks share one compiled shape; a shorter last chunk compiles once more.
    """
    return ctx.memo(_loss_gradients)


def _loss_gradients(ctx: PruneContext) -> dict[str, np.ndarray]:
    if ctx.labels is None:
        raise ValueError("method 'snip' needs labels of the points of S (labels=...)")
    if ctx.loss_fn is None:
        raise ValueError("method 'snip' needs a loss: loss_fn(outputs, labels) -> scalar")
    data, labels = ctx.data, np.asarray(ctx.labels)
    n = points.num_points(data)
    if labels.shape[0] != n:
        raise ValueError(
            f"labels must have one entry per point of data: got {labels.shape[0]} labels "
            f"for {n} points"
        )
    fn = ctx.memo(_kernel_grad_fn)
    chunk = max(int(ctx.chunk_size), 1)
    total = [np.zeros(layer.kernel_shape, np.float64) for layer in ctx.layers]
    for start in range(0, n, chunk):
        x, y = points.take(data, start, start + chunk), labels[start : start + chunk]
        grads = fn(ctx.params, jax.tree_util.tree_map(jnp.asarray, x), jnp.asarray(y))
        for acc, g in zip(total, grads):
            acc += (y.shape[0] / n) * np.asarray(g, np.float64)
    return {layer.name: g for layer, g in zip(ctx.layers, total)}


def _scores(ctx: PruneContext) -> dict[str, np.ndarray]:
    grads, kernels = loss_gradients(ctx), ctx.kernels()
    return {name: np.abs(grads[name] * kernels[name]) for name in kernels}


def scores(ctx: PruneContext) -> dict[str, np.ndarray]:
    """Layer name -> ``|mean_S(dL/dw) * w|`` (cached)."""
    return ctx.memo(_scores)


def _ranking(ctx: PruneContext) -> selection.GlobalRanking:
    return selection.rank_globally(scores(ctx), ctx.alive())


def select(ctx: PruneContext, budget: int, key: Optional[jax.Array] = None) -> registry.Selection:
    """Keeps the ``budget`` alive entries of largest ``|g * w|`` over all layers (ranked once per context)."""
    masks = selection.top_of(ctx.memo(_ranking), budget)
    return registry.Selection(masks=masks, scores=scores(ctx))


registry.register_method(
    "snip", select, needs_labels=True,
    description="SNIP: global top-B of |mean gradient of the loss * w| (works at initialisation)",
)
