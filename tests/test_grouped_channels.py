"""Depthwise and grouped convs in the channel-dependency analysis (issue #15): a removed depthwise
channel takes its producer filter and its consumer column; filter methods prune such blocks as
groups and ``sp.shrink`` / ``spx.shrink`` return narrower convs (fewer groups) whose outputs equal
the masked model's."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import nnx

import sensprune as sp
import sensprune.nnx as spx
from sensprune import dependencies

FILTER_METHODS = ("pfp", "ft", "thinet", "softnet", "uniform_filters")
_X = np.random.default_rng(5).normal(size=(12, 6, 6, 3)).astype(np.float32)


class Separable(nn.Module):
    """stem -> depthwise (channel multiplier 2) -> pointwise -> grouped (G=3) -> head."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(6, (3, 3), name="stem")(x))
        x = nn.relu(nn.Conv(12, (3, 3), feature_group_count=6, name="dw")(x))
        x = nn.relu(nn.Conv(9, (1, 1), name="point")(x))
        x = nn.relu(nn.Conv(6, (3, 3), feature_group_count=3, name="grouped")(x))
        return nn.Dense(4, name="head")(x.mean((1, 2)))


def _params_size(tree) -> int:
    return sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(tree))


def test_groups_join_producer_depthwise_slice_and_consumer():
    model = Separable()
    variables = model.init(jax.random.PRNGKey(0), _X[:1])
    deps = dependencies.analyze(model, variables, _X[:1])
    assert [layer.name for layer in deps.layers] == ["stem", "point", "head"]  # grouped convs: traced through
    for c in range(6):  # stem filter c feeds dw group c = dw outputs (2c, 2c + 1) = point columns (2c, 2c + 1)
        g = deps.groups[deps.out_group["stem"][c]]
        assert g.removable, g.reason
        assert g.producers["stem"].tolist() == [c] and g.consumers["point"].tolist() == [2 * c, 2 * c + 1]
        assert g.variables[("params", "dw", "kernel")].tolist() == [2 * c, 2 * c + 1]
        assert g.variables[("params", "dw", "bias")].tolist() == [2 * c, 2 * c + 1]
    for k in range(3):  # grouped conv: 3 input channels of group k together with its 2 filters
        g = deps.groups[deps.out_group["point"][3 * k]]
        assert g.producers["point"].tolist() == [3 * k, 3 * k + 1, 3 * k + 2]
        assert g.consumers["head"].tolist() == [2 * k, 2 * k + 1] and g.removable


@pytest.mark.parametrize("method", FILTER_METHODS)
def test_filter_methods_prune_and_shrink_separable_blocks(method):
    model = Separable()
    variables = model.init(jax.random.PRNGKey(0), _X[:1])
    result = sp.prune(model, variables, _X, method=method, keep_ratio=0.5, key=jax.random.PRNGKey(1))
    assert {"dw", "grouped"} <= set(result.info["dense_layers"])  # not scored by filter methods themselves
    deps = dependencies.analyze(model, variables, _X[:1])
    shrunk = sp.shrink(model, variables, result.params, x=_X)
    small = shrunk.variables["params"]
    kept_stem = small["stem"]["kernel"].shape[-1]
    assert kept_stem < 6 or small["point"]["kernel"].shape[-1] < 9  # something went
    assert small["dw"]["kernel"].shape == (3, 3, 1, 2 * kept_stem)
    assert small["point"]["kernel"].shape[-2] == 2 * kept_stem
    assert small["grouped"]["kernel"].shape[-1] * 3 // 2 == small["point"]["kernel"].shape[-1]
    assert sp.predict_param_count(deps, variables["params"], result.params) == _params_size(small)
    # the masked model already lost the removed groups' depthwise slices and biases: shrink drops only zeros
    assert sp.count_nonzero(small) == sp.count_nonzero(result.params)
    want = np.asarray(model.apply({"params": result.params}, _X))
    got = np.asarray(shrunk.model.apply(shrunk.variables, _X))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


class NNXSeparable(nnx.Module):
    def __init__(self, rngs):
        self.stem = nnx.Conv(3, 6, (3, 3), rngs=rngs)
        self.dw = nnx.Conv(6, 6, (3, 3), feature_group_count=6, rngs=rngs)
        self.point = nnx.Conv(6, 8, (1, 1), rngs=rngs)
        self.head = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.dw(nnx.relu(self.stem(x))))
        return self.head(nnx.relu(self.point(x)).mean((1, 2)))


@pytest.mark.parametrize("method", ["pfp", "ft"])
def test_nnx_depthwise_shrinks_with_fewer_groups(method):
    model = NNXSeparable(nnx.Rngs(0))
    result = spx.prune(model, _X, method=method, keep_ratio=0.5, key=jax.random.PRNGKey(1))
    small = spx.shrink(model, result, _X)
    kept = small.stem.kernel.get_value().shape[-1]
    assert kept < 6 and small.dw.kernel.get_value().shape == (3, 3, 1, kept)
    assert small.dw.feature_group_count == small.dw.in_features == small.dw.out_features == kept
    assert small.point.kernel.get_value().shape[-2] == kept and model.dw.feature_group_count == 6
    masked = nnx.clone(model)
    nnx.update(masked, result.params)
    want, got = np.asarray(masked(_X)), np.asarray(small(_X))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
