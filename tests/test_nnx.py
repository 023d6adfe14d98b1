"""Flax NNX support (sensprune.nnx): every result equals the Linen twin's with the same weights.

The nnx twins name their layers like Linen's auto-names (``Dense_0``, ``Conv_1``, ...), so
``sensprune.nnx.params_dict(model)`` has exactly the keys of the Linen ``params`` and layer
names, masks and sensitivities compare one to one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sensprune as sp
import sensprune.nnx as spx
from tests.fixtures import CNN, MLP, digits, np_init


class NnxMLP(nnx.Module):
    """Twin of ``fixtures.MLP``."""

    def __init__(self, rngs: nnx.Rngs):
        self.Dense_0 = nnx.Linear(64, 48, rngs=rngs)
        self.Dense_1 = nnx.Linear(48, 32, rngs=rngs)
        self.Dense_2 = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.Dense_0(x))
        x = nnx.relu(self.Dense_1(x))
        return self.Dense_2(x)


class NnxCNN(nnx.Module):
    """Twin of ``fixtures.CNN``."""

    def __init__(self, rngs: nnx.Rngs, dilation: int = 1):
        self.Conv_0 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.BatchNorm_0 = nnx.BatchNorm(8, rngs=rngs)
        self.Conv_1 = nnx.Conv(8, 12, (3, 3), strides=2, padding="VALID", rngs=rngs)
        self.Conv_2 = nnx.Conv(12, 16, (3, 3), kernel_dilation=dilation, use_bias=False, rngs=rngs)
        self.Dense_0 = nnx.Linear(16, 5, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.BatchNorm_0(self.Conv_0(x)))
        x = nnx.relu(self.Conv_1(x))
        x = nnx.relu(self.Conv_2(x)).mean(axis=(1, 2))
        return self.Dense_0(x)


class ListNet(nnx.Module):
    """Layers in an nnx.List: integer keys in the state, string keys in Layer.path."""

    def __init__(self, rngs: nnx.Rngs):
        self.blocks = nnx.List([nnx.Conv(1, 4, (3, 3), strides=2, rngs=rngs), nnx.Linear(64, 3, rngs=rngs)])

    def __call__(self, x):
        x = nnx.relu(self.blocks[0](x))
        return self.blocks[1](x.reshape(x.shape[0], -1))




def _twins(kind: str, dilation: int = 1):
    """(linen model, linen variables, a fresh nnx model with the same weights)."""
    linen, variables, model = _twin_parts(kind, dilation)
    return linen, variables, nnx.clone(model)  # new Variables: tests may modify their model


@functools.lru_cache(maxsize=None)
def _twin_parts(kind: str, dilation: int):
    x, _ = digits()
    if kind == "mlp":
        linen, build = MLP(), lambda: NnxMLP(nnx.Rngs(0))
    else:
        linen, build = CNN(dilation=dilation), lambda: NnxCNN(nnx.Rngs(0), dilation=dilation)
    variables = np_init(linen, x[:1], seed=3)
    if "batch_stats" in variables:  # non-trivial running statistics
        rng = np.random.default_rng(4)
        variables = {
            **variables,
            "batch_stats": {
                "BatchNorm_0": {
                    "mean": jnp.asarray(0.1 * rng.standard_normal(8), jnp.float32),
                    "var": jnp.asarray(rng.uniform(0.5, 2.0, 8), jnp.float32),
                }
            },
        }
    model = nnx.eval_shape(build)  # no RNG compiles: every value is copied from Linen
    nnx.update(model, spx.state_like(nnx.state(model, nnx.Param), variables["params"]))
    if "batch_stats" in variables:
        nnx.update(model, spx.state_like(nnx.state(model, nnx.BatchStat), variables["batch_stats"]))
    return linen, variables, model


def _points(n: int = 48):
    x, y = digits()
    return x[:n], y[:n] % 5


@pytest.mark.parametrize("kind,dilation", [("mlp", 1), ("cnn", 1), ("cnn", 2)])
def test_find_layers_and_outputs_match_linen(kind, dilation):
    linen, variables, model = _twins(kind, dilation)
    x, _ = _points(4)
    assert spx.find_layers(model, x) == sp.find_layers(linen, variables, x)
    model.eval()  # nnx modules start in train mode; prune runs them in eval mode
    np.testing.assert_allclose(
        np.asarray(model(x)), np.asarray(linen.apply(variables, x)), rtol=1e-5, atol=1e-5
    )


def test_layer_paths_use_string_keys_of_the_param_state():
    model = nnx.eval_shape(lambda: ListNet(nnx.Rngs(0)))
    layers = spx.find_layers(model, np.zeros((2, 8, 8, 1), np.float32))
    assert [layer.path for layer in layers] == [("blocks", "0"), ("blocks", "1")]
    assert layers[0].padding == ((0, 1), (0, 1)) and layers[0].output_shape == (4, 4, 4)
    assert ("blocks", 0, "kernel") in dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))


def test_capture_inputs_under_jit_matches_linen():
    linen, variables, model = _twins("cnn")
    x, _ = _points(3)
    expected = sp.capture_inputs(linen, variables, x)
    by_jit = jax.jit(lambda x: spx.capture_inputs(model, x))(x)
    by_nnx_jit = nnx.jit(lambda m, x: spx.capture_inputs(m, x))(model, x)
    assert set(by_jit) == set(by_nnx_jit) == set(expected)
    for name in expected:
        np.testing.assert_allclose(np.asarray(by_jit[name]), np.asarray(expected[name]), atol=1e-5)
        np.testing.assert_allclose(np.asarray(by_nnx_jit[name]), np.asarray(expected[name]), atol=1e-5)


@pytest.mark.parametrize("kind,reduction", [("mlp", "max"), ("cnn", "mean")])  # the rest: in prune tests
def test_sensitivities_match_linen(kind, reduction):
    linen, variables, model = _twins(kind)
    x, _ = _points()
    expected = sp.compute_sensitivities(linen, variables, x, reduction=reduction, chunk_size=16)
    got = spx.compute_sensitivities(model, x, reduction=reduction, chunk_size=16)
    assert set(got) == set(expected)
    for name, sens in expected.items():
        np.testing.assert_allclose(np.asarray(got[name].weight), np.asarray(sens.weight), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(got[name].channel), np.asarray(sens.channel), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kind,method",
    [("mlp", "sipp"), ("mlp", "wt"), ("cnn", "sipp"), ("cnn", "pfp"), ("cnn", "wt"), ("cnn", "ft")],
)
def test_prune_masks_match_linen(kind, method):
    linen, variables, model = _twins(kind)
    x, _ = _points()
    before = jax.tree.map(np.asarray, spx.params_dict(model))
    key = jax.random.PRNGKey(0)
    expected = sp.prune(linen, variables, x, method=method, keep_ratio=0.4, key=key, chunk_size=16)
    got = spx.prune(model, x, method=method, keep_ratio=0.4, key=key, chunk_size=16)
    assert isinstance(got.masks, nnx.State) and isinstance(got.params, nnx.State)
    jax.tree.map(np.testing.assert_array_equal, spx.params_dict(got.masks), expected.masks)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        spx.params_dict(got.params), expected.params,
    )
    assert set(got.sensitivities) == set(expected.sensitivities)
    for name, score in expected.sensitivities.items():  # sipp: weight sensitivities (mean); pfp: max
        np.testing.assert_allclose(np.asarray(got.sensitivities[name]), np.asarray(score), rtol=1e-6, atol=1e-6)
    assert got.keep_ratio == expected.keep_ratio and got.layer_kept == expected.layer_kept
    assert got.flops == expected.flops
    # The model itself is untouched until apply_result.
    jax.tree.map(np.testing.assert_array_equal, spx.params_dict(model), before)
    spx.apply_result(model, got)
    assert sp.count_nonzero(spx.params_dict(model)) == sp.count_nonzero(expected.params)


def _train(model, optimizer, steps: int = 20) -> None:
    """``steps`` SGD steps through ``optimizer.update(model, grads)`` (jitted with split/merge)."""
    x, y = digits()
    graphdef, state = nnx.split((model, optimizer))

    @jax.jit
    def step(state, xb, yb):
        model, optimizer = nnx.merge(graphdef, state)

        def loss(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(xb), yb).mean()

        optimizer.update(model, nnx.grad(loss)(model))
        return nnx.state((model, optimizer))

    for i in range(steps):
        state = step(state, x[16 * i : 16 * i + 16], y[16 * i : 16 * i + 16])
    nnx.update((model, optimizer), state)


def test_masked_optimizer_keeps_pruned_weights_at_zero():
    _, _, model = _twins("mlp")
    x, _ = _points()
    result = spx.prune(model, x, method="wt", keep_ratio=0.3)
    spx.apply_result(model, result)
    control = nnx.clone(model)
    masks = spx.params_dict(result.masks)
    tx = optax.chain(optax.add_decayed_weights(1e-2), optax.adam(1e-2))  # decay would move zeros

    _train(model, nnx.Optimizer(model, sp.masked(tx, result.masks), wrt=nnx.Param))
    _train(control, nnx.Optimizer(control, tx, wrt=nnx.Param))
    params, moved = spx.params_dict(model), spx.params_dict(control)
    for name in ("Dense_0", "Dense_1", "Dense_2"):
        pruned = ~np.asarray(masks[name]["kernel"])
        assert pruned.any()
        assert np.all(np.asarray(params[name]["kernel"])[pruned] == 0)
        assert np.all(np.asarray(params[name]["kernel"])[~pruned] != 0)
        assert np.mean(np.asarray(moved[name]["kernel"])[pruned] != 0) > 0.5  # some pixels are always 0

    # The helper builds the same optimizer; masks=None keeps the nonzero entries.
    for given in (result, None):
        helper = spx.masked_optimizer(model, optax.sgd(0.1), given)
        assert isinstance(helper, nnx.Optimizer)
        got = spx.params_dict(nnx.as_pure(sp.get_masks(helper.opt_state)))
        jax.tree.map(np.testing.assert_array_equal, got, masks)


def test_mask_helpers():
    _, _, model = _twins("mlp")
    masks = jax.tree.map(lambda p: np.abs(np.asarray(p)) > 0.05, spx.params_dict(model))
    state = spx.mask_state(model, masks)
    assert isinstance(state, nnx.State)
    spx.apply_masks(model, state)
    jax.tree.map(np.testing.assert_array_equal, spx.params_dict(spx.nonzero_masks(model)), masks)
    with pytest.raises(ValueError, match="Dense_0"):
        spx.mask_state(model, {k: v for k, v in masks.items() if k != "Dense_0"} | {"Dense_9": masks["Dense_0"]})
    with pytest.raises(ValueError, match="wrt"):
        spx.masked_optimizer(model, optax.sgd(0.1), state, wrt=nnx.BatchStat)


@pytest.mark.parametrize("method", sp.available_methods())
def test_every_method_runs_on_an_nnx_mlp(method):
    _, _, model = _twins("mlp")
    x, y = _points(32)
    result = spx.prune(model, x, method=method, keep_ratio=0.5, key=jax.random.PRNGKey(1), labels=y, chunk_size=16)
    assert abs(result.keep_ratio - 0.5) < 0.05, result.keep_ratio
    spx.apply_result(model, result)
    assert np.isfinite(np.asarray(model(x))).all()


def test_eval_mode_and_forward_options():
    _, _, model = _twins("cnn")
    x, _ = _points(8)
    model.train()  # batch statistics in train mode; prune still uses running averages
    stats = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    eval_layers = spx.find_layers(model, x)
    assert spx.find_layers(model, x, forward=lambda m, x: m(x)) == eval_layers
    got = spx.capture_inputs(model, x)["Conv_1"]
    model.eval()
    np.testing.assert_allclose(np.asarray(got), np.asarray(spx.capture_inputs(model, x)["Conv_1"]), atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat)), stats)
    with pytest.raises(ValueError, match="forward"):
        spx.find_layers(model, x, forward="no_such_method")
    with pytest.raises(ValueError, match="apply_kwargs"):
        spx.prune(model, x, method="wt", keep_ratio=0.5, apply_kwargs={"train": False})
    with pytest.raises(ValueError, match="nnx.Module"):
        spx.find_layers(MLP(), x)


class _Grouped(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(4, 4, (3, 3), feature_group_count=2, rngs=rngs)

    def __call__(self, x):
        return self.conv(x)


class _General(nnx.Module):
    def __init__(self, rngs):
        self.first = nnx.Linear(4, 4, rngs=rngs)
        self.general = nnx.LinearGeneral(4, (2, 2), rngs=rngs)

    def __call__(self, x):
        return self.general(self.first(x))


class _Einsum(nnx.Module):
    def __init__(self, rngs):
        self.mix = nnx.Einsum("ab,bc->ac", (4, 3), rngs=rngs)

    def __call__(self, x):
        return self.mix(x)


class _Shared(nnx.Module):
    def __init__(self, rngs):
        self.twice = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        return self.twice(nnx.relu(self.twice(x)))


@pytest.mark.parametrize(
    "cls,shape,names",
    [
        (_Grouped, (1, 5, 5, 4), ["conv"]),
        (_General, (2, 4), ["first", "general"]),
        (_Einsum, (2, 4), ["mix"]),
        (_Shared, (2, 4), ["twice"]),
    ],
)
def test_formerly_unsupported_layers_are_found(cls, shape, names):
    # Issue #15: grouped convs, LinearGeneral, linear Einsums and shared layers are scored.
    model = nnx.eval_shape(lambda: cls(nnx.Rngs(0)))
    layers = spx.find_layers(model, np.zeros(shape, np.float32))
    assert [layer.name for layer in layers] == names
    assert layers[-1].calls == (2 if cls is _Shared else 1)


class _ResCNN(nnx.Module):
    """Conv + BatchNorm blocks with a residual add (tied channels), a LayerNorm and a head."""

    def __init__(self, rngs: nnx.Rngs):
        self.stem = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.stem_bn = nnx.BatchNorm(8, rngs=rngs)
        self.block = nnx.Conv(8, 8, (3, 3), use_bias=False, rngs=rngs)
        self.block_bn = nnx.BatchNorm(8, rngs=rngs)
        self.down = nnx.Conv(8, 12, (3, 3), strides=2, rngs=rngs)
        self.norm = nnx.LayerNorm(12, rngs=rngs)
        self.head = nnx.Linear(12, 5, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.stem_bn(self.stem(x)))
        h = nnx.relu(h + self.block_bn(self.block(h)))
        h = nnx.relu(self.norm(self.down(h)))
        return self.head(h.mean(axis=(1, 2)))


def _res_cnn() -> _ResCNN:
    model = _ResCNN(nnx.Rngs(0))
    rng = np.random.default_rng(5)
    # Non-trivial statistics and affine params, so that dropped BN / LayerNorm entries would matter.
    perturb = lambda v, scale: jnp.asarray(v + scale * np.abs(rng.standard_normal(v.shape)), v.dtype)  # noqa: E731
    nnx.update(model, jax.tree.map(lambda v: perturb(v, 0.5), nnx.state(model, nnx.BatchStat)))
    for norm in (model.stem_bn, model.block_bn, model.norm):
        norm.scale.value = perturb(norm.scale.value, 0.3)
        norm.bias.value = perturb(norm.bias.value, 0.3) - 0.2
    return model


@pytest.mark.parametrize("kind,method", [("mlp", "pfp"), ("res", "ft")])
def test_shrink_matches_masked_model_and_predicted_count(kind, method):
    model = _twins("mlp")[2] if kind == "mlp" else _res_cnn()
    x, _ = _points(32)
    before = jax.tree.map(np.asarray, nnx.state(model))
    result = spx.prune(model, x, method=method, keep_ratio=0.5, key=jax.random.PRNGKey(0), chunk_size=16)
    small = spx.shrink(model, result, x)
    assert type(small) is type(model) and small is not model
    # The input model is untouched.
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(model)), before)

    big, little = spx.params_dict(model), spx.params_dict(small)
    deps = spx.analyze(model, x)
    predicted = sp.predict_param_count(deps, big, spx.params_dict(result.masks))
    assert sp.count_params(little) == predicted < sp.count_params(big)
    narrower = 0
    for layer in spx.find_layers(model, x):
        module = small
        for key in layer.path:
            module = getattr(module, key)
        shape = module.kernel.value.shape
        assert shape[:-2] == layer.kernel_shape[:-2] and all(a <= b for a, b in zip(shape, layer.kernel_shape))
        assert (module.in_features, module.out_features) == shape[-2:]
        narrower += shape[-1] < layer.kernel_shape[-1]
    assert narrower >= 2
    if kind == "res":  # per-channel BatchNorm statistics / LayerNorm params follow their convs
        for norm, conv in ((small.stem_bn, small.stem), (small.block_bn, small.block), (small.norm, small.down)):
            assert norm.num_features == conv.out_features == norm.scale.value.shape[0]
        assert small.stem_bn.mean.value.shape == small.stem_bn.var.value.shape == (small.stem.out_features,)
        assert small.stem.out_features == small.block.out_features < 8  # tied by the residual add

    masked = nnx.clone(model)
    spx.apply_result(masked, result)
    masked.eval()
    small.eval()
    want = np.asarray(masked(x))
    np.testing.assert_allclose(np.asarray(small(x)), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(small, x)), want, rtol=1e-5, atol=1e-5)
    if kind == "mlp":  # bool masks of an already pruned model give the same network
        again = spx.shrink(masked, result.masks, x, deps=deps)
        jax.tree.map(np.testing.assert_array_equal, spx.params_dict(again), jax.tree.map(np.asarray, little))


class _EinsumHeads(nnx.Module):
    """Two nnx.Einsum layers with a head axis: 'btd,dhk->bthk' (biased), then 'bthk,hkc->btc'."""

    def __init__(self, rngs):
        self.mix = nnx.Einsum("btd,dhk->bthk", (6, 3, 4), (3, 4), rngs=rngs)
        self.out = nnx.Einsum("bthk,hkc->btc", (3, 4, 5), (5,), rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.mix(x)))


def test_nnx_einsum_shrinks_by_whole_heads():
    model = _EinsumHeads(nnx.Rngs(0))
    model.mix.bias.value = model.mix.bias.value + 0.3  # nonzero biases: a dropped head's must go with it
    x = np.random.default_rng(4).standard_normal((4, 7, 6)).astype(np.float32)
    masks = jax.tree.map(lambda a: np.ones(np.shape(a), bool), spx.params_dict(model))
    masks["out"]["kernel"][1] = False  # head 1's consumer rows: the head goes, with its mix columns
    masked = nnx.clone(model)
    nnx.update(masked, spx.state_like(nnx.state(masked, nnx.Param), sp.apply_masks(spx.params_dict(model), masks)))
    small = spx.shrink(model, masks, x)
    assert small.mix.kernel.value.shape == (6, 2, 4) and small.mix.bias.value.shape == (2, 4)
    assert small.out.kernel.value.shape == (2, 4, 5) and small.mix.kernel_shape == (6, 2, 4)
    np.testing.assert_array_equal(small.mix.bias.value, np.delete(np.asarray(model.mix.bias.value), 1, axis=0))
    want = np.asarray(masked(x))
    np.testing.assert_allclose(np.asarray(small(x)), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(small, x)), want, rtol=1e-5, atol=1e-5)
