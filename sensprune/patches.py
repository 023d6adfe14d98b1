"""Layer inputs as patch matrices, kernels as matrices.

Every prunable layer is treated as one matrix product per output position::

    y[b, p, :] = input_patches(layer, x)[b, p, :] @ kernel_matrix(layer, kernel)

(bias excluded). Rows ``p`` are output positions; columns ``j`` run over
(window position, input channel), window-major, which is the row-major flatten
of Flax's ``(*window, in, out)`` kernel. For Dense layers the window is a single
position and ``p`` runs over any axes between the batch axis and the feature
axis (one position for plain ``[B, F]`` inputs).

Patches are gathered with one ``lax.pad`` (padding and input dilation) plus one
strided slice per window position, concatenated on the feature axis: pure data
movement. ``lax.conv_general_dilated_patches`` gives the same numbers in
channel-major order (see :func:`reference_patches`), but it is computed as a
convolution with a one-hot kernel (``J`` times the cost of the layer) and
measured 5-10x slower on CPU, as was building a channel-major order.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from jax import lax

from sensprune.types import Layer


def _spatial_rank(layer: Layer) -> int:
    return len(layer.kernel_shape) - 2


def conv_dimension_numbers(rank: int) -> lax.ConvDimensionNumbers:
    """Channel-last dimension numbers (``N, *spatial, C`` / ``*window, I, O``)."""
    spatial = tuple(range(1, rank + 1))
    lhs = (0, rank + 1) + spatial
    rhs = (rank + 1, rank) + tuple(range(rank))
    return lax.ConvDimensionNumbers(lhs, rhs, lhs)


def _conv_patches(layer: Layer, x: jax.Array) -> jax.Array:
    """``x [n, *spatial, C]`` -> ``[n, *out_spatial, window * C]`` (window-major)."""
    rank = _spatial_rank(layer)
    window = layer.kernel_shape[:rank]
    out_spatial = layer.output_shape[-(rank + 1) : -1]
    config = [(0, 0, 0)]
    config += [(lo, hi, d - 1) for (lo, hi), d in zip(layer.padding, layer.input_dilation)]
    config += [(0, 0, 0)]
    padded = lax.pad(x, jnp.zeros((), x.dtype), config)
    slices = []
    for offset in itertools.product(*(range(k) for k in window)):
        start = [0] + [k * d for k, d in zip(offset, layer.kernel_dilation)] + [0]
        limit = [padded.shape[0]]
        limit += [s + (o - 1) * st + 1 for s, o, st in zip(start[1:], out_spatial, layer.strides)]
        limit += [padded.shape[-1]]
        slices.append(lax.slice(padded, start, limit, (1, *layer.strides, 1)))
    return jnp.concatenate(slices, axis=-1)


def input_patches(layer: Layer, inputs: jax.Array) -> jax.Array:
    """Layer input ``[B, *input_shape]`` -> patch matrix ``[B, P, J]``.

    ``P = layer.num_patches`` and ``J = window_size * in_channels``.
    """
    expected = tuple(layer.input_shape)
    if tuple(inputs.shape[1:]) != expected:
        raise ValueError(
            f"layer {layer.name!r}: inputs have per-sample shape {tuple(inputs.shape[1:])}, "
            f"expected {expected}"
        )
    batch = inputs.shape[0]
    fan_in = layer.in_channels * layer.window_size
    if layer.kind == "dense":
        return inputs.reshape(batch, -1, fan_in)
    if layer.kind != "conv":
        raise ValueError(f"layer.kind must be 'dense' or 'conv', got {layer.kind!r}")
    rank = _spatial_rank(layer)
    images = inputs.reshape((-1,) + tuple(inputs.shape[-(rank + 1) :]))
    patches = _conv_patches(layer, images)
    return patches.reshape(batch, layer.num_patches, fan_in)


def reference_patches(layer: Layer, inputs: jax.Array) -> jax.Array:
    """Same as :func:`input_patches`, via ``lax.conv_general_dilated_patches`` (for tests).

    That op orders features channel-major ``(c, *window)``; they are permuted
    to our window-major order.
    """
    if layer.kind == "dense":
        return input_patches(layer, inputs)
    rank = _spatial_rank(layer)
    batch = inputs.shape[0]
    images = inputs.reshape((-1,) + tuple(inputs.shape[-(rank + 1) :]))
    patches = lax.conv_general_dilated_patches(
        images,
        filter_shape=layer.kernel_shape[:rank],
        window_strides=layer.strides,
        padding=layer.padding,
        lhs_dilation=layer.input_dilation,
        rhs_dilation=layer.kernel_dilation,
        dimension_numbers=conv_dimension_numbers(rank),
        precision=lax.Precision.HIGHEST,
    )
    channel_major = patches.reshape(batch, layer.num_patches, layer.in_channels, -1)
    return jnp.swapaxes(channel_major, -1, -2).reshape(batch, layer.num_patches, -1)


def kernel_matrix(layer: Layer, kernel: jax.Array) -> jax.Array:
    """Kernel ``[*window, in, out]`` -> ``[J, out]`` in the patch feature order."""
    if tuple(kernel.shape) != tuple(layer.kernel_shape):
        raise ValueError(
            f"layer {layer.name!r}: kernel shape {tuple(kernel.shape)} != {layer.kernel_shape}"
        )
    return jnp.reshape(kernel, (-1, layer.out_channels))


def matrix_to_kernel(layer: Layer, matrix: jax.Array) -> jax.Array:
    """Inverse of :func:`kernel_matrix`: ``[J, out]`` -> kernel shape."""
    fan_in = layer.in_channels * layer.window_size
    if tuple(matrix.shape) != (fan_in, layer.out_channels):
        raise ValueError(
            f"layer {layer.name!r}: matrix shape {tuple(matrix.shape)} != "
            f"{(fan_in, layer.out_channels)}"
        )
    return jnp.reshape(matrix, layer.kernel_shape)

