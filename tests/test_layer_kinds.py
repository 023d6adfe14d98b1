"""Every linear layer kind (issue #15): attention projections (DenseGeneral / LinearGeneral),
Einsum, grouped and depthwise convs, shared layers, tied embeddings (Embed.attend), ConvTranspose;
include/exclude; every registered method on such models; sensitivities against slow NumPy loops."""

from __future__ import annotations

import itertools
import re

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import nnx

import sensprune as sp
import sensprune.nnx as spx
from sensprune import layer_kinds, paths, registry

EPS = float(np.finfo(np.float32).eps)
RTOL = 1e-5


# --------------------------------------------------------------------------- NumPy loop references


def _ratio(w: float, a: float, zp: float, zn: float) -> float:
    """``g`` of one weight at one position: its share of the same-sign pre-activation."""
    if w == 0:
        return 0.0
    z = zp if w > 0 else zn
    return 0.0 if abs(z) <= EPS else w * a / z


def _reduce(values: list[float], reduction: str) -> float:
    return float(np.mean(values)) if reduction == "mean" else float(np.max(values))


def _pseudo_points(x: np.ndarray) -> list[np.ndarray]:
    """A point with negative entries -> its positive and negative parts (both >= 0)."""
    x = np.asarray(x, np.float64)
    return [np.maximum(x, 0), np.maximum(-x, 0)] if (x < 0).any() else [x]


def ref_general(kernel: np.ndarray, inputs: np.ndarray, n_in: int, reduction: str = "max") -> np.ndarray:
    """Loops over the kernel's own axes: kernel ``(*in, *out)``, inputs ``[B, *pos, *in]``."""
    kernel = np.asarray(kernel, np.float64)
    in_shape, out_shape = kernel.shape[:n_in], kernel.shape[n_in:]
    out = np.zeros(kernel.shape)
    for x in inputs:
        positions = x.reshape((-1,) + in_shape)
        for a_all in _pseudo_points(positions):
            for o in np.ndindex(*out_shape):
                w_o = kernel[(Ellipsis,) + o]  # [*in]
                zp = [float((np.maximum(w_o, 0) * a).sum()) for a in a_all]
                zn = [float((np.minimum(w_o, 0) * a).sum()) for a in a_all]
                for i in np.ndindex(*in_shape):
                    g = [_ratio(w_o[i], a[i], zp[p], zn[p]) for p, a in enumerate(a_all)]
                    out[i + o] = max(out[i + o], _reduce(g, reduction))
    return out


def ref_grouped_conv(kernel: np.ndarray, inputs: np.ndarray, groups: int, reduction: str) -> np.ndarray:
    """3x3 'SAME' stride-1 grouped conv, output filter ``o`` reading channels of group ``o // (O/G)``."""
    kernel = np.asarray(kernel, np.float64)
    kh, kw, c_g, out = kernel.shape
    o_g = out // groups
    result = np.zeros(kernel.shape)
    for x in inputs:
        h, w, _ = x.shape
        for xs in _pseudo_points(x):
            padded = np.pad(xs, ((kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
            for o in range(out):
                g = o // o_g
                wk = kernel[..., o]
                per = np.zeros((h * w, kh, kw, c_g))
                for p, (y, xx) in enumerate(itertools.product(range(h), range(w))):
                    a = padded[y : y + kh, xx : xx + kw, g * c_g : (g + 1) * c_g]
                    zp, zn = float((np.maximum(wk, 0) * a).sum()), float((np.minimum(wk, 0) * a).sum())
                    for idx in np.ndindex(kh, kw, c_g):
                        per[(p,) + idx] = _ratio(wk[idx], a[idx], zp, zn)
                red = per.mean(0) if reduction == "mean" else per.max(0)
                result[..., o] = np.maximum(result[..., o], red)
    return result


def _close(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * max(1e-30, float(np.abs(want).max())))


# --------------------------------------------------------------------------- models


class Block(nn.Module):
    """Embed + self-attention + MLP + LayerNorm + residuals, mean-pooled head."""

    @nn.compact
    def __call__(self, tok):
        x = nn.Embed(24, 16)(tok)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16, name="attn")(nn.LayerNorm()(x))
        h = nn.Dense(32)(nn.LayerNorm()(x))
        x = x + nn.Dense(16)(nn.relu(h))
        return nn.Dense(5, name="head")(x.mean(1))


class DepthwiseSeparable(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.relu(nn.Conv(8, (3, 3), feature_group_count=8, name="depthwise")(x))
        x = nn.relu(nn.Conv(12, (1, 1))(x))
        x = nn.relu(nn.Conv(12, (3, 3), feature_group_count=4, name="grouped")(x))
        return nn.Dense(5)(x.mean((1, 2)))


class Tied(nn.Module):
    """Input and output embeddings tied: ``Embed.attend`` is the output projection."""

    @nn.compact
    def __call__(self, tok):
        emb = nn.Embed(40, 16)
        x = nn.relu(nn.Dense(16)(emb(tok)))
        return emb.attend(x).mean(1)


class Decoder(nn.Module):
    @nn.compact
    def __call__(self, z):
        x = nn.relu(nn.Dense(64)(z)).reshape(z.shape[0], 4, 4, 4)
        x = nn.relu(nn.ConvTranspose(6, (3, 3), strides=(2, 2))(x))
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.Conv(3, (3, 3))(x)
        return x.reshape(x.shape[0], -1)[:, :5]


class Shared(nn.Module):
    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(12, name="twice")
        h = nn.relu(dense(nn.relu(dense(nn.Dense(12)(x)))))
        return nn.Dense(5)(h)


class EinsumNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Einsum((6, 2, 5), "btd,dhk->bthk", name="mix")(x)
        h = nn.Einsum((5, 3), "bthk,kc->bthc", name="batched", use_bias=False)(nn.relu(h))
        return h.reshape(h.shape[0], -1)


_RNG = np.random.default_rng(0)
_TOKENS = _RNG.integers(0, 24, (16, 6))
_IMAGES = _RNG.normal(size=(16, 6, 6, 3)).astype(np.float32)
LINEN = {
    "attention": (Block(), _TOKENS),
    "depthwise": (DepthwiseSeparable(), _IMAGES),
    "tied": (Tied(), _RNG.integers(0, 40, (16, 5))),
    "convtranspose": (Decoder(), _RNG.normal(size=(16, 7)).astype(np.float32)),
}
LABELS = np.arange(16) % 5


def _setup(case):
    model, x = LINEN[case]
    return model, model.init(jax.random.PRNGKey(0), x), x


# --------------------------------------------------------------------------- every method runs


def _check_result(result, params, method, keep_ratio=0.6):
    spec = registry.get_method(method)
    flat_p = jax.tree_util.tree_leaves(params)
    flat_m = jax.tree_util.tree_leaves(result.masks)
    flat_r = jax.tree_util.tree_leaves(result.params)
    assert [np.shape(a) for a in flat_m] == [np.shape(a) for a in flat_p]  # masks in the params' own shapes
    for m, r in zip(flat_m, flat_r):
        assert np.all(np.asarray(r)[~np.asarray(m)] == 0)  # pruned entries exactly zero
    structured = spec.structured
    if result.info["reachable"]:
        assert abs(result.keep_ratio - keep_ratio) <= 0.005 * keep_ratio + 1e-9
    else:
        # filter methods and svd: granularity; sampling SiPP on these tiny nets: discrete samples
        # (the search's closest size, flagged reachable=False, within 1 %)
        sampled = spec.stochastic and abs(result.keep_ratio - keep_ratio) <= 0.01
        # the reference's zeroing (on by default) removed what is dead on S: below the target when more
        # than the rest of this random net is; sampled selections then move the size in coarser steps
        gap = abs(result.keep_ratio - keep_ratio)
        zeroed = sum(result.info["zero_dead"].values()) > 0 and (
            result.keep_ratio < keep_ratio or spec.stochastic and gap <= 0.02)
        assert structured or method == "svd" or sampled or zeroed, (method, result.keep_ratio)


@pytest.mark.parametrize("case", sorted(LINEN))
def test_every_method_runs(case):
    model, variables, x = _setup(case)
    for method in sp.available_methods():
        try:
            result = sp.prune(
                model, variables, x, method=method, keep_ratio=0.6, key=jax.random.PRNGKey(1), labels=LABELS
            )
        except ValueError as err:  # refused up front: the layers this method can prune are too small
            match = re.search(r"smallest reachable keep ratio is ([0-9.]+)", str(err))
            assert match and float(match.group(1)) > 0.6, (method, err)
            continue
        _check_result(result, variables["params"], method)
        assert isinstance(result.info["dense_layers"], dict)


def test_attention_projections_are_scored_and_pruned():
    model, variables, x = _setup("attention")
    names = [layer.name for layer in sp.find_layers(model, variables, x)]
    assert names[:4] == ["attn/query", "attn/key", "attn/value", "attn/out"]
    result = sp.prune(model, variables, x, method="sipp", keep_ratio=0.5)
    kernel = np.asarray(result.params["attn"]["query"]["kernel"])
    assert kernel.shape == (16, 2, 8) and result.masks["attn"]["query"]["kernel"].shape == (16, 2, 8)
    assert 0 < (kernel == 0).mean() < 1
    assert result.info["dense_layers"] == {}
    filters = sp.prune(model, variables, x, method="ft", keep_ratio=0.8)
    assert filters.info["dense_layers"] == {}  # heads are channel groups (tests/test_heads.py)


def test_convtranspose_scored_by_weight_and_filter_methods():
    model, variables, x = _setup("convtranspose")
    # Decoder reads 5 outputs: data-dependent zeroing (on by default) zeroes 3/4 of Dense_0, which
    # alone reaches the budget; the scores of the transposed conv are checked without it
    for method in ("wt", "ft"):
        result = sp.prune(model, variables, x, method=method, keep_ratio=0.7, zero_dead=False)
        assert "ConvTranspose_0" in result.layer_kept and "ConvTranspose_0" not in result.info["dense_layers"]
        mask = np.asarray(result.masks["ConvTranspose_0"]["kernel"])
        assert 0 < (~mask).mean() < 1
        zeroed = sp.prune(model, variables, x, method=method, keep_ratio=0.7)  # zero_dead=True
        assert "ConvTranspose_0" in zeroed.layer_kept and "ConvTranspose_0" not in zeroed.info["dense_layers"]


def test_include_exclude():
    model, variables, x = _setup("attention")
    result = sp.prune(model, variables, x, method="wt", keep_ratio=0.7, exclude=r"^attn/|head")
    assert {"attn/query", "attn/key", "attn/value", "attn/out", "head"} <= set(result.info["dense_layers"])
    assert result.info["dense_layers"]["head"] == "matched by exclude"
    assert np.all(result.masks["head"]["kernel"]) and np.all(result.masks["attn"]["out"]["kernel"])
    assert abs(result.keep_ratio - 0.7) <= 0.0035
    only = sp.prune(model, variables, x, method="wt", keep_ratio=0.9, include=lambda n: n.startswith("Dense"))
    assert set(only.layer_kept) == {"Dense_0", "Dense_1"}
    listed = sp.prune(model, variables, x, method="wt", keep_ratio=0.9, include=["Dense_0"])
    assert set(listed.layer_kept) == {"Dense_0"}
    nothing = sp.prune(model, variables, x, method="wt", keep_ratio=0.5, include="no-such-layer")
    assert nothing.info["reachable"] is False and nothing.keep_ratio == 1.0
    with pytest.raises(ValueError, match="include must be"):
        sp.prune(model, variables, x, method="wt", keep_ratio=0.5, include=3)


def test_thinet_on_integer_inputs():
    for case in ("tied",):  # the attention block: test_every_method_runs
        model, variables, x = _setup(case)
        result = sp.prune(model, variables, x, method="thinet", keep_ratio=0.9)
        assert result.keep_ratio < 1.0


# --------------------------------------------------------------------------- sensitivities vs NumPy


@pytest.mark.parametrize("reduction", ["mean"])  # 'max' on token positions: Einsum, tied and nnx tests
def test_dense_general_sensitivity_matches_loop(reduction):
    model, variables, x = _setup("attention")
    x = x[:3]
    layers = {layer.name: layer for layer in sp.find_layers(model, variables, x)}
    inputs = sp.capture_inputs(model, variables, x)
    sens = sp.compute_sensitivities(model, variables, x, reduction=reduction)
    for name, n_in in [("attn/query", 1), ("attn/value", 1), ("attn/out", 2)]:
        raw = np.asarray(paths.get_path(variables["params"], layers[name].path + ("kernel",)))
        # tokens are output positions: 'mean' (SiPP det) averages over them, 'max' takes the largest
        want = ref_general(raw, np.asarray(inputs[name]), n_in, reduction)
        _close(sens[name].weight, want.reshape(layers[name].kernel_shape))


def test_einsum_sensitivity_matches_loop():
    model, x = EinsumNet(), _RNG.normal(size=(3, 4, 6)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), x)
    layers = sp.find_layers(model, variables, x)
    assert [layer.name for layer in layers] == ["mix", "batched"]
    inputs = sp.capture_inputs(model, variables, x)
    sens = sp.compute_sensitivities(model, variables, x, reduction="max")
    raw = np.asarray(variables["params"]["mix"]["kernel"])
    _close(sens["mix"].weight, ref_general(raw, np.asarray(inputs["mix"]), 1).reshape(6, 10))
    raw = np.asarray(variables["params"]["batched"]["kernel"])
    _close(sens["batched"].weight, ref_general(raw, np.asarray(inputs["batched"]), 1))
    assert layer_kinds.einsum_fan_in("bhd,bde->bhe") is None  # batch letter in the kernel: left dense
    assert layer_kinds.einsum_fan_in("btd,dk->btk") == 1


@pytest.mark.parametrize("reduction", ["max"])  # 'mean': test_nnx_sensitivities_match_loop (depthwise)
def test_grouped_conv_sensitivity_matches_loop(reduction):
    model, variables, x = _setup("depthwise")
    x = x[:2]
    inputs = sp.capture_inputs(model, variables, x)
    sens = sp.compute_sensitivities(model, variables, x, reduction=reduction)
    for name, groups in [("depthwise", 8), ("grouped", 4)]:
        raw = np.asarray(variables["params"][name]["kernel"])
        _close(sens[name].weight, ref_grouped_conv(raw, np.asarray(inputs[name]), groups, reduction))


def test_tied_embedding_sensitivity_matches_loop_and_masks_the_lookup():
    model, variables, x = _setup("tied")
    x = x[:3]
    (layer,) = [la for la in sp.find_layers(model, variables, x) if la.name == "Embed_0"]
    assert layer.kernel_shape == (16, 40) and layer.transposed
    table = np.asarray(variables["params"]["Embed_0"]["embedding"])
    inputs = sp.capture_inputs(model, variables, x)
    sens = sp.compute_sensitivities(model, variables, x, reduction="max")
    _close(sens["Embed_0"].weight, ref_general(table.T, np.asarray(inputs["Embed_0"]), 1))
    result = sp.prune(model, variables, x, method="sipp", keep_ratio=0.5)
    pruned = np.asarray(result.params["Embed_0"]["embedding"])
    assert pruned.shape == table.shape and 0 < (pruned == 0).mean() < 1
    np.testing.assert_array_equal(pruned == 0, ~np.asarray(result.masks["Embed_0"]["embedding"]))
    # the lookup reads the same masked table
    emb = nn.Embed(40, 16)
    looked = emb.apply({"params": {"embedding": pruned}}, x)
    np.testing.assert_array_equal(np.asarray(looked), pruned[x])


def test_shared_layer_sensitivity_is_max_over_calls():
    model, x = Shared(), _RNG.normal(size=(4, 5)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), x)
    (twice,) = [la for la in sp.find_layers(model, variables, x) if la.name == "twice"]
    assert twice.calls == 2
    p = jax.tree.map(np.asarray, variables["params"])
    first = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    second = np.maximum(first @ p["twice"]["kernel"] + p["twice"]["bias"], 0)
    sens = sp.compute_sensitivities(model, variables, x, reduction="max")
    k = p["twice"]["kernel"]
    want = np.maximum(ref_general(k, first, 1), ref_general(k, second, 1))
    _close(sens["twice"].weight, want)
    # zero_dead=False: on 4 points the reference's zeroing moves this tiny net's size in steps of several params
    result = sp.prune(model, variables, x, method="sipp", keep_ratio=0.6, zero_dead=False)
    assert abs(result.keep_ratio - 0.6) <= 0.003 and result.masks["twice"]["kernel"].shape == k.shape
    assert "twice" in sp.prune(model, variables, x, method="ft", keep_ratio=0.8).info["dense_layers"]


# --------------------------------------------------------------------------- nnx


class NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(24, 16, rngs=rngs)
        self.norm = nnx.LayerNorm(16, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(2, 16, qkv_features=16, decode=False, rngs=rngs)
        self.mlp = nnx.Linear(16, 16, rngs=rngs)
        self.head = nnx.Linear(16, 5, rngs=rngs)

    def __call__(self, tok):
        x = self.embed(tok)
        x = x + self.attn(self.norm(x))
        x = x + nnx.relu(self.mlp(x))
        return self.head(x.mean(1))


class NNXDepthwise(nnx.Module):
    def __init__(self, rngs):
        self.stem = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.depthwise = nnx.Conv(8, 8, (3, 3), feature_group_count=8, rngs=rngs)
        self.point = nnx.Conv(8, 12, (1, 1), rngs=rngs)
        self.head = nnx.Linear(12, 5, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.depthwise(nnx.relu(self.stem(x))))
        return self.head(nnx.relu(self.point(x)).mean((1, 2)))


def nnx_prune_every_method(model, data) -> dict:
    """Method -> ``spx.prune`` result at keep 0.6, each checked by :func:`_check_result`; a method
    may only refuse up front with a smallest reachable keep ratio above 0.6."""
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    results = {}
    for method in sp.available_methods():
        try:
            result = spx.prune(model, data, method=method, keep_ratio=0.6, key=jax.random.PRNGKey(1), labels=LABELS)
        except ValueError as err:  # refused up front: the layers this method can prune are too small
            match = re.search(r"smallest reachable keep ratio is ([0-9.]+)", str(err))
            assert match and float(match.group(1)) > 0.6, (method, err)
            continue
        _check_result(result, before, method)
        results[method] = result
    return results


@pytest.mark.parametrize("cls, data", [(NNXBlock, _TOKENS), (NNXDepthwise, _IMAGES)])
def test_nnx_every_method_runs(cls, data):
    model = cls(nnx.Rngs(0))
    nnx_prune_every_method(model, data)
    names = [layer.name for layer in spx.find_layers(model, data)]
    assert ("attn/query" in names) if cls is NNXBlock else ("depthwise" in names)


def test_nnx_sensitivities_match_loop():
    model = NNXBlock(nnx.Rngs(0))
    x = _TOKENS[:3]
    sens = spx.compute_sensitivities(model, x, reduction="max")
    inputs = spx.capture_inputs(model, x)
    raw = np.asarray(model.attn.out.kernel.get_value())
    _close(sens["attn/out"].weight, ref_general(raw, np.asarray(inputs["attn/out"]), 2).reshape(16, 16))
    dw = NNXDepthwise(nnx.Rngs(0))
    sens = spx.compute_sensitivities(dw, _IMAGES[:2], reduction="mean")
    inputs = spx.capture_inputs(dw, _IMAGES[:2])
    raw = np.asarray(dw.depthwise.kernel.get_value())
    _close(sens["depthwise"].weight, ref_grouped_conv(raw, np.asarray(inputs["depthwise"]), 8, "mean"))


class NNXTied(nnx.Module):
    def __init__(self, rngs):
        self.emb = nnx.Embed(30, 8, rngs=rngs)
        self.mid = nnx.Linear(8, 8, rngs=rngs)
        self.up = nnx.ConvTranspose(8, 4, (3,), rngs=rngs)

    def __call__(self, tok):
        h = nnx.relu(self.mid(self.emb(tok)))
        return self.emb.attend(h + self.up(h).sum(-1, keepdims=True)).mean(1)


def test_nnx_tied_embedding_and_convtranspose():
    model, tok = NNXTied(nnx.Rngs(0)), _RNG.integers(0, 30, (8, 5))
    layers = spx.find_layers(model, tok)
    assert [(la.name, la.kernel_shape) for la in layers] == [("mid", (8, 8)), ("up", (3, 8, 4)), ("emb", (8, 30))]
    result = spx.prune(model, tok, method="sipp", keep_ratio=0.6)
    assert abs(result.keep_ratio - 0.6) <= 0.003 and not result.info["dense_layers"]
    filters = spx.prune(model, tok, method="pfp", keep_ratio=0.9, allow_dead_layers=True)
    assert "up" not in filters.info["dense_layers"]
    table = np.asarray(result.params["emb"]["embedding"].get_value())
    mask = np.asarray(result.masks["emb"]["embedding"].get_value())
    assert table.shape == mask.shape == (30, 8) and np.all(table[~mask] == 0) and 0 < (~mask).mean() < 1
