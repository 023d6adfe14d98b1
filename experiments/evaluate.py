"""Test-set evaluation: mean loss, top-1 and top-5 error, in fixed-size batches."""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from experiments import data as data_lib
from experiments.steps import forward, local_rows, place_batch
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
    over all of ``x``; batches have a fixed size (the last one is padded and
    weighted out), so this compiles once per shape.

    ``x, y``: host arrays, or ``x`` an ``experiments.data.Examples`` (in memory
    or streamed) and ``y`` None.

    ``state_or_variables``: a :class:`TrainState`, a variables dict
    (``{'params': ..., 'batch_stats': ...}``) or a bare params tree.
    ``mesh``: evaluate data-parallel, batches split over its data axis (the
    batch size is rounded up to a multiple of the axis size; the padding is
    weighted out), params placed by ``shard_state``.
    """
    batch_size = check_int("argument batch_size", batch_size, 1)
    check_choice("argument dtype", dtype, DTYPES)
    params, batch_stats = _split_variables(state_or_variables)
    examples = data_lib.as_examples(x, y)
    n = len(examples)
    if n == 0:
        raise ValueError("evaluate: no examples; expected > 0")
    if mesh is not None:
        size = sharding_lib.mesh_size(mesh)
        batch_size = -(-batch_size // size) * size
        params, batch_stats = shard_state((params, batch_stats), mesh)
    step = functools.partial(eval_step, apply_fn=model.apply, compute_dtype=dtype, mesh=mesh)
    rows = local_rows(mesh, batch_size)  # each process reads only the rows its devices hold
    plan = list(data_lib.padded_index_batches(n, batch_size))  # (indices, weights); padding: example 0
    batches = examples.batches(idx[rows] for idx, _ in plan)
    totals = None
    for (_, w), (bx, by) in zip(plan, batches):
        sums = step(params, batch_stats, *place_batch(mesh, batch_size, bx, by, w[rows]))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    t = {k: float(v) for k, v in jax.device_get(totals).items()}
    return {
        "loss": t["loss"] / t["count"],
        "error": 1.0 - t["correct1"] / t["count"],
        "error5": 1.0 - t["correct5"] / t["count"],
    }
