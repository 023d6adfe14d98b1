"""Functional access to nested param dicts by key path."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sensprune.types import Layer, Path


def get_path(tree: Mapping[str, Any], path: Path) -> Any:
    """Returns ``tree[path[0]][path[1]]...``; KeyError names the full path."""
    node = tree
    for i, key in enumerate(path):
        if not isinstance(node, Mapping) or key not in node:
            raise KeyError(
                f"path {'/'.join(path)!r} not found in the params tree "
                f"(missing {key!r} at depth {i})"
            )
        node = node[key]
    return node


def set_path(tree: Mapping[str, Any], path: Path, value: Any) -> dict:
    """Returns a copy of ``tree`` with the leaf at ``path`` replaced (no mutation)."""
    if not path:
        return value
    head, *rest = path
    if head not in tree:
        raise KeyError(f"path {'/'.join(path)!r} not found in the params tree")
    out = dict(tree)
    out[head] = set_path(tree[head], tuple(rest), value)
    return out


def kernel_path(layer: Layer) -> Path:
    """Path of a layer's kernel leaf in the params tree."""
    return layer.path + (getattr(layer, "param_name", "kernel"),)


def bias_path(layer: Layer) -> Path:
    """Path of a layer's bias leaf in the params tree."""
    return layer.path + ("bias",)


def _swap_view(value: Any) -> Any:
    """The leaf's last two axes swapped and its window axes reversed (an involution):
    ``.T`` of a 2-D table, the flipped in/out-swapped kernel of a transposed conv."""
    flip = (slice(None, None, -1),) * (value.ndim - 2)
    return value[flip].swapaxes(-1, -2)


def _is_view(layer: Layer) -> bool:
    return bool(getattr(layer, "param_shape", ())) or bool(getattr(layer, "transposed", False))


def _set_slice(leaf: Any, index: tuple[int, ...], value: Any) -> Any:
    """``leaf`` with ``leaf[index]`` replaced (numpy leaves stay numpy; nothing is mutated)."""
    if isinstance(leaf, np.ndarray) and not isinstance(value, jax.core.Tracer):
        out = leaf.copy()
        out[index] = np.asarray(value)
        return out
    return jnp.asarray(leaf).at[index].set(value)


def get_kernel(params: Mapping[str, Any], layer: Layer) -> Any:
    """The layer's kernel, as the ``layer.kernel_shape`` view when the leaf has another shape
    (and its own slice of a leaf stacked by ``nn.scan``: ``layer.index``)."""
    return kernel_view(get_path(params, kernel_path(layer)), layer)


def stored_kernel(params: Mapping[str, Any], layer: Layer) -> Any:
    """The layer's kernel entries as stored: its leaf, or its ``layer.index`` slice of a stacked leaf,
    without the ``kernel_shape`` view (enough to count entries; no reshape of a device array)."""
    return _own_slice(get_path(params, kernel_path(layer)), layer)


def _own_slice(leaf: Any, layer: Layer) -> Any:
    """The layer's ``layer.index`` slice of a leaf stacked by ``nn.scan`` (the leaf itself without one)."""
    index = getattr(layer, "index", ())
    return leaf[index] if index and hasattr(leaf, "shape") else leaf


def kernel_view(leaf: Any, layer: Layer) -> Any:
    """What :func:`get_kernel` returns, from the layer's kernel leaf as stored (e.g. a NumPy copy
    read to the host): its ``layer.index`` slice, then the ``layer.kernel_shape`` view."""
    leaf = _own_slice(leaf, layer)
    if not _is_view(layer) or not hasattr(leaf, "reshape"):
        return leaf
    return (_swap_view(leaf) if layer.transposed else leaf).reshape(layer.kernel_shape)


def set_kernel(params: Mapping[str, Any], layer: Layer, value: Any) -> dict:
    """``params`` with the layer's kernel replaced by ``value`` (a ``kernel_shape`` view or the leaf shape)."""
    shape = tuple(getattr(layer, "param_shape", ())) or tuple(layer.kernel_shape)
    if _is_view(layer) and hasattr(value, "reshape") and tuple(value.shape) == tuple(layer.kernel_shape):
        if layer.transposed:  # the view of a leaf whose shape has its last two axes swapped
            value = _swap_view(value.reshape(shape[:-2] + (shape[-1], shape[-2])))
        else:
            value = value.reshape(shape)
    index = getattr(layer, "index", ())
    if index:
        value = _set_slice(get_path(params, kernel_path(layer)), index, value)
    return set_path(params, kernel_path(layer), value)
