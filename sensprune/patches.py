"""Layer inputs as patch matrices, kernels as matrices.

Every prunable layer is treated as one matrix product per output position::

    y[b, p, :] = input_patches(layer, x)[b, p, :] @ kernel_matrix(layer, kernel)

(bias excluded). Rows ``p`` are output positions; columns ``j`` run over
(input channel, window position). Two column orders are offered, and
``kernel_matrix`` / ``matrix_to_kernel`` must be called with the same one:

* ``order='channel'`` (default, the documented contract): channel-major
  ``(c, *window)``, the order of ``lax.conv_general_dilated_patches``;
  the kernel matrix moves the in-channel axis first.
* ``order='window'``: window-major ``(*window, c)``, the plain row-major
  flatten of Flax's ``(*window, in, out)`` kernel. It is cheaper to build
  (no transpose) and is what the sensitivity kernels use.

For Dense layers the window is a single position (both orders agree) and ``p``
runs over any axes between the batch axis and the feature axis (one position
for plain ``[B, F]`` inputs).

Patches are gathered with one ``lax.pad`` (padding and input dilation) plus one
gather of channel rows at host-computed positions: pure data movement (one
strided slice per window position, concatenated, gave the same numbers but took
XLA:CPU ~10x longer to compile). ``lax.conv_general_dilated_patches`` gives the
same numbers too (see :func:`reference_patches`) but is computed as a
convolution with a one-hot kernel, ``J`` times the cost of the layer; on CPU it
measured ~10x slower than window-major gathering, and channel-major ~5x slower
(the transpose).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
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


def patch_index(layer: Layer, padded_spatial: tuple[int, ...]) -> np.ndarray:
    """Flat positions in the padded input of every (output position, window position), ``[P * K]``.

    Row-major over output positions, then over window positions (the order of
    ``itertools.product`` over the window): built on the host, static per geometry."""
    rank = _spatial_rank(layer)
    window = layer.kernel_shape[:rank]
    out_spatial = layer.output_shape[-(rank + 1) : -1]
    flat = np.zeros(tuple(out_spatial) + tuple(window), np.int64)
    stride = 1
    for d in reversed(range(rank)):
        shape = [1] * (2 * rank)
        shape[d], shape[rank + d] = out_spatial[d], window[d]
        starts = np.arange(out_spatial[d])[:, None] * layer.strides[d]
        pos = starts + np.arange(window[d])[None, :] * layer.kernel_dilation[d]
        flat = flat + (pos * stride).reshape(shape)
        stride *= padded_spatial[d]
    return flat.reshape(-1).astype(np.int32)


def gather_rows(rows: jax.Array, index: jax.Array | np.ndarray) -> jax.Array:
    """``rows [n, R, C]`` at ``index [M]`` (every entry in ``[0, R)``) -> ``[n, M, C]``.

    One gather from the flattened ``[n * R, C]`` at ``[n, M]`` offsets, so the
    gathered array comes out in ``[n, M, C]`` order: ``jnp.take(rows, index,
    axis=1)`` yields ``[M, n, C]`` inside XLA:CPU and a transposing copy,
    which XLA then repeats per consumer (measured ~2x slower on a mean kernel).
    """
    n, num_rows, channels = rows.shape
    index = jnp.asarray(index, jnp.int32)
    flat = index[None, :] + (jnp.arange(n, dtype=jnp.int32) * num_rows)[:, None]
    return jnp.take(rows.reshape(-1, channels), flat, axis=0, mode="clip")


def _conv_patches(layer: Layer, x: jax.Array) -> jax.Array:
    """``x [n, *spatial, C]`` -> ``[n, P, window * C]`` (window-major).

    One ``lax.pad`` (padding and input dilation) and one gather of whole
    channel rows at host-computed positions: the same numbers as one strided
    slice per window position concatenated, but XLA:CPU compiles the gather
    ~10x faster (the concatenation of strided slices took ~0.5 s per geometry).
    """
    rank = _spatial_rank(layer)
    config = [(0, 0, 0)]
    config += [(lo, hi, d - 1) for (lo, hi), d in zip(layer.padding, layer.input_dilation)]
    config += [(0, 0, 0)]
    padded = lax.pad(x, jnp.zeros((), x.dtype), config)
    spatial = tuple(padded.shape[1 : rank + 1])
    rows = padded.reshape(padded.shape[0], -1, padded.shape[-1])
    index = patch_index(layer, spatial)
    gathered = gather_rows(rows, index)  # [n, P * K, C]; every index is in bounds
    return gathered.reshape(padded.shape[0], index.size // layer.window_size, -1)


ORDERS = ("channel", "window")


def _check_order(order: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


def _window_to_channel_major(layer: Layer, matrix: jax.Array) -> jax.Array:
    """``[..., window * C]`` -> ``[..., C * window]`` on the last axis."""
    lead = matrix.shape[:-1]
    split = matrix.reshape(lead + (layer.window_size, layer.in_channels))
    return jnp.swapaxes(split, -1, -2).reshape(lead + (-1,))


def input_patches(layer: Layer, inputs: jax.Array, *, order: str = "channel") -> jax.Array:
    """Layer input ``[B, *input_shape]`` -> patch matrix ``[B, P, J]``.

    ``P = layer.num_patches``, ``J = in_channels * window_size`` in ``order``.
    """
    _check_order(order)
    expected = tuple(layer.input_shape)
    if tuple(inputs.shape[1:]) != expected:
        raise ValueError(
            f"layer {layer.name!r}: inputs have per-sample shape {tuple(inputs.shape[1:])}, "
            f"expected {expected}"
        )
    batch = inputs.shape[0]
    fan_in = layer.in_channels * layer.window_size
    if layer.kind == "dense":
        if layer.input_axes:  # contracted axes not trailing: move them last (a view of the input)
            inputs = jnp.transpose(inputs, (0,) + tuple(a + 1 for a in layer.input_axes))
        return inputs.reshape(batch, -1, fan_in)
    if layer.kind != "conv":
        raise ValueError(f"layer.kind must be 'dense' or 'conv', got {layer.kind!r}")
    rank = _spatial_rank(layer)
    images = inputs.reshape((-1,) + tuple(inputs.shape[-(rank + 1) :]))
    patches = _conv_patches(layer, images).reshape(batch, layer.num_patches, fan_in)
    return _window_to_channel_major(layer, patches) if order == "channel" else patches


def reference_patches(layer: Layer, inputs: jax.Array) -> jax.Array:
    """Channel-major patches via ``lax.conv_general_dilated_patches`` (for tests)."""
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
    return patches.reshape(batch, layer.num_patches, -1)


def kernel_matrix(layer: Layer, kernel: jax.Array, *, order: str = "channel") -> jax.Array:
    """Kernel ``[*window, in, out]`` -> ``[J, out]`` in the patch column ``order``."""
    _check_order(order)
    if tuple(kernel.shape) != tuple(layer.kernel_shape):
        raise ValueError(
            f"layer {layer.name!r}: kernel shape {tuple(kernel.shape)} != {layer.kernel_shape}"
        )
    if order == "channel":
        kernel = jnp.moveaxis(kernel, -2, 0)
    return jnp.reshape(kernel, (-1, layer.out_channels))


def matrix_to_kernel(layer: Layer, matrix: jax.Array, *, order: str = "channel") -> jax.Array:
    """Inverse of :func:`kernel_matrix`: ``[J, out]`` -> kernel shape."""
    _check_order(order)
    fan_in = layer.in_channels * layer.window_size
    if tuple(matrix.shape) != (fan_in, layer.out_channels):
        raise ValueError(
            f"layer {layer.name!r}: matrix shape {tuple(matrix.shape)} != "
            f"{(fan_in, layer.out_channels)}"
        )
    if order == "window":
        return jnp.reshape(matrix, layer.kernel_shape)
    window = tuple(layer.kernel_shape[:-2])
    shaped = jnp.reshape(matrix, (layer.in_channels,) + window + (layer.out_channels,))
    return jnp.moveaxis(shaped, 0, -2)

