"""The model adapter: the one place that runs a user's model (Linen and nnx)."""

import jax
import numpy as np
import pytest
from flax import nnx

import sensprune as sp
import sensprune.nnx as spx
from sensprune.adapter import LinenAdapter, as_adapter, trace_with_markers
from sensprune.nnx_adapter import NNXAdapter
from tests.fixtures import CNN, MLP, np_init


def _points(n=8, shape=(8, 8, 1), seed=0):
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def test_linen_adapter_is_hashable_and_keyed_by_how_the_model_is_called():
    model = CNN()
    a = as_adapter(model, None, {"train": False, "mutable": ["batch_stats"]})
    b = as_adapter(model, None, {"mutable": ["batch_stats"], "train": False})
    assert isinstance(a, LinenAdapter) and isinstance(a, sp.ModelAdapter)
    assert a == b and hash(a) == hash(b)  # one jit cache entry per (model, method, kwargs)
    assert a != as_adapter(model, None, {"train": True})
    assert as_adapter(a) is a
    with pytest.raises(ValueError, match="already says how to call"):
        as_adapter(a, None, {"train": False})
    with pytest.raises(ValueError, match="flax.linen.Module or a sensprune model adapter"):
        as_adapter(object())


def test_linen_adapter_apply_intercept_and_capture():
    model, x = CNN(), _points()
    variables = np_init(model, x[:1])
    adapter = as_adapter(model, None, {"train": False})
    want = model.apply(variables, x, train=False)
    np.testing.assert_allclose(adapter.apply(variables, x), want, rtol=1e-6)
    # mutable collections are returned by model.apply but not by the adapter
    stateful = as_adapter(model, None, {"train": True, "mutable": ["batch_stats"]})
    out, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(stateful.apply(variables, x), out, rtol=1e-6)
    seen = []

    def interceptor(next_fun, args, kwargs, call):
        seen.append(call.path)
        return next_fun(*args, **kwargs)

    np.testing.assert_allclose(adapter.intercept(variables, x, interceptor), want, rtol=1e-6)
    layers = adapter.find_layers(variables, x[:1])
    assert seen == [layer.path for layer in layers]
    captured = jax.jit(adapter.capture_inputs, static_argnums=2)(variables, x, tuple(layers[1:]))
    assert sorted(captured) == sorted(layer.name for layer in layers[1:])
    assert captured[layers[-1].name].shape == (x.shape[0], *layers[-1].input_shape)


def test_trace_with_markers_replaces_layer_outputs():
    model, x = MLP(widths=(6,), classes=3), _points(2, (5,))
    variables = np_init(model, x[:1])
    adapter = as_adapter(model)
    layers = adapter.find_layers(variables, x[:1])
    closed, shapes, markers = trace_with_markers(adapter, variables, x, layers)
    assert set(markers) == {layer.name for layer in layers}
    outputs, inputs = shapes
    assert outputs.shape == (2, 3) and inputs["Dense_1"].shape == (2, 6)
    # The model output is the last layer's marker: evaluating the jaxpr returns it.
    flat = jax.tree_util.tree_leaves((variables, x, {n: np.full(m.shape, 7.0, np.float32) for n, m in markers.items()}))
    out = jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *flat)
    np.testing.assert_array_equal(np.asarray(out[0]), np.full((2, 3), 7.0))


class _Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.a = nnx.Linear(5, 8, rngs=rngs)
        self.b = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.b(nnx.relu(self.a(x)))


def test_nnx_adapter_runs_the_library_like_a_linen_model():
    model, x = _Net(nnx.Rngs(0)), _points(32, (5,))
    adapter, variables = spx.adapter(model)
    assert isinstance(adapter, NNXAdapter) and isinstance(adapter, sp.ModelAdapter)
    assert hash(adapter) == hash(spx.adapter(model)[0])
    np.testing.assert_allclose(adapter.apply(variables, x), model(x), rtol=1e-6)
    assert [layer.name for layer in sp.find_layers(adapter, variables, x[:1])] == ["a", "b"]
    with pytest.raises(ValueError, match="already says how to call"):
        sp.find_layers(adapter, variables, x[:1], train=False)
    direct = sp.prune(adapter, variables, x, method="pfp", keep_ratio=0.5)
    wrapped = spx.prune(model, x, method="pfp", keep_ratio=0.5)
    assert direct.keep_ratio == wrapped.keep_ratio
    np.testing.assert_array_equal(direct.masks["a"]["kernel"], spx.params_dict(wrapped.masks)["a"]["kernel"])


def test_shrink_info_is_saved_and_load_shrunk_takes_no_names(tmp_path):
    model, x = MLP(widths=(6,), classes=3), _points(4, (5,))
    variables = np_init(model, x[:1])
    masks = sp.ones_like_masks(variables["params"])
    shrunk = sp.shrink(model, variables, masks, x=x, info={"recipe": "mlp", "width": 6})
    sp.save_shrunk(tmp_path / "m", shrunk)
    assert sp.read_shrunk_meta(tmp_path / "m")["info"] == {"recipe": "mlp", "width": 6}
    loaded = sp.load_shrunk(tmp_path / "m", lambda: MLP(widths=(6,), classes=3))
    np.testing.assert_allclose(loaded.apply(x), shrunk.apply(x), rtol=1e-6)
    with pytest.raises(ValueError, match="JSON"):
        sp.shrink(model, variables, masks, x=x, info={"bad": object()})
    with pytest.raises(ValueError, match="factory"):
        sp.load_shrunk(tmp_path / "m", "mlp")
