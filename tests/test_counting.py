"""Tests for sensprune.counting: counts, FLOPs and the |S| formula."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sensprune import counting
from sensprune.types import Layer


def _tree():
    return {
        "conv": {
            "kernel": jnp.array([[[[1.0, 0.0], [0.0, 2.0]]]] * 3).reshape(3, 1, 2, 2),
            "bias": jnp.array([0.0, 0.5]),
        },
        "bn": {"scale": jnp.ones(2), "bias": jnp.zeros(2)},
        "fc": {"kernel": np.array([[0.0, 3.0], [4.0, 0.0]], np.float32)},  # numpy leaf
    }


def _conv_layer():
    # 3x1 window, 2 -> 2 channels, input 5x4, stride 1, VALID -> output 3x4.
    return Layer(
        path=("conv",), kind="conv", kernel_shape=(3, 1, 2, 2), use_bias=True,
        input_shape=(5, 4, 2), output_shape=(3, 4, 2), strides=(1, 1),
        padding=((0, 0), (0, 0)), input_dilation=(1, 1), kernel_dilation=(1, 1),
        order=0,
    )


def _dense_layer(path, n_in, n_out, order=0):
    return Layer(
        path=path, kind="dense", kernel_shape=(n_in, n_out), use_bias=True,
        input_shape=(n_in,), output_shape=(n_out,), order=order,
    )


def test_counts_on_hand_made_tree():
    tree = _tree()
    assert counting.count_params(tree) == 12 + 2 + 2 + 2 + 4
    # conv kernel: 3 windows x [1,0,0,2] -> 6 nonzero; conv bias 1; bn scale 2; fc 2.
    assert counting.count_nonzero(tree) == 6 + 1 + 2 + 0 + 2
    assert isinstance(counting.count_nonzero(tree), int)
    assert isinstance(counting.count_params(tree), int)
    assert counting.count_nonzero({}) == 0
    # bool masks count their True entries.
    assert counting.count_nonzero({"m": jnp.array([True, False, True])}) == 2


def test_layer_counts_and_flops_by_hand():
    tree = _tree()
    conv = _conv_layer()
    fc = _dense_layer(("fc",), 2, 2, order=1)
    assert conv.num_patches == 12
    assert counting.layer_total([conv, fc]) == {"conv": 12, "fc": 4}
    assert counting.layer_nonzero(tree, [conv, fc]) == {"conv": 6, "fc": 2}
    # conv: 6 nonzero weights x 12 output positions; fc: 2 x 1.
    assert counting.flops(tree, [conv, fc]) == 6 * 12 + 2
    assert counting.dense_flops([conv, fc]) == 12 * 12 + 4


def test_count_params_beyond_int32():
    big = jax.ShapeDtypeStruct((2**16, 2**16), jnp.float32)
    assert counting.count_params({"x": big, "y": jnp.ones(3)}) == 2**32 + 3


def test_count_nonzero_host_fallback(monkeypatch):
    # Leaves too large for an int32 device count are counted with numpy.
    tree = _tree()
    expected = counting.count_nonzero(tree)
    monkeypatch.setattr(counting, "_MAX_DEVICE_COUNT", 3)
    assert counting.count_nonzero(tree) == expected
    assert counting.layer_nonzero(tree, [_conv_layer()]) == {"conv": 6}


def _fake_resnet20_layers():
    """Conv outputs of CIFAR ResNet20: 7 x 32x32x16, 7 x 16x16x32, 7 x 8x8x64, fc 10."""
    layers = []
    for i, (hw, c) in enumerate([(32, 16)] * 7 + [(16, 32)] * 7 + [(8, 64)] * 7):
        layers.append(
            Layer(path=(f"conv{i}",), kind="conv", kernel_shape=(3, 3, c, c),
                  use_bias=False, input_shape=(hw, hw, c), output_shape=(hw, hw, c),
                  order=i)
        )
    layers.append(_dense_layer(("fc",), 64, 10, order=21))
    return layers


def test_sample_size_table():
    lenet = [
        _dense_layer(("fc1",), 784, 300, 0),
        _dense_layer(("fc2",), 300, 100, 1),
        _dense_layer(("fc3",), 100, 10, 2),
    ]
    assert counting.sample_size(lenet, 1e-12, c_constant=10, batch_size=64) == 448
    assert counting.sample_size(lenet, 1e-12, c_constant=3, batch_size=64) == 128
    assert counting.sample_size(lenet, 1e-12, c_constant=10) == 415
    assert counting.sample_size(lenet, 1e-12, c_constant=3) == 125

    resnet = _fake_resnet20_layers()
    neurons = [layer.num_neurons for layer in resnet]
    assert sum(neurons) == 200_714 and max(neurons) == 16_384
    assert counting.sample_size(resnet, 1e-16, c_constant=10, batch_size=128) == 640
    assert counting.sample_size(resnet, 1e-16, c_constant=3, batch_size=128) == 256
    assert counting.sample_size(resnet, 1e-16, c_constant=10) == 609
    assert counting.sample_size(resnet, 1e-16, c_constant=3) == 183
    assert counting.sample_size(resnet, 1e-16) == 183  # default C = 3


@pytest.mark.parametrize("delta", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_sample_size_rejects_bad_delta(delta):
    layers = [_dense_layer(("fc",), 4, 3)]
    with pytest.raises(ValueError, match=r"delta must be in the open interval \(0, 1\)"):
        counting.sample_size(layers, delta)


def test_sample_size_rejects_bad_arguments():
    layers = [_dense_layer(("fc",), 4, 3)]
    for c in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="c_constant must be a finite number > 0"):
            counting.sample_size(layers, 0.1, c_constant=c)
    for b in (0, -64, 2.5):
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            counting.sample_size(layers, 0.1, batch_size=b)
    with pytest.raises(ValueError, match="layers must contain at least one Layer"):
        counting.sample_size([], 0.1)


@pytest.mark.parametrize("strides", [(2, 2), (3, 1)])
def test_conv_transpose_flops_match_xla_cost_analysis(strides):
    """A VALID ConvTranspose crops nothing, so every (input position, tap) pair is one MAC per
    in/out channel pair: XLA's cost analysis of the lowered op (which skips the dilation holes)
    is an independent count. The stride-1-over-dilated-input view would count ~prod(strides) more."""
    import flax.linen as nn

    import sensprune as sp

    model = nn.ConvTranspose(5, (3, 2), strides=strides, padding="VALID", use_bias=False)
    x = jnp.ones((1, 4, 3, 3))
    variables = model.init(jax.random.PRNGKey(0), x)
    (layer,) = sp.find_layers(model, variables, x)
    cost = jax.jit(model.apply).lower(variables, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert counting.dense_flops([layer]) == 4 * 3 * (3 * 2) * 3 * 5 == cost["flops"] / 2
    kernel = np.asarray(variables["params"]["kernel"]).copy()
    kernel[:, :, 0, :] = 0.0  # prune one input channel: a third of the entries
    assert counting.flops({"kernel": kernel}, [layer]) == 4 * 3 * (3 * 2) * 2 * 5
    assert layer.num_patches > 4 * 3  # the dilated-conv view has more output patches than inputs
