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
from sensprune.shrink import predict_param_count

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
    assert res.info["reachable"] and res.keep_ratio == pytest.approx(0.6, rel=0.005)  # thinet: 0.5514 before
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
    keep_all = jax.tree_util.tree_map(lambda a: np.ones(np.shape(a), bool), variables["params"])
    shrunk = sp.shrink(Nested(), variables, keep_all, x=x)
    assert "nested scan" in shrunk.meta["unshrunk"]["outer/inner/mix"]


def _narrowed(masks):
    """pfp's masks with slice 1 losing 5 more hidden units, and each slice a different head."""
    m = jax.tree_util.tree_map(np.array, boxing.unbox(masks))
    blocks = m["blocks"]
    gone = np.flatnonzero(blocks["mlp_in"]["kernel"][1].any(axis=0))[:5]
    blocks["mlp_in"]["kernel"][1][:, gone] = False
    blocks["mlp_out"]["kernel"][1][gone] = False
    for i, head in enumerate((1, 0)):
        for name in ("query", "key", "value"):
            blocks[name]["kernel"][i][:, head] = False
        blocks["out"]["kernel"][i][head] = False
    return m


def test_shrink_of_scan_stacks_keeps_one_shape_and_the_outputs(twins):
    model, variables, _, _, tokens = twins
    res = sp.prune(model, variables, tokens, method="pfp", keep_ratio=0.8)
    masks = _narrowed(res.masks)
    shrunk = sp.shrink(model, variables, masks, x=tokens)
    small = boxing.unbox(shrunk.variables["params"])["blocks"]
    hidden = masks["blocks"]["mlp_in"]["kernel"].any(axis=1).sum(axis=1)  # kept hidden units per slice
    assert hidden[1] == hidden[0] - 5
    # every slice keeps as many hidden units as the widest one (the narrower padded with masked ones)
    assert small["mlp_in"]["kernel"].shape == (DEPTH, 16, hidden[0]) and hidden[0] < 32
    assert small["mlp_out"]["kernel"].shape == (DEPTH, hidden[0], 16)
    assert small["mlp_in"]["bias"].shape == (DEPTH, hidden[0])
    # one head per slice, a different one in each: each slice keeps its own head
    assert small["query"]["kernel"].shape == (DEPTH, 16, 1, 8)
    assert small["out"]["kernel"].shape == (DEPTH, 1, 8, 16)
    query = boxing.unbox(variables["params"])["blocks"]["query"]["kernel"]
    np.testing.assert_array_equal(small["query"]["kernel"][0], query[0][:, :1])
    np.testing.assert_array_equal(small["query"]["kernel"][1], query[1][:, 1:])
    assert "unshrunk" not in shrunk.meta
    for i in range(DEPTH):  # slice i keeps its own units: the kept columns of its own mask
        kept = shrunk.kept[f"blocks/mlp_in[{i}]"]["out"]
        assert set(np.flatnonzero(masks["blocks"]["mlp_in"]["kernel"][i].any(axis=0))) <= set(kept.tolist())
    masked = sp.apply_masks(boxing.unbox(variables["params"]), masks)
    np.testing.assert_allclose(shrunk.apply(tokens), model.apply({"params": masked}, tokens), atol=1e-5)
    assert isinstance(shrunk.variables["params"]["blocks"]["mlp_in"]["kernel"], nn.LogicallyPartitioned)
    deps = dependencies.analyze(model, boxing.unbox_variables(variables), tokens[:1])
    count = predict_param_count(deps, boxing.unbox(variables["params"]), masks)
    assert count == sp.counting.count_params(boxing.unbox(shrunk.variables["params"]))


def test_nnx_scan_stack_is_reported_dense_with_the_way_forward():
    from flax import nnx

    import sensprune.nnx as spn

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.mlp_in = nnx.Linear(8, 16, rngs=rngs)
            self.mlp_out = nnx.Linear(16, 8, rngs=rngs)

        def __call__(self, x):
            return x + self.mlp_out(nnx.relu(self.mlp_in(x)))

    class Stacked(nnx.Module):
        def __init__(self, rngs):
            self.stem = nnx.Linear(4, 8, rngs=rngs)

            @nnx.split_rngs(splits=3)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return Block(rngs)

            self.blocks = make(rngs)
            self.head = nnx.Linear(8, 2, rngs=rngs)

        def __call__(self, x):
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def step(x, block):
                return block(x)

            return self.head(step(self.stem(x), self.blocks))

    model = Stacked(nnx.Rngs(0))
    x = np.ones((5, 4), np.float32)
    res = spn.prune(model, x, method="wt", keep_ratio=0.9)
    dense = res.info["dense_layers"]
    assert set(dense) >= {"blocks/mlp_in", "blocks/mlp_out"}
    assert "nnx.scan" in dense["blocks/mlp_in"] and "Linen nn.scan" in dense["blocks/mlp_in"]
    assert set(res.layer_kept) == {"stem", "head"}


class _MLPBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(4, name="down")(nn.relu(nn.Dense(6, name="up")(x))), None


class _ScanThenRNN(nn.Module):
    """Scanned MLP blocks, then a recurrent layer (a scan with no slices: stepped to its fixed point)."""

    scan: bool = True

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4, name="stem")(x)
        if self.scan:
            stack = nn.scan(_MLPBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            x, _ = stack(name="blocks")(x, None)
        else:
            for i in range(3):
                x, _ = _MLPBlock(name=f"blocks_{i}")(x, None)
        h = nn.RNN(nn.SimpleCell(5), name="rnn")(x)
        return nn.Dense(2, name="head")(nn.Dense(7, name="mid")(h[:, -1]))


def test_scan_slices_next_to_a_recurrent_scan():
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (2, 9, 3)))
    variables = _ScanThenRNN().init(jax.random.PRNGKey(0), x)
    flat = {"params": {k: v for k, v in variables["params"].items() if k != "blocks"}}
    for i in range(3):
        flat["params"][f"blocks_{i}"] = jax.tree_util.tree_map(lambda a, i=i: a[i], variables["params"]["blocks"])
    deps = dependencies.analyze(_ScanThenRNN(), variables, x[:1])
    ref = dependencies.analyze(_ScanThenRNN(scan=False), flat, x[:1])
    assert {layer.name for layer in deps.layers} >= {"blocks/up[2]", "mid"}
    assert _canonical(deps, _unrolled) == _canonical(ref, lambda n: n)
    assert deps.removable[deps.out_group["blocks/up[1]"]].all() and deps.removable[deps.out_group["mid"]].all()
