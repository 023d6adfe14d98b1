"""Shape buckets: conv layers of different geometry share one compiled sensitivity kernel.

A plain conv layer's kernel program depends on its geometry only through the
patch matrix ``a [n, P, K * C]`` it builds from its input. Here the input is
first laid out as *rows*: the padded (and input-dilated) image flattened to
``[n, R, C]`` with channels zero-padded to the bucket's ``C_b`` and rows
zero-padded to ``R_b`` (at least one all-zero row at the end). Patches are then
a gather of whole rows at a host-built index ``[P * K_b]``: the layer's ``K``
window positions per output position, then ``K_b - K`` pointing at the zero
row. The kernel matrix is zero-padded to ``[K_b * C_b, O]`` the same way. So
every layer of a bucket ``(P, O, R_b, K_b, C_b)`` runs one compiled program
(:func:`bucket_ratio`), with the index as an argument.

Exactness: padded entries are zero in both the patches and the kernel, so they
add exact zeros to every ``z``; padded weights have ``|W| = 0`` and are cropped
(:func:`crop_ratio`); ``P`` is not padded, so the mean's divisor is the
layer's own. Only the summation order inside XLA's matmuls may differ (last
bits). Layers join a bucket only while its padded size ``K_b * C_b`` stays
within :data:`MAX_PADDING` times theirs (the padded work is real work).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sensprune import patches
from sensprune.types import Layer

MAX_PADDING = 2.0  # a layer joins a bucket while K_b * C_b <= MAX_PADDING * its K * C


@dataclasses.dataclass(frozen=True)
class Bucket:
    """Static shape of a shared kernel: output positions, outputs, rows, window, channels."""

    patches: int
    out: int
    rows: int
    window: int
    channels: int

    @property
    def fan_in(self) -> int:
        return self.window * self.channels


def eligible(layer: Layer) -> bool:
    """Plain convs over ``[*spatial, C]`` inputs (no extra leading axes, not grouped)."""
    rank = len(layer.kernel_shape) - 2
    return layer.kind == "conv" and layer.groups == 1 and len(layer.input_shape) == rank + 1


def _padded_spatial(layer: Layer) -> tuple[int, ...]:
    rank = len(layer.kernel_shape) - 2
    return tuple(
        (size - 1) * dil + 1 + lo + hi
        for size, (lo, hi), dil in zip(layer.input_shape[:rank], layer.padding, layer.input_dilation)
    )


def _rows(layer: Layer) -> int:
    return int(np.prod(_padded_spatial(layer)))


def _fits(members: Sequence[Layer], window: int, channels: int) -> bool:
    return all(window * channels <= MAX_PADDING * m.window_size * m.in_channels for m in members)


def assign(layers: Sequence[Layer]) -> dict[str, Bucket]:
    """Layer name -> its bucket, for the eligible layers (largest first, greedy)."""
    groups: dict[tuple[int, int], list[list[Layer]]] = {}
    for layer in sorted(filter(eligible, layers), key=lambda m: -m.window_size * m.in_channels):
        buckets = groups.setdefault((layer.num_patches, layer.out_channels), [])
        for members in buckets:
            window = max(layer.window_size, *(m.window_size for m in members))
            channels = max(layer.in_channels, *(m.in_channels for m in members))
            if _fits(members + [layer], window, channels):
                members.append(layer)
                break
        else:
            buckets.append([layer])
    out = {}
    for (num_patches, num_out), buckets in groups.items():
        for members in buckets:
            bucket = Bucket(
                patches=num_patches, out=num_out, rows=max(_rows(m) for m in members) + 1,
                window=max(m.window_size for m in members), channels=max(m.in_channels for m in members),
            )
            out.update({m.name: bucket for m in members})
    return out


def to_rows(layer: Layer, bucket: Bucket, x: jax.Array) -> jax.Array:
    """Layer input ``[n, *spatial, C]`` -> rows ``[n, R_b, C_b]`` (zero-padded; traced)."""
    config = [(0, 0, 0)]
    config += [(lo, hi, d - 1) for (lo, hi), d in zip(layer.padding, layer.input_dilation)]
    config += [(0, bucket.channels - layer.in_channels, 0)]
    padded = lax.pad(jnp.asarray(x, jnp.float32), jnp.zeros((), jnp.float32), config)
    rows = padded.reshape(padded.shape[0], -1, bucket.channels)
    return jnp.pad(rows, ((0, 0), (0, bucket.rows - rows.shape[1]), (0, 0)))


def row_index(layer: Layer, bucket: Bucket) -> np.ndarray:
    """``[P * K_b]`` rows gathered per output position: the layer's window, then the zero row."""
    index = patches.patch_index(layer, _padded_spatial(layer)).reshape(bucket.patches, layer.window_size)
    fill = np.full((bucket.patches, bucket.window - layer.window_size), bucket.rows - 1, np.int32)
    return np.concatenate([index, fill], axis=1).reshape(-1)


def pad_matrix(layer: Layer, bucket: Bucket, wmat: np.ndarray) -> np.ndarray:
    """Window-major kernel matrix ``[K * C, O]`` -> ``[K_b * C_b, O]`` with zeros."""
    cube = np.asarray(wmat).reshape(layer.window_size, layer.in_channels, layer.out_channels)
    cube = np.pad(cube, ((0, bucket.window - layer.window_size), (0, bucket.channels - layer.in_channels), (0, 0)))
    return cube.reshape(bucket.fan_in, layer.out_channels)


def crop_ratio(layer: Layer, bucket: Bucket, ratio: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pad_matrix` on a ratio ``[K_b * C_b, O]`` -> ``[K * C, O]``."""
    cube = np.asarray(ratio).reshape(bucket.window, bucket.channels, layer.out_channels)
    return cube[: layer.window_size, : layer.in_channels].reshape(-1, layer.out_channels)
