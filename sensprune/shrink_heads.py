"""Multi-axis kernels in :mod:`sensprune.shrink`: attention projections lose whole heads.

A ``nn.DenseGeneral`` / ``nnx.LinearGeneral`` / ``nn.Einsum`` kernel
``(*in axes, *out axes)`` is scored as a 2-D ``[prod(in), prod(out)]`` view
(:mod:`sensprune.layer_kinds`); its channel groups are units of that view (an
attention head: ``head_dim`` units). Shrinking slices the kernel along each
axis, which is possible only when the kept units form a box (whole heads):
:func:`representable` restores removed groups that would cut a kernel
otherwise (they stay fully masked, so the outputs do not change), and
:func:`view_steps` gives the per-axis slices. The shrunk layers are computed
from their stored kernels (:func:`dense_general`, :func:`einsum`,
:func:`nnx_direct`), so modules keep their ``features`` / ``num_heads`` fields.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype
from jax import lax

from sensprune import dependencies as deps_lib
from sensprune.types import Layer

__all__ = ["add_bias", "axis_steps", "dense_general", "einsum", "nnx_direct", "representable", "view_dims",
           "view_steps"]


def add_bias(y: jax.Array, bias: Optional[jax.Array]) -> jax.Array:
    """``y + bias`` with the bias on ``y``'s trailing axes."""
    return y if bias is None else y + jnp.reshape(bias, (1,) * (y.ndim - bias.ndim) + bias.shape)


def dense_general(module: Any, x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array]) -> jax.Array:
    """``nn.DenseGeneral`` / ``nnx.LinearGeneral`` (no batch dims) from its stored kernel: fewer
    heads = a narrower kernel."""
    axis = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
    axis = tuple(a % x.ndim for a in axis)
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=module.dtype)
    dims = ((axis, tuple(range(len(axis)))), ((), ()))
    return add_bias(lax.dot_general(x, kernel, dims, precision=module.precision), bias)


def nnx_direct(module: Any, args: tuple, kwargs: dict) -> Optional[jax.Array]:
    """An ``nnx.LinearGeneral`` (no batch axes) or ``nnx.Einsum`` computed from its (possibly narrower)
    kernel, else None (other nnx layers compute from their kernels anyway; ``nnx.Einsum`` would shape
    its bias by its stale ``kernel_shape``)."""
    from flax import nnx

    if isinstance(module, nnx.Einsum):
        x = args[0] if args else kwargs["inputs"]
        bias = module.bias[...] if module.bias is not None else None
        spec = args[1] if len(args) > 1 else kwargs.get("einsum_str")
        return einsum(module, x, module.kernel[...], bias, spec)
    if not isinstance(module, nnx.LinearGeneral) or module.batch_axis:
        return None
    x = args[0] if args else kwargs["inputs"]
    bias = module.bias[...] if module.bias is not None else None
    return dense_general(module, x, module.kernel[...], bias)


def einsum(module: Any, x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array],
           einsum_str: Optional[str]) -> jax.Array:
    """``nn.Einsum`` / ``nnx.Einsum`` from its stored kernel (``einsum_str``: the one passed at call
    time, if any). The bias lies on the output axes named in the kernel's subscripts."""
    import opt_einsum

    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=module.dtype)
    spec = (einsum_str or module.einsum_str or "").replace(" ", "")
    y = jnp.einsum(spec, x, kernel, precision=module.precision)
    if bias is None:
        return y
    operands, result, _ = opt_einsum.parser.parse_einsum_input((spec, x, kernel))
    rhs = operands.split(",")[1]
    return y + jnp.reshape(bias, [kernel.shape[rhs.index(c)] if c in rhs else 1 for c in result])


def view_dims(layer: Layer) -> Optional[tuple[tuple[int, ...], tuple[int, ...]]]:
    """``(input axes, output axes)`` of the kernel leaf of a DenseGeneral/Einsum view, else None."""
    shape = tuple(layer.param_shape)
    if not shape or layer.transposed:
        return None
    size = 1
    for k, dim in enumerate(shape):
        size *= dim
        if size == layer.in_channels:
            return shape[: k + 1], shape[k + 1 :]
    raise ValueError(f"layer {layer.name!r}: kernel {shape} has no leading axes with {layer.in_channels} inputs")


def axis_steps(dims: tuple[int, ...], flat: np.ndarray, first_axis: int) -> Optional[list[tuple[int, np.ndarray]]]:
    """``[(axis, kept indices)]`` slicing a block of axes ``dims`` to the kept flat indices ``flat``,
    or None when they are no product of per-axis index sets (e.g. half a head)."""
    coords = np.unravel_index(np.asarray(flat, np.int64), dims)
    kept = [np.unique(c) for c in coords]
    if int(np.prod([len(k) for k in kept], dtype=np.int64)) != len(flat):
        return None
    return [(first_axis + i, k) for i, k in enumerate(kept) if len(k) != dims[i]]


def representable(deps: deps_lib.DependencyMap, removed: np.ndarray) -> np.ndarray:
    """Restores removed groups that would leave a DenseGeneral/Einsum kernel with a non-box shape.

    A multi-axis kernel shrinks only by whole slices of each axis (whole heads); groups that cut
    one otherwise stay (fully masked: the outputs are unchanged).
    """
    removed = removed.copy()
    changed = True
    while changed:
        changed = False
        keep_in = deps_lib.consumer_masks_for(deps, removed)
        keep_out = deps_lib.producer_masks_for(deps, removed)
        for layer in deps.layers:
            dims = view_dims(layer)
            if dims is None:
                continue
            for keep, block, ids in ((keep_in, dims[0], deps.in_group), (keep_out, dims[1], deps.out_group)):
                if axis_steps(block, np.flatnonzero(keep[layer.name]), 0) is None:
                    gids = ids[layer.name][ids[layer.name] >= 0]
                    changed = changed or bool(removed[gids].any())
                    removed[gids] = False
    return removed


def view_steps(layer: Layer, kept_in: np.ndarray, kept_out: np.ndarray) -> tuple[list, list]:
    """``(kernel steps, bias steps)``: ``[(axis, kept indices)]`` slicing a multi-axis kernel and its
    bias to the kept flat input / output units (a box: see :func:`representable`)."""
    dims = view_dims(layer)
    if dims is None:
        raise ValueError(f"layer {layer.name!r} has a plain 2-D kernel, not a multi-axis one")
    steps_in = axis_steps(dims[0], kept_in, 0)
    steps_out = axis_steps(dims[1], kept_out, len(dims[0]))
    bias = axis_steps(dims[1], kept_out, 0)
    if steps_in is None or steps_out is None or bias is None:
        raise ValueError(f"layer {layer.name!r}: the kept units do not form whole slices of its kernel axes")
    return steps_in + steps_out, bias
