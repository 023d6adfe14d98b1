"""Layer discovery and input capture on assorted Linen models."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from sensprune.layers import capture_inputs, find_layers


def _shapes(model, x, **kwargs):
    """Variable shapes only: discovery never needs real values."""
    return jax.eval_shape(lambda k: model.init(k, x, **kwargs), jax.random.key(0))


def _variables(model, x, seed=0, **kwargs):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32), _shapes(model, x, **kwargs)
    )


def _x(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


class Block(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.features, (3, 3), strides=2, kernel_dilation=2, name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
        return nn.relu(x)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Block(4, name="block1")(x, train)
        x = Block(6, name="block2")(x, train)
        x = nn.Conv(5, (2, 2), padding=((1, 0), (0, 2)), use_bias=False)(x)
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(3)(nn.relu(nn.Dense(7)(x)))


class TwoStage(nn.Module):
    def setup(self):
        self.first = nn.Dense(3)
        self.second = nn.Dense(2)

    def __call__(self, x):
        return self.second(self.first(x))

    def encode(self, x):
        return self.first(x)


def test_nested_modules_order_and_geometry():
    model, x = Net(), _x(2, 11, 11, 3)
    layers = find_layers(model, _shapes(model, x), x)
    assert [layer.name for layer in layers] == [
        "block1/conv",
        "block2/conv",
        "Conv_0",
        "Dense_1",  # call order, not name order: Dense(3) is constructed first
        "Dense_0",
    ]
    assert [layer.order for layer in layers] == list(range(5))
    first = layers[0]
    assert first.path == ("block1", "conv")
    assert first.kind == "conv" and first.use_bias
    assert first.kernel_shape == (3, 3, 3, 4)
    assert first.input_shape == (11, 11, 3) and first.output_shape == (6, 6, 4)
    assert first.strides == (2, 2) and first.kernel_dilation == (2, 2)
    assert first.input_dilation == (1, 1)
    # SAME with stride 2 and a dilated 5x5 footprint: total pad (6-1)*2+5-11 = 4
    assert first.padding == ((2, 2), (2, 2))
    assert layers[2].padding == ((1, 0), (0, 2)) and not layers[2].use_bias
    assert layers[3].kind == "dense" and layers[3].strides == () and layers[3].padding == ()
    assert layers[3].kernel_shape == (layers[2].num_neurons, 7)
    assert layers[3].num_patches == 1 and layers[2].window_size == 4


@pytest.mark.parametrize(
    "padding, spatial, window, strides, dilation, want",
    [
        ("SAME", (7,), (3,), (2,), (1,), ((1, 1),)),
        ("SAME", (8,), (4,), (1,), (1,), ((1, 2),)),
        ("SAME", (8,), (4,), (3,), (1,), ((1, 1),)),
        ("VALID", (7, 5), (3, 2), (1, 1), (1, 1), ((0, 0), (0, 0))),
        (2, (5, 5), (3, 3), (1, 1), (1, 1), ((2, 2), (2, 2))),
        ((1, (0, 2)), (5, 5), (3, 3), (1, 1), (1, 1), ((1, 1), (0, 2))),
        ("SAME", (6, 6, 6), (3, 3, 3), (1, 2, 1), (2, 1, 1), ((2, 2), (0, 1), (1, 1))),
    ],
)
def test_padding_resolution(padding, spatial, window, strides, dilation, want):
    conv = nn.Conv(2, window, strides=strides, padding=padding, kernel_dilation=dilation)
    x = _x(1, *spatial, 3)
    (layer,) = find_layers(conv, _shapes(conv, x), x)
    assert layer.padding == want
    assert layer.path == () and layer.name == ""
    # the resolved pads reproduce the layer's output exactly
    variables = _variables(conv, x)
    explicit = nn.Conv(2, window, strides=strides, padding=want, kernel_dilation=dilation)
    np.testing.assert_allclose(
        explicit.apply(variables, x), conv.apply(variables, x), rtol=1e-6, atol=1e-6
    )


def test_train_kwarg_batchnorm_and_method():
    model, x = Net(), _x(3, 9, 9, 2)
    variables = _variables(model, x)
    eval_layers = find_layers(model, variables, x, train=False)
    train_layers = find_layers(model, variables, x, train=True, mutable=["batch_stats"])
    assert eval_layers == train_layers
    captured = capture_inputs(model, variables, x, train=True, mutable=["batch_stats"])
    assert set(captured) == {layer.name for layer in eval_layers}
    two, z = TwoStage(), _x(2, 4)
    variables = _variables(two, z)
    assert [layer.name for layer in find_layers(two, variables, z)] == ["first", "second"]
    assert [layer.name for layer in find_layers(two, variables, z, method=TwoStage.encode)] == [
        "first"
    ]
    assert set(capture_inputs(two, variables, z, method="encode")) == {"first"}


def test_capture_inside_jit_matches_forward():
    model, x = Net(), _x(3, 9, 9, 2)
    variables = _variables(model, x)
    layers = find_layers(model, variables, x)
    captured = jax.jit(lambda v, a: capture_inputs(model, v, a, train=False))(variables, x)
    assert captured.keys() == {layer.name for layer in layers}
    for layer in layers:
        assert captured[layer.name].shape == (3,) + layer.input_shape
    np.testing.assert_array_equal(captured["block1/conv"], x)
    block1 = Block(4).apply({k: v["block1"] for k, v in variables.items()}, x)
    np.testing.assert_allclose(captured["block2/conv"], block1, rtol=1e-5, atol=1e-6)
    # a subset of layers
    some = capture_inputs(model, variables, x, layers=layers[3:])
    assert set(some) == {"Dense_0", "Dense_1"}
    np.testing.assert_allclose(some["Dense_0"], captured["Dense_0"], rtol=1e-6)


def test_dense_on_sequence_and_conv_with_extra_batch_axes():
    class Seq(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.Dense(5)(x)  # [B, T, F]
            return nn.Conv(2, (3,))(y[..., None, :].repeat(4, axis=-2))  # [B, T, 4, 5]

    model, x = Seq(), _x(2, 3, 6)
    dense, conv = find_layers(model, _shapes(model, x), x)
    assert dense.input_shape == (3, 6) and dense.output_shape == (3, 5)
    assert dense.kernel_shape == (6, 5) and dense.num_patches == 3
    assert conv.input_shape == (3, 4, 5) and conv.output_shape == (3, 4, 2)
    assert conv.kernel_shape == (3, 5, 2) and conv.num_patches == 12


def test_shared_module_is_one_layer_called_twice():
    # Issue #15: a shared layer is scored over the inputs of all its calls (stacked on the batch axis).
    class Shared(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = nn.Dense(4)
            return dense(nn.relu(dense(x)))

    model, x = Shared(), _x(2, 4)
    (layer,) = find_layers(model, _shapes(model, x), x)
    assert layer.name == "Dense_0" and layer.calls == 2
    assert capture_inputs(model, _variables(model, x), x)["Dense_0"].shape == (4, 4)


def test_model_without_layers_is_refused():
    class NoLayers(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.LayerNorm()(x)

    model, x = NoLayers(), _x(2, 4)
    with pytest.raises(ValueError, match=r"no prunable layer \(nn.Dense / nn.Conv\) found in NoLayers"):
        find_layers(model, _shapes(model, x), x)


@pytest.mark.parametrize(
    "make, kind",
    [
        (lambda: nn.DenseGeneral((2, 3)), "DenseGeneral"),
        (lambda: nn.ConvTranspose(3, (3,)), "ConvTranspose"),
        (lambda: nn.ConvLocal(3, (3,)), "ConvLocal"),
        (lambda: nn.Einsum((4, 3), "btf,fo->bto"), "Einsum"),
    ],
)
def test_unsupported_linear_layers_are_named(make, kind):
    # Issue #15: DenseGeneral / Einsum / ConvTranspose are scored; ConvLocal stays dense, named with the reason.
    from sensprune.adapter import as_adapter

    class Wrapped(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(4, name="fine")(x)
            return make()(x)

    model, x = Wrapped(), _x(2, 5, 4)
    layers, dense = as_adapter(model).find_layers_report(_shapes(model, x), x)
    names = [layer.name for layer in layers]
    if kind in ("DenseGeneral", "Einsum", "ConvTranspose"):
        assert names == ["fine", f"{kind}_0"] and not dense
    else:
        assert names == ["fine"]
        assert kind in dense[f"{kind}_0"] and "left dense" in dense[f"{kind}_0"]


@pytest.mark.parametrize(
    "conv, message",
    [
        (nn.Conv(4, (3, 3), padding="CIRCULAR"), "padding 'CIRCULAR' is not supported"),
        (nn.Conv(4, (3, 3), padding="REFLECT"), "padding 'REFLECT' is not supported"),
    ],
)
def test_unsupported_conv_options(conv, message):
    x = _x(1, 6, 6, 4)
    with pytest.raises(ValueError, match=message):
        find_layers(conv, _shapes(conv, x), x)


def test_causal_padding_is_refused():
    conv, x = nn.Conv(2, (3,), padding="CAUSAL"), _x(1, 6, 4)
    with pytest.raises(ValueError, match="padding 'CAUSAL' is not supported"):
        find_layers(conv, _shapes(conv, x), x)


def test_unbatched_input_is_refused():
    dense, x = nn.Dense(2), _x(4)
    with pytest.raises(ValueError, match="no batch axis"):
        find_layers(dense, _shapes(dense, x), x)


def test_discovery_does_not_touch_the_model():
    model, x = Net(), _x(2, 9, 9, 2)
    variables = _variables(model, x)
    before = jax.tree_util.tree_map(np.copy, variables)
    find_layers(model, variables, x)
    capture_inputs(model, variables, x)
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, before)
    assert model.scope is None
    with pytest.raises(KeyError, match="params"):
        find_layers(model, {"batch_stats": variables["batch_stats"]}, x)
