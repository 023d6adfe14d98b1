"""Patch matrices times kernel matrices reproduce the layers."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from sensprune.layers import find_layers
from sensprune.patches import gather_rows, input_patches, kernel_matrix, matrix_to_kernel, reference_patches

GEOMETRIES = [
    # window, strides, padding, kernel_dilation, input_dilation, input shape (no batch)
    ((3, 3), 1, "SAME", 1, 1, (6, 5, 3)),
    ((3, 3), 2, "SAME", 2, 1, (9, 8, 2)),
    ((2, 3), (2, 1), "VALID", 1, 1, (7, 6, 3)),
    ((3, 3), 1, ((2, 1), (-1, 2)), 1, (2, 1), (4, 5, 2)),
    ((4,), 3, "SAME", 2, 1, (11, 3)),
    ((2, 2, 2), (1, 2, 2), "SAME", 1, 1, (3, 4, 5, 2)),
    ((3,), 1, "VALID", 1, 1, (2, 7, 3)),  # extra batch axis before the 1D spatial axis
]


def _random(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_patches_times_kernel_matrix_is_the_conv(geometry):
    window, strides, padding, kdil, idil, shape = geometry
    conv = nn.Conv(
        4,
        window,
        strides=strides,
        padding=padding,
        kernel_dilation=kdil,
        input_dilation=idil,
        use_bias=False,
    )
    x = _random((2,) + shape, 0)
    variables = jax.eval_shape(conv.init, jax.random.key(0), x)
    (layer,) = find_layers(conv, variables, x)
    kernel = _random(layer.kernel_shape, 1)
    want = jax.jit(conv.apply)({"params": {"kernel": kernel}}, x)
    for order in ("channel", "window"):
        patches = input_patches(layer, x, order=order)
        assert patches.shape == (2, layer.num_patches, layer.window_size * layer.in_channels)
        got = patches @ kernel_matrix(layer, kernel, order=order)
        np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-5, atol=1e-5)
        matrix = kernel_matrix(layer, kernel, order=order)
        np.testing.assert_array_equal(matrix_to_kernel(layer, matrix, order=order), kernel)
    # default order is channel-major, exactly lax.conv_general_dilated_patches
    np.testing.assert_array_equal(reference_patches(layer, x), input_patches(layer, x))
    channel_major = np.moveaxis(kernel, -2, 0).reshape(-1, 4)
    np.testing.assert_array_equal(kernel_matrix(layer, kernel), channel_major)


@pytest.mark.parametrize("shape", [(2, 5), (2, 3, 5)])
def test_dense_patches(shape):
    dense = nn.Dense(3, use_bias=False)
    x = _random(shape, 2)
    (layer,) = find_layers(dense, jax.eval_shape(dense.init, jax.random.key(0), x), x)
    kernel = _random(layer.kernel_shape, 3)
    patches = input_patches(layer, x)
    assert patches.shape == (2, layer.num_patches, 5)
    want = dense.apply({"params": {"kernel": kernel}}, x)
    np.testing.assert_allclose((patches @ kernel).reshape(want.shape), want, rtol=1e-6)


def test_shape_errors_name_the_layer():
    dense = nn.Dense(3)
    x = _random((2, 5), 4)
    (layer,) = find_layers(dense, jax.eval_shape(dense.init, jax.random.key(0), x), x)
    with pytest.raises(ValueError, match="per-sample shape"):
        input_patches(layer, _random((2, 6), 5))
    with pytest.raises(ValueError, match="kernel shape"):
        kernel_matrix(layer, _random((6, 3), 6))
    with pytest.raises(ValueError, match="order"):
        input_patches(layer, x, order="spatial")


def test_gather_rows_matches_numpy_take_per_point():
    rng = np.random.default_rng(3)
    rows = rng.normal(size=(3, 7, 5)).astype(np.float32)
    index = np.array([6, 0, 0, 3, 5, 1], np.int32)
    got = np.asarray(gather_rows(jax.numpy.asarray(rows), index))
    np.testing.assert_array_equal(got, np.take(rows, index, axis=1))
