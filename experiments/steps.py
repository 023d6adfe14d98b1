"""The jitted train step and the batches it is fed.

``train_step(state, batch_x, batch_y, key, options)``: one optimizer step of
mean softmax cross-entropy. The model and the optimizer come from the state's
static part (``apply_fn``, ``tx``); what else the step needs is a small hashable
:class:`StepOptions` (augmentation, compute dtype, mesh). Randomness: the step
uses ``fold_in(key, state.step)`` (split into augmentation and dropout keys), so
it depends only on (base key, global step).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.train_config import DTYPES, TrainConfig, as_train_config, check_choice
from experiments.train_state import TrainState
from sensprune import sharding as sharding_lib
from sensprune.types import PyTree

__all__ = [
    "AugmentFn",
    "StepOptions",
    "forward",
    "local_rows",
    "make_train_step",
    "place_batch",
    "resolve_augment",
    "train_step",
    "train_step_donated",
]

AugmentFn = Callable[[jax.Array, jax.Array], jax.Array]
StepFn = Callable[[TrainState, Any, Any, jax.Array], tuple[TrainState, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """What a step needs besides the state (hashable: a static jit argument).

    Attributes:
      augment_fn: ``fn(key, x) -> x`` applied to every training batch, or None.
      compute_dtype: dtype of the forward/backward pass (params stay float32).
      mesh: data-parallel mesh (``sensprune.sharding.data_mesh()``) or None;
        with a mesh, batches come split over its data axis and the state is
        placed by ``train_state.shard_state``.
    """

    augment_fn: Optional[AugmentFn] = None
    compute_dtype: str = "float32"
    mesh: Any = None

    @classmethod
    def create(cls, cfg: Any, *, augment_fn: Optional[AugmentFn] = None, mesh: Any = None) -> "StepOptions":
        """The options of a training config: its augmentation (unless
        ``augment_fn`` overrides it) and dtype."""
        cfg = as_train_config(cfg)
        return cls(resolve_augment(cfg.augment, augment_fn), cfg.dtype, mesh)


def resolve_augment(name: str, augment_fn: Optional[AugmentFn] = None) -> Optional[AugmentFn]:
    """``augment_fn`` if given, else ``AUGMENTATIONS[name]`` (None for 'none')."""
    if augment_fn is not None:
        return augment_fn
    if name == "none":
        return None
    try:
        from experiments.augment import AUGMENTATIONS  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ValueError(
            f"training config field 'augment'={name!r} needs experiments.augment.AUGMENTATIONS "
            f"({e}); pass augment_fn or use augment='none'"
        ) from e
    if name not in AUGMENTATIONS:
        raise ValueError(f"training config field 'augment'={name!r}: expected one of {['none', *AUGMENTATIONS]}")
    return AUGMENTATIONS[name]


def _cast_floats(tree: PyTree, dtype: Any) -> PyTree:
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def forward(
    apply_fn: Callable[..., Any],
    params: PyTree,
    batch_stats: PyTree,
    x: jax.Array,
    *,
    train: bool,
    compute_dtype: str = "float32",
    dropout_key: Optional[jax.Array] = None,
) -> tuple[jax.Array, PyTree]:
    """Logits (float32) and updated batch stats (same dtypes as given)."""
    check_choice("argument compute_dtype", compute_dtype, DTYPES)
    if compute_dtype == "bfloat16":
        params, x = _cast_floats(params, jnp.bfloat16), x.astype(jnp.bfloat16)
    else:
        x = x.astype(jnp.float32)
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    rngs = {"dropout": dropout_key} if dropout_key is not None else None
    if not (train and batch_stats):
        return apply_fn(variables, x, train=train, rngs=rngs).astype(jnp.float32), batch_stats
    logits, updates = apply_fn(variables, x, train=True, mutable=["batch_stats"], rngs=rngs)
    new_stats = jax.tree.map(lambda new, old: new.astype(old.dtype), updates["batch_stats"], batch_stats)
    return logits.astype(jnp.float32), new_stats


def _constrain(tree: PyTree, mesh: Any) -> PyTree:
    return tree if mesh is None else sharding_lib.constrain_params(tree, mesh)


def _train_step(
    state: TrainState, batch_x: jax.Array, batch_y: jax.Array, key: jax.Array, options: StepOptions
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step; metrics ``loss``, ``accuracy`` (batch top-1), ``lr``."""
    state = _constrain(state, options.mesh)
    aug_key, dropout_key = jax.random.split(jax.random.fold_in(key, state.step))
    x = batch_x if options.augment_fn is None else options.augment_fn(aug_key, batch_x)
    labels = batch_y.astype(jnp.int32)

    def loss_fn(params: PyTree) -> tuple[jax.Array, tuple[jax.Array, PyTree]]:
        logits, new_stats = forward(
            state.apply_fn, params, state.batch_stats, x, train=True,
            compute_dtype=options.compute_dtype, dropout_key=dropout_key,
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits, new_stats)

    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)),
        "lr": state.tx.learning_rate(state.step),
    }
    new_state = _constrain(state.apply_gradients(grads=grads, batch_stats=new_stats), options.mesh)
    if options.mesh is not None:  # XLA all-reduces gradients and batch statistics; metrics replicated
        rep = sharding_lib.replicated_sharding(options.mesh)
        metrics = jax.tree.map(lambda m: jax.lax.with_sharding_constraint(m, rep), metrics)
    return new_state, metrics


# ``train_step(state, batch_x, batch_y, key, options) -> (state, metrics)``, compiled once per
# (state structure incl. model and optimizer config, options, shapes).
train_step = jax.jit(_train_step, static_argnames="options")
# The same step, reusing the input state's buffers for the output state (the training loop).
train_step_donated = jax.jit(_train_step, static_argnames="options", donate_argnums=0)


def make_train_step(options: StepOptions = StepOptions(), *, donate: bool = False) -> StepFn:
    """``step(state, batch_x, batch_y, key) -> (state, metrics)`` with ``options`` bound.

    Returned as a ``functools.partial`` of the jitted step, so
    ``step.func.lower(*args, **step.keywords)`` lowers it. With
    ``donate=True`` the input state's buffers are donated to the output state
    (no new params / optimizer state / masks per step); the state passed in
    must not be used again.
    """
    return functools.partial(train_step_donated if donate else train_step, options=options)


def place_batch(mesh: Any, size: int, *local: np.ndarray) -> tuple:
    """Host arrays of one batch (``size`` rows in all) ready for a step: as they
    are without a mesh; else global arrays split over the data axis, built from
    the rows this process holds (``local_rows``)."""
    if mesh is None:
        return local
    if jax.process_count() == 1:
        return sharding_lib.shard_batch(local, mesh)
    return sharding_lib.global_batch_from_local(local, mesh, size)


def local_rows(mesh: Any, batch_size: int) -> Any:
    """Positions in every batch that this process reads (all without a mesh;
    ``sharding.process_rows``)."""
    return slice(None) if mesh is None else sharding_lib.process_rows(mesh, batch_size)


def check_mesh_batch(cfg: TrainConfig, mesh: Any) -> None:
    """``ValueError`` unless the mesh's data axis divides ``cfg.batch_size``."""
    if mesh is not None and cfg.batch_size % sharding_lib.mesh_size(mesh):
        raise ValueError(
            f"training config field 'batch_size'={cfg.batch_size}: expected a multiple of the "
            f"{sharding_lib.mesh_size(mesh)} devices of the mesh"
        )
