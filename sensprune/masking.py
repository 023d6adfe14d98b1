"""Pruning masks: helpers and an optax wrapper that keeps pruned weights at zero.

A mask tree has the structure of the params tree, with one ``bool`` array per
leaf (``True`` = kept). Leaves that are never pruned (biases, norm parameters,
embeddings) carry all-``True`` masks.

During retraining, :func:`masked` wraps any optax transformation so that pruned
entries receive exactly zero gradient *and* exactly zero update. The masks live
in the optimizer state, so swapping them with :func:`set_masks` between pruning
rounds does not recompile a jitted train step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sensprune.types import PyTree

__all__ = [
    "PruneMaskState",
    "apply_masks",
    "check_same_structure",
    "get_masks",
    "intersect_masks",
    "mask_sparsity",
    "masked",
    "nonzero_masks",
    "ones_like_masks",
    "set_masks",
    "summarize_masks",
]


# ----------------------------------------------------------------------------
# Structure checks
# ----------------------------------------------------------------------------


def _leaf_name(key_path: jax.tree_util.KeyPath) -> str:
    """``'Dense_0/kernel'`` for a key path (same convention as ``Layer.name``)."""
    return jax.tree_util.keystr(key_path, simple=True, separator="/")


def _named_leaves(tree: PyTree) -> dict[str, Any]:
    """Leaves of ``tree`` by name, in flattening order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_leaf_name(path): leaf for path, leaf in leaves}


def _shape(leaf: Any) -> tuple[int, ...]:
    shape = getattr(leaf, "shape", None)
    return tuple(shape) if shape is not None else tuple(np.shape(leaf))


def _dtype(leaf: Any) -> np.dtype:
    dtype = getattr(leaf, "dtype", None)
    return np.dtype(dtype) if dtype is not None else np.result_type(leaf)


def check_same_structure(
    params: PyTree,
    masks: PyTree,
    what: str = "masks",
    *,
    against: str = "params",
    require_bool: bool = True,
) -> None:
    """Raises ``ValueError`` unless ``masks`` matches ``params`` leaf by leaf.

    Checks, in order of the params leaves: every leaf of ``params`` has a leaf
    of the same name and shape in ``masks`` (and, with ``require_bool``, of
    dtype ``bool``); then that ``masks`` has no extra leaves; then that the two
    trees use the same containers. Only static information (names, shapes,
    dtypes) is used, so this also works on tracers inside ``jax.jit``.

    Args:
      params: reference tree.
      masks: tree to check.
      what: name of ``masks`` in the error message.
      against: name of ``params`` in the error message.
      require_bool: also require every leaf of ``masks`` to be ``bool``.
    """
    prefix = f"{what} do not match {against}:"
    ref = _named_leaves(params)
    got = _named_leaves(masks)
    for name, leaf in ref.items():
        if name not in got:
            raise ValueError(
                f"{prefix} leaf {name!r} is in {against} but missing from {what}"
            )
        ref_shape, got_shape = _shape(leaf), _shape(got[name])
        if ref_shape != got_shape:
            raise ValueError(
                f"{prefix} leaf {name!r} has shape {ref_shape} in {against} "
                f"but {got_shape} in {what}"
            )
        if require_bool and _dtype(got[name]) != np.bool_:
            raise ValueError(
                f"{prefix} leaf {name!r} has dtype {_dtype(got[name])} in {what}, "
                "expected bool"
            )
    for name in got:
        if name not in ref:
            raise ValueError(
                f"{prefix} leaf {name!r} is in {what} but not in {against}"
            )
    ref_def = jax.tree_util.tree_structure(params)
    got_def = jax.tree_util.tree_structure(masks)
    if ref_def != got_def:  # type: ignore[operator]  # PyTreeDef compares by structure
        raise ValueError(
            f"{prefix} same leaves but different containers "
            f"({against}: {ref_def}; {what}: {got_def})"
        )


# ----------------------------------------------------------------------------
# Mask helpers
# ----------------------------------------------------------------------------


def ones_like_masks(params: PyTree) -> PyTree:
    """All-``True`` masks (nothing pruned) with the structure of ``params``."""
    # host ones put on the device: jnp.ones would compile one program per shape
    return jax.tree.map(lambda p: jax.device_put(np.ones(_shape(p), dtype=bool)), params)


def nonzero_masks(params: PyTree) -> PyTree:
    """Masks that keep exactly the nonzero entries of ``params``."""
    return jax.tree.map(lambda p: jnp.asarray(p) != 0, params)


def intersect_masks(a: PyTree, b: PyTree) -> PyTree:
    """Entry-wise AND of two mask trees (kept only where both keep)."""
    check_same_structure(a, b, "second masks", against="first masks")
    check_same_structure(b, a, "first masks", against="second masks")
    return jax.tree.map(jnp.logical_and, a, b)


def _masks_for(params: PyTree, masks: PyTree) -> PyTree:
    """Boxed masks (partitioned, :mod:`sensprune.boxing`) unboxed when ``params`` are plain."""
    from sensprune import boxing

    if boxing.has_boxes(masks) and not boxing.has_boxes(params):
        return boxing.unbox(masks)
    return masks


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """Zeroes the pruned entries of ``params``; dtypes are kept.

    Boxed masks (``PruneResult.masks`` of partitioned params) also apply to the unboxed params.
    """
    masks = _masks_for(params, masks)
    check_same_structure(params, masks)

    def apply(p: jax.Array, m: jax.Array) -> jax.Array:
        p = jnp.asarray(p)
        return jnp.where(m, p, jnp.zeros((), dtype=p.dtype))

    return jax.tree.map(apply, params, masks)


def summarize_masks(masks: PyTree) -> dict[str, tuple[int, int]]:
    """``{leaf name: (kept, total)}`` for every leaf, in flattening order."""
    out = {}
    for name, m in _named_leaves(masks).items():
        m = np.asarray(m)
        out[name] = (int(np.count_nonzero(m)), int(m.size))
    return out


def mask_sparsity(masks: PyTree) -> float:
    """Fraction of pruned (``False``) entries over all leaves (0.0 if empty)."""
    counts = summarize_masks(masks).values()
    total = sum(t for _, t in counts)
    if total == 0:
        return 0.0
    return 1.0 - sum(k for k, _ in counts) / total


# ----------------------------------------------------------------------------
# Optax wrapper
# ----------------------------------------------------------------------------


class PruneMaskState(NamedTuple):
    """State of :func:`masked`: the inner optimizer state and the masks."""

    inner_state: optax.OptState
    masks: PyTree


def _mask_tree(tree: PyTree, masks: PyTree) -> PyTree:
    return jax.tree.map(
        lambda u, m: jnp.where(m, u, jnp.zeros((), dtype=u.dtype)), tree, masks
    )


def masked(
    tx: optax.GradientTransformation, masks: PyTree | None = None
) -> optax.GradientTransformationExtraArgs:
    """Wraps ``tx`` so that pruned entries get zero gradient and zero update.

    Gradients are masked before ``tx`` (so momentum / Adam moments of pruned
    entries stay 0) and the updates of ``tx`` are masked again afterwards (so
    weight decay or any other params-dependent term cannot move them). Pruned
    weights that are 0 therefore stay exactly 0 under ``optax.apply_updates``;
    mask the params once with :func:`apply_masks` before training.

    The masks are stored in the state (:class:`PruneMaskState`); replace them
    with :func:`set_masks` without retracing a jitted step that takes the
    state as an argument.

    Args:
      tx: any optax gradient transformation (chains, schedules, ...).
      masks: bool tree with the structure of params (``True`` = kept). If
        ``None``, ``init`` keeps the nonzero entries of the params it is given
        (torchprune's ``register_sparsity_pattern``).
    """
    inner = optax.with_extra_args_support(tx)

    def init_fn(params: optax.Params) -> PruneMaskState:
        if masks is None:
            init_masks = nonzero_masks(params)
        else:
            init_masks = _masks_for(params, masks)
            check_same_structure(params, init_masks)
            init_masks = jax.tree.map(jnp.asarray, init_masks)
        return PruneMaskState(inner_state=inner.init(params), masks=init_masks)

    def update_fn(
        updates: optax.Updates,
        state: PruneMaskState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, PruneMaskState]:
        check_same_structure(updates, state.masks, against="updates")
        updates = _mask_tree(updates, state.masks)
        updates, inner_state = inner.update(
            updates, state.inner_state, params, **extra_args
        )
        updates = _mask_tree(updates, state.masks)
        return updates, PruneMaskState(inner_state=inner_state, masks=state.masks)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_mask_state(node: Any) -> bool:
    return isinstance(node, PruneMaskState)


def _find_mask_states(opt_state: optax.OptState) -> list[PruneMaskState]:
    nodes = jax.tree.leaves(opt_state, is_leaf=_is_mask_state)
    return [n for n in nodes if _is_mask_state(n)]


def _single_mask_state(opt_state: optax.OptState) -> PruneMaskState:
    found = _find_mask_states(opt_state)
    if len(found) != 1:
        raise ValueError(
            "opt_state must contain exactly one PruneMaskState (the state of "
            f"sensprune.masking.masked), found {len(found)}"
        )
    return found[0]


def get_masks(opt_state: optax.OptState) -> PyTree:
    """Masks held by the (possibly nested) :func:`masked` state."""
    return _single_mask_state(opt_state).masks


def set_masks(opt_state: optax.OptState, masks: PyTree) -> optax.OptState:
    """Returns ``opt_state`` with its masks replaced by ``masks``.

    ``masks`` must have the structure, shapes and dtype (bool) of the current
    masks, so a jitted step is not retraced. The inner optimizer state is kept
    as is: moments of newly pruned entries no longer reach the weights because
    updates are masked after the inner transformation.
    """
    old = _single_mask_state(opt_state).masks
    check_same_structure(old, masks, "new masks", against="current masks")
    new_masks = jax.tree.map(jnp.asarray, masks)

    def replace(node: Any) -> Any:
        if _is_mask_state(node):
            return node._replace(masks=new_masks)
        return node

    return jax.tree.map(replace, opt_state, is_leaf=_is_mask_state)
