"""Sensitivity kernels against a slow, explicit NumPy reference."""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sensprune as sp
from sensprune import compile_tiers, paths, sensitivity, sensitivity_kernels
from sensprune.layers import capture_inputs, find_layers
from sensprune.sensitivity import (
    EPS,
    compute_sensitivities,
    layer_sensitivity,
    max_sensitivity,
)
from sensprune.types import LayerSensitivity
from tests.fixtures import Compiles

# ---------------------------------------------------------------------------
# Reference: explicit loops over points, output positions, rows and columns.


def _same_pads(size, window, stride, dilation):
    effective = (window - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def ref_geometry(spatial, window, strides, padding, kdil, idil):
    """Explicit (low, high) pairs and output sizes, computed without lax."""
    if padding == "VALID":
        pads = [(0, 0)] * len(spatial)
    elif padding == "SAME":
        pads = [_same_pads(n, k, s, d) for n, k, s, d in zip(spatial, window, strides, kdil)]
    else:
        pads = [tuple(p) for p in padding]
    out = []
    for n, k, s, d, di, (lo, hi) in zip(spatial, window, strides, kdil, idil, pads):
        dilated = (n - 1) * di + 1
        out.append((dilated + lo + hi - (k - 1) * d - 1) // s + 1)
    return pads, out


def ref_patch_value(x_point, pos, offset, channel, strides, pads, kdil, idil):
    """Entry of the (padded, dilated) input seen by window ``offset`` at output ``pos``."""
    index = []
    for o, k, s, d, di, (lo, _), n in zip(pos, offset, strides, kdil, idil, pads, x_point.shape):
        coord = o * s + k * d - lo  # coordinate in the input-dilated grid
        if coord < 0 or coord % di or coord // di >= n:
            return 0.0
        index.append(coord // di)
    return x_point[tuple(index) + (channel,)]


def ref_point_sensitivity(x_point, kernel, strides, padding, kdil, idil, reduction):
    """Reduced g for one nonnegative (pseudo-)point; kernel-shaped."""
    window = kernel.shape[:-2]
    cin, cout = kernel.shape[-2:]
    spatial = x_point.shape[:-1]
    pads, out = ref_geometry(spatial, window, strides, padding, kdil, idil)
    positions = list(itertools.product(*(range(o) for o in out)))
    offsets = list(itertools.product(*(range(k) for k in window)))
    per_pos = np.zeros((len(positions),) + kernel.shape)
    for p, pos in enumerate(positions):
        a = {}
        for off in offsets:
            for c in range(cin):
                a[off, c] = ref_patch_value(x_point, pos, off, c, strides, pads, kdil, idil)
        for i in range(cout):
            z_plus = z_minus = 0.0
            for (off, c), value in a.items():
                w = kernel[off + (c, i)]
                if w > 0:
                    z_plus += w * value
                elif w < 0:
                    z_minus += w * value
            for (off, c), value in a.items():
                w = kernel[off + (c, i)]
                z = z_plus if w > 0 else z_minus
                if w != 0 and abs(z) > EPS:
                    per_pos[(p,) + off + (c, i)] = w * value / z
    return per_pos.mean(axis=0) if reduction == "mean" else per_pos.max(axis=0)


def ref_sensitivity(x, kernel, reduction, strides=None, padding="VALID", kdil=None, idil=None):
    """Weight and channel sensitivity over a batch, torchprune's batch-level sign rule.

    ``x``: ``[B, *spatial, C]`` for conv, ``[B, F]`` or ``[B, T, F]`` for dense
    (``T`` handled as output positions of a window-1 conv).
    """
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    rank = kernel.ndim - 2
    if rank == 0:  # dense: per-sample positions are the axes between batch and features
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        kernel = kernel.reshape((1,) + kernel.shape)
        strides = kdil = idil = (1,)
        padding = "VALID"
    strides = strides or (1,) * max(rank, 1)
    kdil = kdil or (1,) * max(rank, 1)
    idil = idil or (1,) * max(rank, 1)
    points = [np.maximum(x, 0), np.maximum(-x, 0)] if (x < 0).any() else [x]
    weight = np.zeros(kernel.shape)
    channel = np.zeros(kernel.shape[-2])
    window_axes = tuple(range(kernel.ndim - 2))
    reduce = np.mean if reduction == "mean" else np.max
    for batch in points:
        for x_point in batch:
            s = ref_point_sensitivity(x_point, kernel, strides, padding, kdil, idil, reduction)
            weight = np.maximum(weight, s)
            # the tracker's sensitivity_in: per point, kernel positions reduced as the patches, max over outputs
            channel = np.maximum(channel, reduce(s, axis=window_axes).max(axis=-1))
    if rank == 0:
        weight = weight[0]
    return weight, channel


# ---------------------------------------------------------------------------
# Helpers.


def _close(got: LayerSensitivity, want):
    weight, channel = want
    np.testing.assert_allclose(np.asarray(got.weight), weight, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got.channel), channel, rtol=1e-5, atol=1e-6)


def _inputs(seed, shape, negative):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return x if negative else np.abs(x)


def _sparse_kernel(seed, shape):
    """Random kernel with ~20% exact zeros."""
    rng = np.random.default_rng(seed)
    kernel = rng.standard_normal(shape).astype(np.float32)
    return np.where(rng.uniform(size=shape) < 0.2, np.float32(0), kernel)


def _init(model, x, seed=0):
    """Random variables with the model's structure (model.init compiles slowly on CPU)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if getattr(path[-1], "key", None) == "var":
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return (0.5 * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


_layer_sensitivity = jax.jit(layer_sensitivity, static_argnums=0, static_argnames="reduction")


def _sole_layer(model, x):
    """The model's only layer; shapes suffice, so variables are never materialised."""
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    (layer,) = find_layers(model, variables, x)
    return layer


# ---------------------------------------------------------------------------
# Kernels vs reference.


@pytest.mark.parametrize("reduction", ["mean", "max"])
@pytest.mark.parametrize("negative", [False, True])
def test_dense_matches_reference(reduction, negative):
    x = _inputs(1, (5, 7), negative)
    layer = _sole_layer(nn.Dense(4), x)
    kernel = _sparse_kernel(2, layer.kernel_shape)
    got = _layer_sensitivity(layer, kernel, x, reduction=reduction)
    _close(got, ref_sensitivity(x, kernel, reduction))


@pytest.mark.parametrize("reduction", ["mean", "max"])
def test_dense_on_sequence_matches_reference(reduction):
    x = _inputs(3, (3, 4, 6), True)
    layer = _sole_layer(nn.Dense(5), x)
    assert layer.num_patches == 4
    kernel = _sparse_kernel(4, layer.kernel_shape)
    got = _layer_sensitivity(layer, kernel, x, reduction=reduction)
    _close(got, ref_sensitivity(x, kernel, reduction))


CONV_CASES = [
    # window, strides, padding, kernel_dilation, input_dilation, spatial
    ((3, 3), (1, 1), "SAME", (1, 1), (1, 1), (5, 5)),
    ((3, 3), (2, 2), "SAME", (1, 1), (1, 1), (6, 5)),
    ((3, 2), (1, 2), "VALID", (1, 1), (1, 1), (5, 6)),
    ((3, 3), (2, 1), ((1, 2), (0, 1)), (1, 1), (1, 1), (5, 5)),
    ((3, 3), (1, 1), "SAME", (2, 2), (1, 1), (6, 6)),
    ((2, 2), (2, 2), "VALID", (2, 1), (1, 1), (7, 6)),
    ((3, 3), (1, 1), ((1, 1), (2, 0)), (1, 1), (2, 2), (3, 4)),
    ((3,), (2,), "SAME", (2,), (1,), (9,)),
    ((2, 2, 2), (1, 2, 1), "VALID", (1, 1, 1), (1, 1, 1), (3, 4, 3)),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"k{c[0]}s{c[1]}p{c[2]}d{c[3]}i{c[4]}")
@pytest.mark.parametrize("reduction", ["mean", "max"])
def test_conv_matches_reference(case, reduction):
    window, strides, padding, kdil, idil, spatial = case
    conv = nn.Conv(
        3, window, strides=strides, padding=padding, kernel_dilation=kdil, input_dilation=idil
    )
    x = _inputs(5, (3,) + spatial + (2,), True)
    layer = _sole_layer(conv, x)
    kernel = _sparse_kernel(6, layer.kernel_shape)
    got = _layer_sensitivity(layer, kernel, x, reduction=reduction)
    want = ref_sensitivity(x, kernel, reduction, strides, padding, kdil, idil)
    _close(got, want)


@pytest.mark.parametrize("mode", ["carry", "reduce"])
def test_contraction_modes_and_small_steps(monkeypatch, mode):
    """Both (max, x) strategies, with tiny step sizes: many groups, blocks and padding."""
    monkeypatch.setattr(sensitivity_kernels, "_GROUP_ELEMENTS", 64)
    monkeypatch.setattr(sensitivity_kernels, "_CARRY_ELEMENTS", 200)
    monkeypatch.setattr(sensitivity_kernels, "_BLOCK_ELEMENTS", 200)
    conv = nn.Conv(3, (3, 3), strides=(2, 1), padding=((1, 0), (2, 1)))
    x = _inputs(15, (5, 5, 4, 2), True)
    x[1:3] = np.abs(x[1:3])  # groups with and without negative entries
    layer = _sole_layer(conv, x)
    kernel = _sparse_kernel(16, layer.kernel_shape)
    for reduction in ("mean", "max"):
        got = jax.jit(lambda k, a: layer_sensitivity(layer, k, a, reduction=reduction, contraction=mode))(kernel, x)
        _close(got, ref_sensitivity(x, kernel, reduction, (2, 1), layer.padding))


def test_contraction_is_a_keyword_of_the_pass_and_prune():
    """``contraction=`` reaches the kernels; every strategy gives the same result; bad names raise."""
    model = nn.Sequential([nn.Conv(3, (3, 3)), nn.relu, lambda x: x.reshape(x.shape[0], -1), nn.Dense(2)])
    x = _inputs(6, (6, 5, 5, 2), True)
    variables = _init(model, x)
    base = sensitivity.compute_sensitivities(model, variables, x, reduction="max", chunk_size=4)
    for mode in sensitivity.CONTRACTIONS:
        got = sensitivity.compute_sensitivities(model, variables, x, reduction="max", chunk_size=4, contraction=mode)
        for name in base:
            np.testing.assert_allclose(got[name].weight, base[name].weight, rtol=1e-5, atol=1e-6)
    assert not hasattr(sensitivity, "MAX_CONTRACTION")
    with pytest.raises(ValueError, match="contraction"):
        sensitivity.compute_sensitivities(model, variables, x, reduction="max", contraction="fast")
    with pytest.raises(ValueError, match="contraction"):
        sp.prune(model, variables, x, method="pfp", keep_ratio=0.5, contraction="fast")
    result = sp.prune(model, variables, x, method="pfp", keep_ratio=0.5, contraction="carry")
    assert 0 < result.keep_ratio <= 1


@pytest.mark.parametrize("negative", [False, True])
def test_conv_bias_is_ignored_and_sign_split(negative):
    conv = nn.Conv(4, (3, 3), strides=2)
    x = _inputs(7, (4, 6, 6, 3), negative)
    variables = _init(conv, x)
    kernel = variables["params"]["kernel"]
    biased = {"params": {"kernel": kernel, "bias": np.full((4,), 100.0, np.float32)}}
    for reduction in ("mean", "max"):
        got = compute_sensitivities(conv, biased, x, reduction=reduction, chunk_size=3)[""]
        _close(got, ref_sensitivity(x, kernel, reduction, (2, 2), "SAME"))


# ---------------------------------------------------------------------------
# Properties.


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(4, (3, 3), strides=2)(x))
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.Conv(5, (3, 3), padding="VALID")(x)  # output can be negative: next input splits
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(3)(nn.Dense(6)(x))


@pytest.mark.parametrize("reduction", ["mean", "max"])
def test_chunk_invariance(reduction):
    model = _Net()
    data = _inputs(8, (10, 8, 8, 2), True)
    variables = _init(model, data[:1])
    run = lambda d, c: compute_sensitivities(  # noqa: E731
        model, variables, d, reduction=reduction, chunk_size=c, train=False
    )
    chunked = run(data, 3)
    assert set(chunked) == {"Conv_0", "Conv_1", "Dense_0", "Dense_1"}
    for other in (run([data[:4], data[4:5], data[5:]], 3), run(data, 64)):  # 64: all at once
        for name in chunked:
            # Equal up to rounding: XLA may block a matmul differently for another batch shape (1 ulp
            # seen on AVX-512); a lost or repeated chunk would change entries by far more.
            np.testing.assert_allclose(other[name].weight, chunked[name].weight, rtol=1e-6, atol=0)
            np.testing.assert_allclose(other[name].channel, chunked[name].channel, rtol=1e-6, atol=0)
    # every layer matches the whole-batch reference on its captured input
    inputs = jax.jit(lambda v, x: capture_inputs(model, v, x, train=False))(variables, data)
    for layer in find_layers(model, variables, data, train=False):
        kernel = paths.get_kernel(variables["params"], layer)
        geometry = (layer.strides, layer.padding) if layer.kind == "conv" else ()
        want = ref_sensitivity(inputs[layer.name], kernel, reduction, *geometry)
        _close(chunked[layer.name], want)


@pytest.mark.parametrize("reduction", ["mean", "max"])
def test_fused_pass_equals_the_per_layer_pass(reduction):
    """One compiled scan over all chunks and layers gives the per-layer dispatch's numbers."""
    model = _Net()
    data = _inputs(8, (10, 8, 8, 2), True)  # negative inputs: the sign split runs inside the scan
    variables = _init(model, data[:1])
    run = lambda d, **kw: compute_sensitivities(  # noqa: E731
        model, variables, d, reduction=reduction, chunk_size=3, train=False, **kw
    )
    per_layer = run(data)
    for fused in (run(data, fused=True), run([data[:4], data[4:5], data[5:]], fused=True)):
        assert set(fused) == set(per_layer)
        for name in per_layer:
            np.testing.assert_allclose(fused[name].weight, per_layer[name].weight, rtol=1e-6, atol=0)
            np.testing.assert_allclose(fused[name].channel, per_layer[name].channel, rtol=1e-6, atol=0)
    # Unhashable apply options (an rngs dict) take a fresh jit instead of the cached program.
    rngs = {"dropout": jax.random.PRNGKey(0)}
    with_rngs = run(data, fused=True, rngs=rngs)
    np.testing.assert_allclose(with_rngs["Dense_1"].weight, per_layer["Dense_1"].weight, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match=r"chunks must be \[C, n, ...\] with C, n >= 1, got shape \(0, 3\)"):
        sensitivity.fused_pass(model, variables, np.zeros((0, 3)), find_layers(model, variables, data[:1], train=False))


def test_zero_weights_have_zero_sensitivity():
    model = _Net()
    data = _inputs(10, (10, 8, 8, 2), True)
    variables = _init(model, data[:1])
    rng = np.random.default_rng(12)
    params = jax.tree_util.tree_map(
        lambda w: np.where(rng.uniform(size=w.shape) < 0.5, np.float32(0), w), variables["params"]
    )
    variables = {**variables, "params": params}
    sens = compute_sensitivities(model, variables, data, reduction="max", chunk_size=3, train=False)
    for layer in find_layers(model, variables, data, train=False):
        kernel = paths.get_kernel(params, layer)
        weight = sens[layer.name].weight
        assert weight.shape == kernel.shape
        assert jnp.all(jnp.where(kernel == 0, weight, 0.0) == 0.0)
        assert jnp.all(weight >= 0) and jnp.any(weight > 0)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_single_point_rows_sum_to_one(kind):
    """For one point, each row's positive (and negative) shares sum to 1."""
    if kind == "dense":
        module, x = nn.Dense(6), _inputs(13, (1, 9), False) + 0.1
    else:
        module, x = nn.Conv(6, (3, 3), padding="VALID"), _inputs(13, (1, 5, 5, 2), False) + 0.1
    layer = _sole_layer(module, x)
    kernel = _sparse_kernel(14, layer.kernel_shape)
    sens = _layer_sensitivity(layer, kernel, x, reduction="mean")
    weight = np.asarray(sens.weight).reshape(-1, layer.out_channels)
    flat = kernel.reshape(-1, layer.out_channels)
    for part in (flat > 0, flat < 0):  # 1 per row, or 0 for a row without that sign
        want = part.any(axis=0).astype(np.float32)
        np.testing.assert_allclose(np.where(part, weight, 0.0).sum(axis=0), want, rtol=1e-5)
    # one point: the channel sensitivity is the mean over kernel positions (the 'mean' reduction), max over outputs
    per_position = np.asarray(sens.weight).reshape(-1, layer.in_channels, layer.out_channels)
    np.testing.assert_allclose(np.asarray(sens.channel), per_position.mean(axis=0).max(axis=-1), rtol=1e-6)


def test_degenerate_denominator_contributes_zero():
    layer = _sole_layer(nn.Dense(2, use_bias=False), np.ones((1, 3), np.float32))
    kernel = jnp.array([[1.0, -1.0], [1.0, -1.0], [1.0, 2.0]])
    x = jnp.array([[0.0, 0.0, 1.0]])  # unit 0 has no negative weight, unit 1 sees z- = 0
    sens = layer_sensitivity(layer, kernel, x, reduction="max")
    assert jnp.all(jnp.isfinite(sens.weight))
    # unit 1: negative weights see zero input -> z- = 0 -> those entries are 0
    np.testing.assert_allclose(sens.weight, [[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])


def test_max_sensitivity_and_pytree():
    a = LayerSensitivity(weight=jnp.array([1.0, 3.0]), channel=jnp.array([2.0]))
    b = LayerSensitivity(weight=jnp.array([2.0, 1.0]), channel=jnp.array([1.0]))
    c = max_sensitivity(a, b)
    np.testing.assert_array_equal(c.weight, [2.0, 3.0])
    np.testing.assert_array_equal(c.channel, [2.0])
    assert len(jax.tree_util.tree_leaves(c)) == 2


def test_argument_validation():
    model = nn.Dense(2)
    x = np.ones((3, 4), np.float32)
    variables = _init(model, x)
    with pytest.raises(ValueError, match="reduction"):
        compute_sensitivities(model, variables, x, reduction="sum")
    with pytest.raises(ValueError, match="chunk_size"):
        compute_sensitivities(model, variables, x, chunk_size=0)
    with pytest.raises(ValueError, match="at least one point"):
        compute_sensitivities(model, variables, x[:0])
    with pytest.raises(ValueError, match="at least one point"):
        compute_sensitivities(model, variables, [])
    with pytest.raises(ValueError, match="iterable of arrays"):
        compute_sensitivities(model, variables, [(x, x)])
    layer = find_layers(model, variables, x)[0]
    with pytest.raises(ValueError, match="reduction"):
        layer_sensitivity(layer, variables["params"]["kernel"], x, reduction="median")


def _pair(sens: LayerSensitivity):
    return np.asarray(sens.weight), np.asarray(sens.channel)


def test_static_sign_split_matches_the_per_group_decision():
    """``split=`` (decided by the caller, one kernel branch compiled) gives the per-group ``lax.cond``
    result: True on inputs with negatives, True or False on nonnegative inputs."""
    conv = nn.Conv(3, (3, 3), strides=(2, 1))
    x = _inputs(7, (6, 5, 5, 2), True)
    layer = _sole_layer(conv, x)
    kernel = _sparse_kernel(8, layer.kernel_shape)
    for reduction in ("mean", "max"):
        fn = jax.jit(lambda k, a, s: layer_sensitivity(layer, k, a, reduction=reduction, split=s), static_argnums=2)
        _close(fn(kernel, x, True), _pair(fn(kernel, x, None)))
        _close(fn(kernel, x, None), ref_sensitivity(x, kernel, reduction, (2, 1), layer.padding))
        nonneg = np.abs(x)
        for split in (True, False):
            _close(fn(kernel, nonneg, split), _pair(fn(kernel, nonneg, None)))


def test_pass_compiles_one_kernel_branch_per_sign(monkeypatch):
    """The streaming pass tells each kernel whether its input holds a negative entry (from the capture)."""
    seen = []
    real, real_bucket = sensitivity._ratio_step, sensitivity._bucket_step

    def spy(layer, reduction, *args, **kw):
        seen.append((layer.kind, kw["split"]))
        return real(layer, reduction, *args, **kw)

    def bucket_spy(bucket, reduction, *args, **kw):  # plain convs run their shape bucket's kernel
        seen.append(("conv", kw["split"]))
        return real_bucket(bucket, reduction, *args, **kw)

    monkeypatch.setattr(sensitivity, "_ratio_step", spy)
    monkeypatch.setattr(sensitivity, "_bucket_step", bucket_spy)
    model = nn.Sequential([nn.Conv(3, (3, 3)), nn.relu, lambda x: x.reshape(x.shape[0], -1), nn.Dense(2)])
    x = _inputs(8, (6, 5, 5, 2), True)
    variables = _init(model, x)
    got = sensitivity.compute_sensitivities(model, variables, x, reduction="max", chunk_size=4)
    assert sorted(set(seen)) == [("conv", True), ("dense", False)]
    monkeypatch.setattr(sensitivity, "_ratio_step", real)
    monkeypatch.setattr(sensitivity, "_bucket_step", real_bucket)
    fused = sensitivity.compute_sensitivities(model, variables, x, reduction="max", chunk_size=4, fused=True)
    for name in got:
        _close(got[name], _pair(fused[name]))


class _SmallConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(5, (3, 3))(x))
        x = nn.relu(nn.Conv(7, (3, 3), strides=2)(x))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_prune_compiles_only_the_pass_and_nothing_on_later_calls():
    """The first sp.prune compiles the capture, one kernel per layer geometry and the zeroing's
    gradient program (one chunk shape), nothing per keep-ratio search iteration; later calls on
    the same model (any ratio, any reduction already seen) compile at most the full builds of
    those programs once (sensprune.compile_tiers), then nothing."""
    from collections import Counter

    model = _SmallConvNet()  # hashable (a Sequential's layer list is not: a fresh capture jit per call)
    x = _inputs(11, (12, 7, 7, 3), True)
    variables = _init(model, x)
    pass_programs = {"jit(_signed_capture)", "jit(_ratio_step)", "jit(_bucket_step)",
                     "jit(_abs_grad_impl)"}
    firsts: Counter = Counter()
    for method in ("sipp", "pfp"):
        with Compiles() as first:
            sp.prune(model, variables, x, method=method, keep_ratio=0.4, chunk_size=8, allow_dead_layers=True)
        assert set(first.names) <= pass_programs, first.names
        assert first.names.count("jit(_abs_grad_impl)") <= 1, first.names  # 11 points, chunks of 8: padded
        kernels = [n for n in first.names if n in ("jit(_ratio_step)", "jit(_bucket_step)")]
        assert len(kernels) <= 3  # three layers of distinct geometry
        firsts += Counter(first.names)

    def calls(ratios):
        for method in ("sipp", "pfp"):
            for keep_ratio in ratios:
                sp.prune(model, variables, x, method=method, keep_ratio=keep_ratio, chunk_size=8,
                         allow_dead_layers=True)

    with Compiles() as later:
        calls((0.4, 0.15, 0.4, 0.15, 0.3))
    assert not Counter(later.names) - firsts, later.names  # full builds at most, each once
    compile_tiers.settle()
    calls((0.15,))
    with Compiles() as settled:
        calls((0.4, 0.15))
    assert settled.names == [], settled.names


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"k{c[0]}s{c[1]}p{c[2]}d{c[3]}i{c[4]}")
def test_bucket_rows_gather_the_patches_and_zeros(case):
    """Rows at the bucket's index are the layer's patches in the leading window/channel slots and
    exact zeros in the padded ones (so padding adds nothing to any z)."""
    from sensprune import sensitivity_buckets as buckets

    window, strides, padding, kdil, idil, spatial = case
    conv = nn.Conv(3, window, strides=strides, padding=padding, kernel_dilation=kdil, input_dilation=idil)
    x = _inputs(21, (2,) + spatial + (2,), True)
    layer = _sole_layer(conv, x)
    rows = int(np.prod(buckets._padded_spatial(layer)))
    bucket = buckets.Bucket(patches=layer.num_patches, out=3, rows=rows + 4, window=layer.window_size + 2,
                            channels=layer.in_channels + 3)
    laid = np.asarray(buckets.to_rows(layer, bucket, x))
    assert laid.shape == (2, bucket.rows, bucket.channels)
    gathered = laid[:, buckets.row_index(layer, bucket)].reshape(2, layer.num_patches, bucket.window, -1)
    want = np.asarray(sensitivity_kernels.input_patches(layer, x, order="window"))
    got = gathered[:, :, : layer.window_size, : layer.in_channels].reshape(want.shape)
    np.testing.assert_array_equal(got, want)
    padded = gathered.copy()
    padded[:, :, : layer.window_size, : layer.in_channels] = 0
    assert not padded.any()
    matrix = np.arange(layer.window_size * layer.in_channels * 3, dtype=np.float32).reshape(-1, 3)
    np.testing.assert_array_equal(
        buckets.crop_ratio(layer, bucket, buckets.pad_matrix(layer, bucket, matrix)), matrix
    )


class _BucketNet(nn.Module):
    """Two convs of different geometry with 16 output positions and 8 outputs (one bucket)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))  # [8, 8, 4] -> [4, 4, 8], K * C = 36
        x = nn.relu(nn.Conv(8, (3, 3))(x))  # [4, 4, 8] -> [4, 4, 8], K * C = 72
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("reduction", ["mean", "max"])
def test_layers_of_a_bucket_share_one_kernel_and_match_the_reference(monkeypatch, reduction):
    from sensprune import sensitivity_buckets as buckets

    calls = []
    real = sensitivity._bucket_step

    def spy(bucket, *args, **kw):
        calls.append(bucket)
        return real(bucket, *args, **kw)

    monkeypatch.setattr(sensitivity, "_bucket_step", spy)
    model = _BucketNet()
    x = _inputs(22, (5, 8, 8, 4), False)  # nonnegative: both convs take the same (unsplit) program
    variables = _init(model, x)
    layers = find_layers(model, variables, x)
    assigned = buckets.assign(layers)
    assert set(assigned) == {"Conv_0", "Conv_1"} and assigned["Conv_0"] == assigned["Conv_1"]
    with Compiles() as compiles:
        got = compute_sensitivities(model, variables, x, reduction=reduction, chunk_size=2)
    assert len(calls) == 2 * 3 and len(set(calls)) == 1  # both convs, 3 chunks, one static bucket
    assert compiles.names.count("jit(_bucket_step)") <= 1
    inputs = jax.jit(lambda v, a: capture_inputs(model, v, a))(variables, x)
    for layer in layers:
        kernel = np.asarray(paths.get_kernel(variables["params"], layer))
        strides = layer.strides if layer.kind == "conv" else None
        padding = layer.padding if layer.kind == "conv" else "VALID"
        _close(got[layer.name], ref_sensitivity(np.asarray(inputs[layer.name]), kernel, reduction, strides, padding))
