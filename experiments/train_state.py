"""The train state: flax's ``TrainState`` plus BatchNorm statistics.

A :class:`TrainState` carries everything a train step needs. Its pytree part
(``step``, ``params``, ``batch_stats``, ``opt_state``; with masks inside
``opt_state``) changes every step; its static part (``apply_fn`` and ``tx``, an
:class:`experiments.optim.Optimizer`) is hashable by value, so jit compiles one
step per (model, optimizer config, shapes) with no optimizer passed as a
static argument.

Checkpoints hold the pytree part only (:func:`state_to_items`); restoring
(:func:`state_from_items`) fills a template state of the same model and config.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
from flax.training import train_state

from experiments.optim import Optimizer
from experiments.rng import make_key
from sensprune import masking
from sensprune import sharding as sharding_lib
from sensprune.types import PyTree

__all__ = [
    "TrainState",
    "abstract_state",
    "committed",
    "create_state",
    "local_state",
    "shard_state",
    "state_from_items",
    "state_from_params",
    "state_to_items",
    "variables_of",
]


class TrainState(train_state.TrainState):
    """flax's ``TrainState`` with BatchNorm running statistics.

    Attributes (besides flax's ``step``, ``apply_fn``, ``params``, ``tx``,
    ``opt_state``):
      batch_stats: BatchNorm running statistics (``{}`` without BatchNorm).

    ``step`` is the *global* step (int32): epoch ``e`` covers steps
    ``[e * S, (e + 1) * S)``; ``tx`` is an :class:`~experiments.optim.Optimizer`
    (masked: ``opt_state`` holds a ``masking.PruneMaskState`` with the masks).
    """

    batch_stats: PyTree = flax.struct.field(pytree_node=True)

    @property
    def masks(self) -> Optional[PyTree]:
        """The masks of a masked optimizer, else ``None``."""
        return masking.get_masks(self.opt_state) if self.tx.masked else None


def committed(tree: PyTree) -> PyTree:
    """Commits uncommitted arrays to the default device, so fresh and restored
    (committed) states hit the same compiled step."""
    device = jax.local_devices()[0]

    def commit(a: Any) -> Any:
        if isinstance(a, jax.core.Tracer) or not isinstance(a, jax.Array) or a.committed:
            return a
        return jax.device_put(a, device)

    return jax.tree.map(commit, tree)


def variables_of(state: TrainState) -> dict[str, PyTree]:
    """``{'params': ...}`` plus ``'batch_stats'`` when there are any (for ``apply``)."""
    out = {"params": state.params}
    if state.batch_stats:
        out["batch_stats"] = state.batch_stats
    return out


def state_from_params(
    model: Any, variables: Mapping[str, PyTree], opt: Optimizer, masks: Optional[PyTree] = None
) -> TrainState:
    """A fresh optimizer around ``variables`` (``params`` and optional
    ``batch_stats``, e.g. of a pruned net): what (re)training starts from, at
    global step ``start_epoch * steps_per_epoch``. With ``masks`` the params
    are masked and the (masked) optimizer keeps them so."""
    params = jax.tree.map(jnp.asarray, variables["params"])
    if masks is not None:
        params = masking.apply_masks(params, masks)
    opt = dataclasses.replace(opt, masked=masks is not None)
    batch_stats = jax.tree.map(jnp.asarray, variables.get("batch_stats") or {})
    state = TrainState(
        step=jnp.asarray(opt.config.start_epoch * opt.steps_per_epoch, dtype=jnp.int32),
        apply_fn=model.apply,
        params=params,
        tx=opt,
        opt_state=opt.init(params, masks),
        batch_stats=batch_stats,
    )
    return committed(state)


@functools.partial(jax.jit, static_argnames=("model", "input_shape"))
def _init_variables(key: jax.Array, *, model: Any, input_shape: tuple[int, ...]) -> PyTree:
    k_params, k_dropout = jax.random.split(key)
    x = jnp.zeros((1, *input_shape), dtype=jnp.float32)
    return model.init({"params": k_params, "dropout": k_dropout}, x, train=False)


def create_state(
    model: Any, key: jax.Array, input_shape: Sequence[int], opt: Optimizer,
    masks: Optional[PyTree] = None,
) -> TrainState:
    """Initializes ``model`` on zeros of ``[1, *input_shape]`` (per-example shape,
    no batch axis) and wraps the variables with a fresh optimizer."""
    variables = _init_variables(key, model=model, input_shape=tuple(input_shape))
    return state_from_params(model, variables, opt, masks)


def abstract_state(
    model: Any, input_shape: Sequence[int], opt: Optimizer, masks: Optional[PyTree] = None
) -> TrainState:
    """:func:`create_state`'s state as ``jax.ShapeDtypeStruct`` leaves (a restore
    target and template for :func:`state_from_items`)."""
    return jax.eval_shape(lambda k: create_state(model, k, input_shape, opt, masks), make_key(0))


def state_to_items(state: TrainState) -> dict[str, PyTree]:
    """``params``, ``batch_stats``, ``opt_state`` of ``state`` (checkpoint items)."""
    return {"params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state}


def state_from_items(like: TrainState, items: Mapping[str, PyTree], step: int) -> TrainState:
    """Inverse of :func:`state_to_items`: ``like`` (same model and optimizer, e.g.
    from :func:`abstract_state`) holding ``items`` at global step ``step``."""
    state = like.replace(
        step=jnp.asarray(step, dtype=jnp.int32),
        params=items["params"],
        batch_stats=items.get("batch_stats") or {},
        opt_state=items["opt_state"],
    )
    return committed(state)


def shard_state(tree: PyTree, mesh: Any) -> PyTree:
    """``tree`` (a :class:`TrainState`, params, a key, ...) placed on ``mesh`` by
    :func:`sensprune.sharding.shard_params`: replicated, or split over the
    mesh's ``'model'`` axis; unchanged when ``mesh`` is None."""
    return tree if mesh is None else sharding_lib.shard_params(tree, mesh)


def local_state(tree: PyTree) -> PyTree:
    """``tree`` (e.g. a state placed by :func:`shard_state`) copied whole to
    this process's first device: the inverse of :func:`shard_state`. Arrays
    split over a ``'model'`` axis are all-gathered first (multi-host: every
    process must call this)."""
    return committed(jax.device_get(sharding_lib.gather(tree)))
