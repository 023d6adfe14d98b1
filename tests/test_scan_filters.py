"""Filter methods through ``nn.scan`` slices (issue #19): the channel groups of a scanned,
logically partitioned LM are those of its unrolled twin, slice by slice, and every filter
method prunes the scanned stack exactly as it prunes the unrolled blocks."""

import re

import flax.linen as nn
import jax
import numpy as np
import pytest

import sensprune as sp
from experiments.models.scanned_lm import ScannedLM, unroll_params
from sensprune import boxing, dependencies, layer_kinds

DEPTH = 2
SIZES = dict(vocab=16, dim=16, depth=DEPTH, heads=2, mlp_dim=32, max_len=8)


@pytest.fixture(scope="module")
def twins():
    model = ScannedLM(**SIZES)
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (12, 8), 0, 16))
    variables = model.init(jax.random.PRNGKey(0), tokens[:1])
    unrolled = ScannedLM(**SIZES, scan=False, remat=False)
    flat = {"params": unroll_params(variables["params"], DEPTH)}
    return model, variables, unrolled, flat, tokens


def _unrolled(name: str) -> str:
    """``blocks/mlp_in[1]`` -> ``blocks_1/mlp_in`` (also inside variable paths)."""
    m = re.fullmatch(r"blocks/(\w+)\[(\d+)\]", name)
    return f"blocks_{m.group(2)}/{m.group(1)}" if m else name


def _canonical(deps, rename):
    """Every group as comparable data, layer names mapped by ``rename``."""
    out = set()
    for g in deps.groups:
        out.add((
            tuple(sorted((rename(k), tuple(v.tolist())) for k, v in g.producers.items())),
            tuple(sorted((rename(k), tuple(v.tolist())) for k, v in g.consumers.items())),
            g.removable, g.reason,
        ))
    return out


def test_groups_of_scan_slices_equal_the_unrolled_ones(twins):
    model, variables, unrolled, flat, tokens = twins
    plain = boxing.unbox_variables(variables)
    layers = sp.find_layers(model, plain, tokens[:1])
    deps = dependencies.analyze(model, plain, tokens[:1], layers=layers)
    ref = dependencies.analyze(unrolled, flat, tokens[:1], layers=sp.find_layers(unrolled, flat, tokens[:1]))
    assert _canonical(deps, _unrolled) == _canonical(ref, lambda n: n)
    # the hidden units of each slice's MLP are removable groups of their own; heads too
    assert deps.removable[deps.out_group["blocks/mlp_in[1]"]].all()
    assert set(deps.out_group["blocks/mlp_in[0]"]).isdisjoint(deps.out_group["blocks/mlp_in[1]"])
    assert len(set(deps.out_group["blocks/query[0]"])) == SIZES["heads"]
    # the residual stream (carried across steps) is one group reaching the output, as unrolled
    residual = set(deps.out_group["blocks/mlp_out[0]"]) | set(deps.out_group["blocks/out[1]"])
    assert len(residual) == 1 and not deps.groups[residual.pop()].removable
    # stacked LayerNorm scales: one source per slice, the slice's own step only
    stream = deps.groups[int(deps.out_group["blocks/mlp_out[1]"][0])]
    assert ("params", "blocks", "ln_mlp", "scale", "[1]") in stream.variables


@pytest.mark.parametrize("method", ["pfp", "ft", "thinet"])
def test_scanned_filter_pruning_equals_unrolled(twins, method):
    model, variables, unrolled, flat, tokens = twins
    kw = dict(method=method, keep_ratio=0.6, key=jax.random.PRNGKey(0), labels=tokens)
    res = sp.prune(model, variables, tokens, **kw)
    ref = sp.prune(unrolled, flat, tokens, **kw)
    assert res.keep_ratio == pytest.approx(ref.keep_ratio, abs=1e-9)
    assert set(map(_unrolled, res.sensitivities)) == set(ref.sensitivities)
    for name, sens in res.sensitivities.items():
        for a, b in zip(jax.tree_util.tree_leaves(sens), jax.tree_util.tree_leaves(ref.sensitivities[_unrolled(name)])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    masks = boxing.unbox(res.masks)
    for name in ("query", "key", "value", "out", "mlp_in", "mlp_out"):
        boxed = res.masks["blocks"][name]["kernel"]
        assert isinstance(boxed, nn.LogicallyPartitioned) and boxed.names[0] == "layers"
        for i in range(DEPTH):  # same keep ratio -> the same masks, slice by slice
            np.testing.assert_array_equal(masks["blocks"][name]["kernel"][i], ref.masks[f"blocks_{i}"][name]["kernel"])
    # pruned hidden units: the whole column of mlp_in and row of mlp_out in the same slice
    cols = masks["blocks"]["mlp_in"]["kernel"].any(axis=1)
    rows = masks["blocks"]["mlp_out"]["kernel"].any(axis=2)
    np.testing.assert_array_equal(cols, rows)
    assert (~cols).any()
    np.testing.assert_allclose(model.apply({"params": res.params}, tokens),
                               unrolled.apply({"params": unroll_params(res.params, DEPTH)}, tokens), atol=1e-5)


def test_slice_of_a_nested_scan_is_refused_with_the_reason():
    class Inner(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return nn.relu(nn.Dense(4, name="mix")(x)), None

    class Outer(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            inner = nn.scan(Inner, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
            return inner(name="inner")(x, None)[0], None

    class Nested(nn.Module):
        @nn.compact
        def __call__(self, x):
            outer = nn.scan(Outer, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
            return nn.Dense(3, name="head")(outer(name="outer")(nn.Dense(4, name="stem")(x), None)[0])

    x = np.ones((4, 4), np.float32)
    variables = Nested().init(jax.random.PRNGKey(0), x)
    layers = sp.find_layers(Nested(), variables, x)
    nested = [layer for layer in layers if len(layer.index) > 1]
    assert [layer.index for layer in nested] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    kept, dense = layer_kinds.structured_layers(layers)
    assert {layer.name for layer in kept} == {"stem", "head"}
    assert all("a slice of a nested scan" in dense[layer.name] for layer in nested)
