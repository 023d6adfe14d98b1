"""Test-set evaluation: mean loss, top-1 and top-5 error, in fixed-size batches."""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.steps import device_batch, forward
from experiments.train_config import DTYPES, check_choice, check_int
from experiments.train_state import TrainState, shard_state
from sensprune import sharding as sharding_lib
from sensprune.types import PyTree

__all__ = ["eval_step", "evaluate"]


@functools.partial(jax.jit, static_argnames=("apply_fn", "compute_dtype", "mesh"))
def eval_step(
    params: PyTree,
    batch_stats: PyTree,
    batch_x: jax.Array,
    batch_y: jax.Array,
    weight: jax.Array,
    *,
    apply_fn: Callable[..., Any],
    compute_dtype: str = "float32",
    mesh: Any = None,
) -> dict[str, jax.Array]:
    """Per-batch sums over examples with ``weight`` (1 real, 0 padding):
    ``loss`` (cross-entropy), ``correct1``, ``correct5``, ``count``
    (replicated over ``mesh`` when given)."""
    logits, _ = forward(apply_fn, params, batch_stats, batch_x, train=False, compute_dtype=compute_dtype)
    labels = batch_y.astype(jnp.int32)
    w = weight.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    _, top = jax.lax.top_k(logits, min(5, logits.shape[-1]))
    sums = {
        "loss": jnp.sum(w * loss),
        "correct1": jnp.sum(w * (top[:, 0] == labels)),
        "correct5": jnp.sum(w * jnp.any(top == labels[:, None], axis=-1)),
        "count": jnp.sum(w),
    }
    if mesh is not None:
        rep = sharding_lib.replicated_sharding(mesh)
        sums = jax.tree.map(lambda s: jax.lax.with_sharding_constraint(s, rep), sums)
    return sums


def _split_variables(state_or_variables: Any) -> tuple[PyTree, PyTree]:
    if isinstance(state_or_variables, TrainState):
        return state_or_variables.params, state_or_variables.batch_stats
    if isinstance(state_or_variables, Mapping) and "params" in state_or_variables:
        return state_or_variables["params"], state_or_variables.get("batch_stats") or {}
    return state_or_variables, {}


def evaluate(
    state_or_variables: Any,
    model: Any,
    x: Any,
    y: Any,
    batch_size: int,
    *,
    dtype: str = "float32",
    mesh: Any = None,
) -> dict[str, float]:
    """Mean ``loss``, top-1 ``error`` and top-5 ``error5`` (fractions in [0, 1])
    over all of ``x``; batches have a fixed size (the last one is zero-padded
    and weighted out), so this compiles once per shape.

    ``state_or_variables``: a :class:`TrainState`, a variables dict
    (``{'params': ..., 'batch_stats': ...}``) or a bare params tree.
    ``mesh``: evaluate data-parallel, batches split over its data axis (the
    batch size is rounded up to a multiple of the axis size; the padding is
    weighted out), params placed by ``shard_state``.
    """
    batch_size = check_int("argument batch_size", batch_size, 1)
    check_choice("argument dtype", dtype, DTYPES)
    params, batch_stats = _split_variables(state_or_variables)
    x, y = np.asarray(x), np.asarray(y)
    n = len(x)
    if n == 0 or len(y) != n:
        raise ValueError(f"evaluate: x has {n} examples and y has {len(y)}; expected equal, > 0")
    if mesh is not None:
        size = sharding_lib.mesh_size(mesh)
        batch_size = -(-batch_size // size) * size
        params, batch_stats = shard_state((params, batch_stats), mesh)
    step = functools.partial(eval_step, apply_fn=model.apply, compute_dtype=dtype, mesh=mesh)
    totals = None
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        w = (idx < n).astype(np.float32)
        idx = np.where(idx < n, idx, 0)  # padding rows: example 0, weighted out
        sums = step(params, batch_stats, *device_batch(mesh, x, y, idx, w))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    t = {k: float(v) for k, v in jax.device_get(totals).items()}
    return {
        "loss": t["loss"] / t["count"],
        "error": 1.0 - t["correct1"] / t["count"],
        "error5": 1.0 - t["correct5"] / t["count"],
    }
