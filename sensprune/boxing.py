"""Boxed (partitioned) params: ``nn.with_partitioning`` / ``nn.with_logical_partitioning``.

Large-model code annotates params with sharding metadata; ``model.init`` then
returns *boxes* (``nn.Partitioned`` / ``nn.LogicallyPartitioned``, subclasses of
``flax.core.meta.AxisMetadata``) around the arrays. sensprune works on the
plain arrays inside (:func:`unbox`; ``model.apply`` accepts them) and gives its
results back in boxes with the same metadata (:func:`rebox_like`): pruned
params, and bool masks boxed like the params they mask. So the partitioning
metadata of the params also drives the sharding of the masks::

    specs = nn.get_partition_spec(result.masks)          # == that of the params
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    masks = shard_like(result.masks, mesh, rules)        # device_put by the metadata

:func:`layer_specs` gives the partition spec of each prunable layer's kernel,
for kernel-shaped per-layer results such as ``PruneResult.sensitivities``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
from flax.core import meta

from sensprune import paths
from sensprune.types import Layer

__all__ = [
    "has_boxes", "is_box", "layer_specs", "rebox_like", "rebox_result", "shard_like", "unbox", "unbox_variables",
]


def is_box(node: Any) -> bool:
    """True for a Flax metadata box (``nn.Partitioned``, ``nn.LogicallyPartitioned``, ...)."""
    return isinstance(node, meta.AxisMetadata)


def has_boxes(tree: Any) -> bool:
    """True if any node of ``tree`` is a metadata box."""
    return any(is_box(leaf) for leaf in jax.tree_util.tree_leaves(tree, is_leaf=is_box))


def unbox(tree: Any) -> Any:
    """``tree`` with every box replaced by the array it holds (plain trees come back as they are)."""
    return meta.unbox(tree) if has_boxes(tree) else tree


def unbox_variables(variables: Mapping[str, Any]) -> Mapping[str, Any]:
    """Every collection of ``variables`` unboxed (the same object when nothing is boxed)."""
    if not has_boxes(dict(variables)):
        return variables
    return {name: unbox(value) for name, value in variables.items()}


def rebox_like(boxed: Any, plain: Any) -> Any:
    """``plain`` (a tree like ``unbox(boxed)``) in the boxes of ``boxed``: same metadata, new values.

    Masks come back as bool arrays in boxes equal to those of the params, so
    ``nn.get_partition_spec`` gives the params' specs for them.
    """
    if not has_boxes(boxed):
        return plain
    treedef: Any  # jax's PyTreeDef stub lacks flatten_up_to
    leaves, treedef = jax.tree_util.tree_flatten(boxed, is_leaf=is_box)
    values = treedef.flatten_up_to(plain)
    return treedef.unflatten([b.replace_boxed(v) if is_box(b) else v for b, v in zip(leaves, values)])


def shard_like(tree: Any, mesh: jax.sharding.Mesh, rules: Optional[Sequence[tuple[str, Any]]] = None) -> Any:
    """The values of a boxed ``tree`` placed on ``mesh`` as its partitioning metadata says (unboxed).

    Logical axis names are mapped to mesh axes with ``rules`` (default: the
    rules set by ``nn.logical_axis_rules``); plain leaves are replicated.
    """
    specs = nn.get_partition_spec(tree)
    if rules is None:
        shardings = nn.logical_to_mesh_sharding(specs, mesh)
    else:
        shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    return jax.device_put(unbox(tree), shardings)


def layer_specs(boxed_params: Any, layers: Sequence[Layer]) -> dict[str, Any]:
    """Layer name -> the ``PartitionSpec`` of its kernel (``PartitionSpec()`` for plain kernels)."""
    specs = nn.get_partition_spec(boxed_params)
    return {layer.name: paths.get_kernel(specs, layer) for layer in layers}


def rebox_result(result: Any, boxed_params: Any) -> Any:
    """A :class:`~sensprune.types.PruneResult` with params and masks in the boxes of ``boxed_params``."""
    if not has_boxes(boxed_params):
        return result
    import dataclasses

    return dataclasses.replace(
        result, params=rebox_like(boxed_params, result.params), masks=rebox_like(boxed_params, result.masks)
    )
