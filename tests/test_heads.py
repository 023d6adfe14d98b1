"""Structured pruning of a transformer block: attention heads and MLP units as channel groups."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sensprune as sp
import sensprune.nnx as spx
from sensprune import dependencies as deps_lib
from sensprune import paths as sp_paths
from sensprune import propagation
from sensprune.context import PruneContext
from sensprune.methods import thinet
from sensprune.methods.thinet import greedy_removal_order
from sensprune.shrink import predict_param_count, removed_for

VOCAB, D, HEADS, HEAD_DIM, MLP, SEQ, CLASSES = 50, 32, 4, 8, 64, 8, 5
ATTN = "MultiHeadDotProductAttention_0"


class Block(nn.Module):
    """Embed + pre-norm attention and MLP with residuals + LayerNorm + mean-pooled classifier."""

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, D)(tokens)
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, deterministic=True)(h, h)
        h = nn.gelu(nn.Dense(MLP)(nn.LayerNorm()(x)))
        x = x + nn.Dense(D)(h)
        return nn.Dense(CLASSES)(nn.LayerNorm()(x).mean(axis=1))


@pytest.fixture(scope="module")
def deps(setup):
    model, variables, tokens = setup
    return sp.analyze_dependencies(model, variables, tokens[:1])


@pytest.fixture(scope="module")
def setup():
    model = Block()
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (32, SEQ), 0, VOCAB))
    variables = model.init(jax.random.PRNGKey(0), tokens[:1])
    rng = np.random.default_rng(0)  # nonzero biases and norm params, so that they matter
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: a + 0.1 * rng.standard_normal(a.shape).astype(np.float32) if path[-1].key in ("bias", "scale")
        else a,
        variables["params"],
    )
    return model, {"params": params}, tokens


def _head_units(h):
    return np.arange(HEADS * HEAD_DIM).reshape(HEADS, HEAD_DIM)[h]


def _attn_masks(params, zero):
    """Bool masks with every entry kept except ``zero``: ``{(proj, head)}`` (q/k/v columns, out rows)."""
    masks = jax.tree_util.tree_map(lambda a: np.ones(np.shape(a), bool), params)
    for proj, h in zero:
        kernel = masks[ATTN][proj]["kernel"]
        if proj == "out":
            kernel[h] = False
        else:
            kernel[:, h, :] = False
    return masks


def _masked(params, masks):
    return jax.tree_util.tree_map(lambda a, m: a * m, params, masks)


def _apply(model, variables, params, tokens):
    with jax.default_matmul_precision("highest"):
        return np.asarray(model.apply({**variables, "params": params}, tokens), np.float64)


def _size(tree):
    return sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(tree))


def _expected_size(heads, units):
    """Parameters of the block with ``heads`` heads and ``units`` MLP units, counted by hand."""
    embed, norms = VOCAB * D, 3 * 2 * D
    attn = 3 * (D * heads * HEAD_DIM + heads * HEAD_DIM) + heads * HEAD_DIM * D + D
    mlp = D * units + units + units * D + D
    return embed + norms + attn + mlp + D * CLASSES + CLASSES


def test_heads_and_mlp_units_are_groups(setup, deps):
    model, variables, tokens = setup
    heads = [g for g in deps.groups if f"{ATTN}/out" in g.consumers]
    # One group per head: the output projection reads nothing else.
    assert len(heads) == HEADS
    for g in heads:
        assert g.removable and set(g.producers) == {f"{ATTN}/{p}" for p in ("query", "key", "value")}
        h = int(g.consumers[f"{ATTN}/out"][0]) // HEAD_DIM
        np.testing.assert_array_equal(g.consumers[f"{ATTN}/out"], _head_units(h))
        for units in g.producers.values():
            np.testing.assert_array_equal(units, _head_units(h))
    mlp = [g for g in deps.groups if "Dense_0" in g.producers]
    assert len(mlp) == MLP and all(g.removable for g in mlp)
    assert all(dict(g.consumers) .keys() == {"Dense_1"} and len(g.consumers["Dense_1"]) == 1 for g in mlp)
    # The residual stream (embedding, norms, projections' inputs) is one group, never removable.
    stream = deps.groups[int(deps.in_group[f"{ATTN}/query"][0])]
    assert not stream.removable and f"{ATTN}/out" in stream.producers and "Dense_1" in stream.producers


def test_query_key_alone_do_not_remove_a_head(setup, deps):
    model, variables, tokens = setup
    params = variables["params"]
    qk = _attn_masks(params, {("query", 1), ("key", 1)})
    assert not removed_for(deps, qk).any()
    # Zeroing q/k of a head makes its softmax uniform: the head still contributes.
    gone = _attn_masks(params, {("query", 1), ("key", 1), ("value", 1), ("out", 1)})
    assert removed_for(deps, gone).sum() == 1
    out_qk = _apply(model, variables, _masked(params, qk), tokens)
    out_gone = _apply(model, variables, _masked(params, gone), tokens)
    assert np.max(np.abs(out_qk - out_gone)) > 1e-3
    shrunk = sp.shrink(model, variables, qk, deps=deps)
    assert shrunk.params[ATTN]["query"]["kernel"].shape == (D, HEADS, HEAD_DIM)
    np.testing.assert_allclose(np.asarray(shrunk.apply(tokens), np.float64), out_qk, rtol=0, atol=1e-5)


def test_value_and_out_slices_remove_a_head_exactly(setup, deps):
    model, variables, tokens = setup
    params = variables["params"]
    vo = _attn_masks(params, {("value", 2), ("out", 2)})
    everything = _attn_masks(params, {("query", 2), ("key", 2), ("value", 2), ("out", 2)})
    want = _apply(model, variables, _masked(params, vo), tokens)
    np.testing.assert_allclose(_apply(model, variables, _masked(params, everything), tokens), want, atol=1e-6)
    shrunk = sp.shrink(model, variables, vo, deps=deps)
    attn = shrunk.params[ATTN]
    assert attn["query"]["kernel"].shape == (D, HEADS - 1, HEAD_DIM) and attn["out"]["kernel"].shape == (
        HEADS - 1, HEAD_DIM, D)
    np.testing.assert_array_equal(np.asarray(attn["value"]["kernel"]),
                                  np.delete(np.asarray(params[ATTN]["value"]["kernel"]), 2, axis=1))
    np.testing.assert_allclose(np.asarray(shrunk.apply(tokens), np.float64), want, rtol=0, atol=1e-5)
    assert _size(shrunk.params) == _expected_size(HEADS - 1, MLP)


def _heads_alive(masks):
    return [bool(np.asarray(masks[ATTN]["out"]["kernel"])[h].any()) for h in range(HEADS)]


def _check_removed_heads_zero(params, masks):
    for h, alive in enumerate(_heads_alive(masks)):
        if not alive:
            for proj in ("query", "key", "value"):
                assert not np.any(np.asarray(params[ATTN][proj]["kernel"])[:, h, :]), (proj, h)
            assert not np.any(np.asarray(params[ATTN]["out"]["kernel"])[h])


def test_pfp_three_ratios_shrink_save_load(setup, deps, tmp_path):
    model, variables, tokens = setup
    fewer_heads = False
    for ratio in (0.45, 0.6, 0.8):
        result = sp.prune(model, variables, tokens, method="pfp", keep_ratio=ratio)
        _check_removed_heads_zero(result.params, result.masks)
        heads = sum(_heads_alive(result.masks))
        units = int(np.asarray(result.masks["Dense_0"]["kernel"]).any(axis=0).sum())
        fewer_heads |= heads < HEADS
        shrunk = sp.shrink(model, variables, result.masks, deps=deps)
        size = _size(shrunk.params)
        assert size == predict_param_count(deps, variables["params"], result.masks) == _expected_size(heads, units)
        assert shrunk.params[ATTN]["key"]["kernel"].shape == (D, heads, HEAD_DIM)
        assert shrunk.params["Dense_0"]["kernel"].shape == (D, units) and units < MLP
        want = _apply(model, variables, result.params, tokens)
        np.testing.assert_allclose(np.asarray(shrunk.apply(tokens), np.float64), want, rtol=0, atol=1e-5)
        if ratio == 0.45:
            sp.save_shrunk(tmp_path / "block", shrunk)
            loaded = sp.load_shrunk(tmp_path / "block", model=Block)
            np.testing.assert_allclose(np.asarray(loaded.apply(tokens), np.float64), want, rtol=0, atol=1e-5)
    assert fewer_heads


@pytest.mark.parametrize("zero_dead", [False, True])
def test_removed_heads_biases_are_not_kept(setup, deps, zero_dead):
    """A removed head / MLP unit takes its producers' biases along in the masked model (zero, masked,
    not counted), with or without data-dependent zeroing: the kept count is the shrunk model's size."""
    model, variables, tokens = setup
    params = variables["params"]
    result = sp.prune(model, variables, tokens, method="pfp", keep_ratio=0.45, zero_dead=zero_dead,
                      allow_dead_layers=True)
    alive = _heads_alive(result.masks)
    assert not all(alive)
    for h in np.flatnonzero(~np.asarray(alive)):
        for proj in ("query", "key", "value"):
            assert not np.any(np.asarray(result.params[ATTN][proj]["bias"])[h])
            assert not np.any(np.asarray(result.masks[ATTN][proj]["bias"])[h])
    units = np.asarray(result.masks["Dense_0"]["kernel"]).any(axis=0)
    np.testing.assert_array_equal(np.asarray(result.params["Dense_0"]["bias"]) != 0, units)
    kept = round(result.keep_ratio * _size(params))
    assert kept == sp.count_nonzero(result.params)
    shrunk = sp.shrink(model, variables, result.masks, deps=deps)
    assert _size(shrunk.params) == kept == predict_param_count(deps, params, result.masks)
    if not zero_dead:  # zeroing (the default) finds these biases from their zero gradient first
        assert result.info["group_leftovers"] > 0


FILTER_METHODS = [m for m in sp.available_methods() if sp.get_method(m).structured]


@pytest.mark.parametrize("method", FILTER_METHODS)
def test_every_filter_method_prunes_heads(setup, deps, method):
    model, variables, tokens = setup
    ratio = 0.55
    result = sp.prune(model, variables, tokens, method=method, keep_ratio=ratio, key=jax.random.PRNGKey(3),
                      allow_dead_layers=True)
    assert result.info["dense_layers"] == {}
    if result.info.get("reachable", True):
        assert abs(result.keep_ratio - ratio) <= 0.005 * ratio, (method, result.keep_ratio)
    else:  # the closest size is within one head of the target
        head = 3 * (D * HEAD_DIM + HEAD_DIM) + HEAD_DIM * D
        assert abs(result.keep_ratio - ratio) <= head / _size(variables["params"]), (method, result.keep_ratio)
    _check_removed_heads_zero(result.params, result.masks)
    shrunk = sp.shrink(model, variables, result.params, deps=deps)
    assert _size(shrunk.params) == round(result.keep_ratio * _size(variables["params"]))  # kept = shrunk size
    want = _apply(model, variables, result.params, tokens)
    np.testing.assert_allclose(np.asarray(shrunk.apply(tokens), np.float64), want, rtol=0, atol=1e-5)
    heads = sum(_heads_alive(result.masks))
    assert shrunk.params[ATTN]["query"]["kernel"].shape[1] == heads


class Split(nn.Module):
    """A DenseGeneral whose ``(4, 8)`` units are flattened and read one by one: one group per unit."""

    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral(features=(4, 8))(x)
        h = nn.gelu(h.reshape(h.shape[:-2] + (-1,)))
        return nn.Dense(3)(h)


def test_multi_axis_kernel_shrinks_by_whole_slices_only():
    model = Split()
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (6, 5, 16)))
    variables = model.init(jax.random.PRNGKey(1), x[:1])
    deps = sp.analyze_dependencies(model, variables, x[:1])
    units = [g for g in deps.groups if "DenseGeneral_0" in g.producers]  # one group per unit
    assert len(units) == 32 and all(g.removable and len(g.producers["DenseGeneral_0"]) == 1 for g in units)
    masks = jax.tree_util.tree_map(lambda a: np.ones(np.shape(a), bool), variables["params"])
    masks["Dense_0"]["kernel"][[0, 1, 2]] = False  # units (0, 0..2): not a whole slice of axis 0 or 1
    assert deps_lib.removed_groups(deps, {n: paths_kernel(masks, deps, n) for n in deps.in_group}).sum() == 3
    assert not removed_for(deps, masks).any()  # restored: they would cut the kernel into a non-box shape
    shrunk = sp.shrink(model, variables, masks, x=x)
    assert shrunk.params["DenseGeneral_0"]["kernel"].shape == (16, 4, 8)
    masks["Dense_0"]["kernel"][8:16] = False  # every unit (1, :): a whole slice of the first axis
    masks["Dense_0"]["kernel"][[0, 1, 2]] = True
    shrunk = sp.shrink(model, variables, masks, x=x)
    assert shrunk.params["DenseGeneral_0"]["kernel"].shape == (16, 3, 8)
    assert shrunk.params["DenseGeneral_0"]["bias"].shape == (3, 8)
    want = model.apply({"params": _masked(variables["params"], masks)}, x)
    np.testing.assert_allclose(np.asarray(shrunk.apply(x)), np.asarray(want), rtol=0, atol=1e-5)


def paths_kernel(masks, deps, name):
    (layer,) = [layer for layer in deps.layers if layer.name == name]
    return np.asarray(sp_paths.get_kernel(masks, layer))


def test_in_mode_units_are_whole_heads(setup):
    """PFP and ThiNet choose the output projection's inputs by head (one unit per removable group)."""
    model, variables, tokens = setup
    layers = sp.find_layers(model, variables, tokens[:1])
    ctx = PruneContext(model=model, variables=variables, layers=layers, data=tokens)
    by_name = {layer.name: layer for layer in layers}
    np.testing.assert_array_equal(propagation.channel_units(ctx, by_name[f"{ATTN}/out"]),
                                  np.repeat(np.arange(HEADS), HEAD_DIM))
    for name in (f"{ATTN}/query", "Dense_1"):  # the stream (not removable) and plain layers: per channel
        np.testing.assert_array_equal(propagation.channel_units(ctx, by_name[name]),
                                      np.arange(by_name[name].in_channels))
    for ratio in (0.45, 0.7):
        kept = sp.prune(model, variables, tokens, method="pfp", keep_ratio=ratio).info["kept_channels"]
        per_head = np.asarray(kept[f"{ATTN}/out"]).reshape(HEADS, HEAD_DIM)
        assert np.all(per_head.all(axis=1) | ~per_head.any(axis=1)), per_head


def test_thinet_unit_order_is_the_greedy_order_of_summed_units():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 12))
    units = np.repeat(np.arange(4), 3)
    live = np.ones(12, bool)
    live[4] = False
    summed = np.stack([x[:, units == u][:, live[units == u]].sum(axis=1) for u in range(4)], axis=1)
    want = np.concatenate([np.flatnonzero((units == u) & live) for u in greedy_removal_order(summed)])
    np.testing.assert_array_equal(thinet._unit_order(x, live, units), want)
    np.testing.assert_array_equal(thinet._unit_order(x, live, np.arange(12)), greedy_removal_order(x, live))


class NNXBlock(nnx.Module):
    """The nnx twin of :class:`Block`."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.ln1, self.ln2, self.ln3 = (nnx.LayerNorm(D, rngs=rngs) for _ in range(3))
        self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=D, decode=False, rngs=rngs)
        self.fc1, self.fc2 = nnx.Linear(D, MLP, rngs=rngs), nnx.Linear(MLP, D, rngs=rngs)
        self.head = nnx.Linear(D, CLASSES, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        h = self.ln1(x)
        x = x + self.attn(h, h, h)
        x = x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))
        return self.head(self.ln3(x).mean(axis=1))


def test_nnx_block_loses_whole_heads(setup):
    tokens = setup[2]
    model = NNXBlock(nnx.Rngs(0))
    result = spx.prune(model, tokens, method="pfp", keep_ratio=0.45)
    masks = spx.params_dict(result.masks)["attn"]
    heads = [bool(np.asarray(masks["out"]["kernel"])[h].any()) for h in range(HEADS)]
    assert sum(heads) < HEADS and result.info["dense_layers"] == {}
    small = spx.shrink(model, result, tokens)
    assert small.attn.num_heads == sum(heads) and small.attn.query.kernel.get_value().shape == (D, sum(heads), HEAD_DIM)
    masked = nnx.clone(model)
    spx.apply_result(masked, result)
    with jax.default_matmul_precision("highest"):
        want, got = np.asarray(masked(tokens)), np.asarray(small(tokens))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


class HandAttention(nn.Module):
    """Causal attention written by hand (einsums, a mask, jax.nn.softmax): heads come from the jaxpr."""

    @nn.compact
    def __call__(self, x):
        q, k, v = (nn.DenseGeneral((HEADS, HEAD_DIM), name=n)(x) for n in ("wq", "wk", "wv"))
        scores = jnp.einsum("blhd,bmhd->bhlm", q, k) / np.sqrt(HEAD_DIM)
        causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
        attn = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
        y = jnp.einsum("bhlm,bmhd->blhd", attn, v)
        y = nn.DenseGeneral(D, axis=(-2, -1), name="wo")(y)
        return nn.Dense(CLASSES)(nn.relu(nn.Dense(MLP)(y)).mean(axis=1))


def test_hand_written_attention_heads_are_groups():
    model = HandAttention()
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (4, SEQ, D)))
    variables = model.init(jax.random.PRNGKey(1), x[:1])
    deps = sp.analyze_dependencies(model, variables, x[:1])
    heads = [g for g in deps.groups if "wo" in g.consumers]
    assert len(heads) == HEADS and all(g.removable and set(g.producers) == {"wq", "wk", "wv"} for g in heads)
    for g in heads:
        h = int(g.consumers["wo"][0]) // HEAD_DIM
        assert all(np.array_equal(u, _head_units(h)) for u in [*g.producers.values(), g.consumers["wo"]])
    masks = _attn_masks_for(variables["params"], ("wv", "wo"), 3)
    shrunk = sp.shrink(model, variables, masks, x=x, deps=deps)
    assert shrunk.params["wq"]["kernel"].shape == (D, HEADS - 1, HEAD_DIM)
    want = model.apply({"params": _masked(variables["params"], masks)}, x)
    np.testing.assert_allclose(np.asarray(shrunk.apply(x)), np.asarray(want), rtol=0, atol=1e-5)


def _attn_masks_for(params, names, h):
    masks = jax.tree_util.tree_map(lambda a: np.ones(np.shape(a), bool), params)
    masks[names[0]]["kernel"][:, h, :] = False
    masks[names[1]]["kernel"][h] = False
    return masks


def test_ft_round_to_keeps_whole_heads(setup, deps):
    """``round_to`` counts a head's units: widths stay multiples of 8 and heads stay whole."""
    model, variables, tokens = setup
    result = sp.prune(model, variables, tokens, method="ft", keep_ratio=0.5,
                      method_options={"round_to": HEAD_DIM, "joint": "mean"})
    shrunk = sp.shrink(model, variables, result.masks, deps=deps, round_to=HEAD_DIM)
    assert all(out % HEAD_DIM == 0 for name, (_, out) in shrunk.widths.items() if name != "Dense_2")
    heads = sum(_heads_alive(result.masks))
    assert shrunk.params[ATTN]["value"]["kernel"].shape == (D, heads, HEAD_DIM) and heads < HEADS
    want = _apply(model, variables, result.params, tokens)
    np.testing.assert_allclose(np.asarray(shrunk.apply(tokens), np.float64), want, rtol=0, atol=1e-5)
