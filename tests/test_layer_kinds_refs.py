"""Sensitivities of transposed convs and of DenseGeneral / LinearGeneral contracting non-trailing
axes (issue #15) against slow NumPy loops written from the layers' own definitions."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import nnx

import sensprune as sp
import sensprune.nnx as spx
from sensprune import layer_kinds, paths
from sensprune.adapter import as_adapter
from tests.test_layer_kinds import _close, _pseudo_points, _ratio, ref_general

_RNG = np.random.default_rng(3)


# --------------------------------------------------------------------------- ConvTranspose


def _terms(x: np.ndarray, window, strides, dilation, pads, out_hw):
    """Per output position ``(py, px)``: the ``(ky, kx, input row/col)`` pairs of a transposed conv,
    written as a scatter: input pixel ``i`` and kernel offset ``k`` land on ``i * s + k * d - low``."""
    terms: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
    h, w = x.shape[:2]
    for iy, ix in np.ndindex(h, w):
        for ky, kx in np.ndindex(*window):
            # output p reads dilated-padded input q = p + k*d; q = i*s + low  =>  p = i*s + low - k*d
            py = iy * strides[0] + pads[0][0] - ky * dilation[0]
            px = ix * strides[1] + pads[1][0] - kx * dilation[1]
            if 0 <= py < out_hw[0] and 0 <= px < out_hw[1]:
                terms.setdefault((py, px), []).append((ky, kx, iy, ix))
    return terms


def ref_conv_transpose(kernel, inputs, strides, dilation, pads, out_hw, reduction):
    """``(sensitivities, pre-activations, channel sensitivities)`` of a 2-D transposed conv with the
    (effective) kernel ``[kh, kw, I, O]``: each output unit is a sum of ``W[k, c, o] * x[i, c]`` terms.
    The channel sensitivity of a point is its reduced ``g`` reduced over window positions like the
    positions (``mean`` / ``max``), maxed over outputs; then maxed over points."""
    kernel = np.asarray(kernel, np.float64)
    kh, kw, cin, cout = kernel.shape
    sens = np.zeros(kernel.shape)
    channel = np.zeros(cin)
    pre = np.zeros((len(inputs),) + tuple(out_hw) + (cout,))
    n_pos = out_hw[0] * out_hw[1]
    for b, x in enumerate(inputs):
        x64 = np.asarray(x, np.float64)
        terms = _terms(x64, (kh, kw), strides, dilation, pads, out_hw)
        for (py, px), ts in terms.items():
            pre[b, py, px] = sum(kernel[ky, kx].T @ x64[iy, ix] for ky, kx, iy, ix in ts)
        for xs in _pseudo_points(x64):
            per = np.zeros((n_pos,) + kernel.shape)  # g per output position (0 where no term)
            for (py, px), ts in terms.items():
                for o in range(cout):
                    zp = sum(max(kernel[ky, kx, c, o], 0) * xs[iy, ix, c] for ky, kx, iy, ix in ts for c in range(cin))
                    zn = sum(min(kernel[ky, kx, c, o], 0) * xs[iy, ix, c] for ky, kx, iy, ix in ts for c in range(cin))
                    p = py * out_hw[1] + px
                    for ky, kx, iy, ix in ts:
                        for c in range(cin):
                            per[p, ky, kx, c, o] += _ratio(kernel[ky, kx, c, o], xs[iy, ix, c], zp, zn)
            red = per.mean(0) if reduction == "mean" else per.max(0)
            sens = np.maximum(sens, red)
            per_window = red.mean((0, 1)) if reduction == "mean" else red.max((0, 1))
            channel = np.maximum(channel, per_window.max(-1))
    return sens, pre, channel


_CT_CASES = [
    dict(strides=(2, 2)),
    dict(strides=(2, 1), padding="VALID", kernel_dilation=(1, 2)),
    dict(strides=(3, 2), padding=((1, 2), (0, 1))),
    dict(strides=(2, 2), transpose_kernel=True),
]


class _Up(nn.Module):
    kw: dict

    @nn.compact
    def __call__(self, x):
        return nn.ConvTranspose(3, (3, 2), name="up", **self.kw)(nn.Dense(2)(x))


@pytest.mark.parametrize("case", range(len(_CT_CASES)))
def test_conv_transpose_sensitivity_matches_loop(case):
    kw = _CT_CASES[case]
    model, x = _Up(kw), _RNG.normal(size=(2, 3, 4, 2)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(case), x)
    layer = {la.name: la for la in sp.find_layers(model, variables, x)}["up"]
    assert layer.conv_transpose and layer.channel_structured == (not kw.get("transpose_kernel"))
    inputs = np.asarray(sp.capture_inputs(model, variables, x)["up"])
    leaf = np.asarray(variables["params"]["up"]["kernel"])
    # transpose_kernel=True convolves the leaf flipped in space with in/out swapped
    eff = np.flip(leaf, (0, 1)).swapaxes(2, 3) if kw.get("transpose_kernel") else leaf
    np.testing.assert_array_equal(np.asarray(paths.get_kernel(variables["params"], layer)), eff)
    out_hw = layer.output_shape[:2]
    reduction = "mean" if case % 2 else "max"
    dilation = kw.get("kernel_dilation", (1, 1))
    want, pre, want_channel = ref_conv_transpose(eff, inputs, kw["strides"], dilation, layer.padding, out_hw, reduction)
    y = nn.ConvTranspose(3, (3, 2), use_bias=False, **kw).apply({"params": {"kernel": leaf}}, inputs)
    np.testing.assert_allclose(np.asarray(y), pre, rtol=1e-5, atol=1e-5)  # the loop's terms are the layer's
    sens = sp.compute_sensitivities(model, variables, x, reduction=reduction)
    _close(sens["up"].weight, want)
    # 'mean': the channel sensitivity means each point's g over window positions (zeroing branch's
    # reference semantics), so it is not the max of the weight sensitivities as under 'max'
    np.testing.assert_allclose(np.asarray(sens["up"].channel), want_channel, rtol=1e-5)
    if reduction == "max":
        np.testing.assert_allclose(want_channel, want.max(axis=(0, 1, 3)), rtol=1e-12)


def test_conv_transpose_padding_matches_lax():
    for kw in _CT_CASES:
        for pad in ("SAME", "VALID"):
            window, strides = (3, 2), kw["strides"]
            dil = kw.get("kernel_dilation", (1, 1))
            x = np.zeros((1, 5, 4, 1), np.float32)
            y = jax.lax.conv_transpose(x, np.zeros((3, 2, 1, 1), np.float32), strides, pad, rhs_dilation=dil)
            pads = layer_kinds.transpose_padding(pad, window, strides, dil)
            want = tuple((n - 1) * s + 1 + lo + hi - ((k - 1) * d + 1) + 1
                         for n, s, (lo, hi), k, d in zip((5, 4), strides, pads, window, dil))
            assert tuple(y.shape[1:3]) == want
    with pytest.raises(layer_kinds.Unscorable, match="CIRCULAR"):
        layer_kinds.transpose_padding("CIRCULAR", (3,), (2,), (1,))


def test_conv_transpose_pruned_by_weight_methods_and_left_dense_by_filter_methods():
    model, x = _Up(_CT_CASES[3]), _RNG.normal(size=(4, 3, 4, 2)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), x)
    result = sp.prune(model, variables, x, method="wt", keep_ratio=0.6, include="up")
    leaf, mask = np.asarray(result.params["up"]["kernel"]), np.asarray(result.masks["up"]["kernel"])
    assert mask.shape == leaf.shape == (3, 2, 3, 2) and 0 < (~mask).mean() < 1 and np.all(leaf[~mask] == 0)
    filters = sp.prune(model, variables, x, method="ft", keep_ratio=0.9, allow_dead_layers=True)
    assert "transposed conv" in filters.info["dense_layers"]["up"]


class _Decoder(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(6, (3, 3))(x))
        x = nn.relu(nn.ConvTranspose(5, (3, 3), strides=(2, 2), name="up")(x))
        return nn.Conv(4, (3, 3))(x).reshape(x.shape[0], -1)


class _NNXDecoder(nnx.Module):
    def __init__(self, rngs):
        self.stem = nnx.Conv(3, 6, (3, 3), rngs=rngs)
        self.up = nnx.ConvTranspose(6, 5, (3, 3), strides=(2, 2), rngs=rngs)
        self.out = nnx.Conv(5, 4, (3, 3), rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.up(nnx.relu(self.stem(x))))
        return self.out(x).reshape(x.shape[0], -1)


def test_conv_transpose_filter_pruned_and_shrunk():
    x = _RNG.normal(size=(8, 4, 4, 3)).astype(np.float32)
    model = _Decoder()
    variables = model.init(jax.random.PRNGKey(0), x)
    result = sp.prune(model, variables, x, method="ft", keep_ratio=0.6)  # pfp: test_layer_kinds (every method)
    assert result.info["dense_layers"] == {}
    shrunk = sp.shrink(model, variables, result.params, x=x)
    small = shrunk.variables["params"]
    assert small["up"]["kernel"].shape[2:] == (small["Conv_0"]["kernel"].shape[-1], small["up"]["bias"].shape[0])
    assert _size(small) < _size(variables["params"])
    want = np.asarray(model.apply({"params": result.params}, x))
    np.testing.assert_allclose(np.asarray(shrunk.model.apply(shrunk.variables, x)), want, rtol=1e-5, atol=1e-6)
    nnx_model = _NNXDecoder(nnx.Rngs(0))
    nnx_result = spx.prune(nnx_model, x, method="ft", keep_ratio=0.6)
    nnx_small = spx.shrink(nnx_model, nnx_result, x)
    shape = nnx_small.up.kernel.get_value().shape
    assert (nnx_small.up.in_features, nnx_small.up.out_features) == shape[2:] and shape != (3, 3, 6, 5)
    masked = nnx.clone(nnx_model)
    nnx.update(masked, nnx_result.params)
    np.testing.assert_allclose(np.asarray(nnx_small(x)), np.asarray(masked(x)), rtol=1e-5, atol=1e-6)


def _size(tree) -> int:
    return sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(tree))


def test_nnx_conv_transpose_sensitivity_matches_loop():
    class Up(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.ConvTranspose(2, 3, (3, 2), strides=(2, 2), rngs=rngs)

        def __call__(self, x):
            return self.up(x)

    model, x = Up(nnx.Rngs(0)), _RNG.normal(size=(2, 3, 3, 2)).astype(np.float32)
    (layer,) = spx.find_layers(model, x)
    sens = spx.compute_sensitivities(model, x, reduction="max")
    leaf = np.asarray(model.up.kernel.get_value())
    want, pre, _ = ref_conv_transpose(leaf, x, (2, 2), (1, 1), layer.padding, layer.output_shape[:2], "max")
    np.testing.assert_allclose(np.asarray(model(x)) - np.asarray(model.up.bias.get_value()), pre, rtol=1e-5,
                               atol=1e-5)
    _close(sens["up"].weight, want)


# --------------------------------------------------------------------------- DenseGeneral, any axes


class _General(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: [B, F, T, C]
        h = nn.DenseGeneral(5, axis=1, name="over_f")(x)  # [B, T, C, 5]
        h = nn.DenseGeneral((2, 3), axis=(1, 3), name="over_tc")(nn.relu(h))  # contracts T and 5: [B, C, 2, 3]
        return h.reshape(h.shape[0], -1)


def ref_dense_general(kernel, inputs, axes, reduction):
    """The contracted ``axes`` (per-sample, sorted) moved last, then the trailing-axes loop."""
    inputs = np.asarray(inputs)
    free = [a for a in range(1, inputs.ndim) if a not in axes]
    moved = np.transpose(inputs, [0] + free + list(axes))
    return ref_general(kernel, moved, len(axes), reduction)


@pytest.mark.parametrize("reduction", ["max", "mean"])
def test_dense_general_non_trailing_axes_matches_loop(reduction):
    model, x = _General(), _RNG.normal(size=(2, 4, 3, 2)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), x)
    layers = {la.name: la for la in sp.find_layers(model, variables, x)}
    assert set(layers) == {"over_f", "over_tc"}
    assert layers["over_f"].input_axes == (1, 2, 0) and not layers["over_f"].channel_structured
    inputs = sp.capture_inputs(model, variables, x)
    sens = sp.compute_sensitivities(model, variables, x, reduction=reduction)
    for name, axes in [("over_f", (1,)), ("over_tc", (1, 3))]:
        raw = np.asarray(variables["params"][name]["kernel"])
        want = ref_dense_general(raw, inputs[name], axes, reduction)
        _close(sens[name].weight, want.reshape(layers[name].kernel_shape))
    result = sp.prune(model, variables, x, method="wt", keep_ratio=72 / 121)  # 121 params in all
    assert result.info["reachable"] and abs(result.keep_ratio - 72 / 121) < 1e-9
    mask = np.asarray(result.masks["over_tc"]["kernel"])
    assert mask.shape == (3, 5, 2, 3) and np.all(np.asarray(result.params["over_tc"]["kernel"])[~mask] == 0)


def test_dense_general_batch_dims_left_dense_with_reason():
    class Batched(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.DenseGeneral(3, axis=-1, batch_dims=(0,), name="per_sample")(nn.Dense(4)(x)).reshape(2, -1)

    model, x = Batched(), _RNG.normal(size=(2, 3, 4)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), x)
    # the model runs on batches of exactly 2 (its kernel has one matrix per sample), so ask the adapter
    layers, dense = as_adapter(model, None, {}).find_layers_report(variables, x)
    assert [la.name for la in layers] == ["Dense_0"]
    assert "separate matrix per sample index" in dense["per_sample"]


def test_nnx_linear_general_non_trailing_axis_matches_loop():
    class Mix(nnx.Module):
        def __init__(self, rngs):
            self.mix = nnx.LinearGeneral(4, (2, 3), axis=1, rngs=rngs)

        def __call__(self, x):  # [B, 4, T]
            return self.mix(x)

    model, x = Mix(nnx.Rngs(0)), _RNG.normal(size=(3, 4, 5)).astype(np.float32)
    (layer,) = spx.find_layers(model, x)
    assert layer.input_axes == (1, 0) and layer.kernel_shape == (4, 6)
    sens = spx.compute_sensitivities(model, x, reduction="max")
    inputs = spx.capture_inputs(model, x)
    raw = np.asarray(model.mix.kernel.get_value())
    _close(sens["mix"].weight, ref_dense_general(raw, inputs["mix"], (1,), "max").reshape(4, 6))
