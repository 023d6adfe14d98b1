"""Self-describing shrunk Linen models (sensprune.shrink_fields): the field values the narrower
kernels imply, and a module rebuilt with them whose plain apply runs the shrunk variables."""

import flax.linen as nn
import jax
import numpy as np
import pytest

import sensprune as sp
from experiments.models.vit import ViT

HIDDEN, HEADS, HEAD_DIM, MLP = 16, 4, 4, 12


def _ones(params):
    return jax.tree_util.tree_map(lambda a: np.ones(np.shape(a), bool), params)


def _drop_head(attn_masks, h):
    """Masks of one attention module with head ``h`` removed (its value columns and output rows)."""
    attn_masks["value"]["kernel"][:, h, :] = False
    attn_masks["out"]["kernel"][h] = False


def _plain(model, variables, x):
    with jax.default_matmul_precision("highest"):
        return np.asarray(model.apply(variables, x), np.float64)


def _nonzero_biases(variables, seed=0):
    rng = np.random.default_rng(seed)
    return {"params": jax.tree_util.tree_map_with_path(
        lambda p, a: a + 0.1 * rng.standard_normal(a.shape).astype(np.float32) if p[-1].key in ("bias", "scale")
        else a, variables["params"])}


@pytest.fixture(scope="module")
def vit():
    model = ViT(num_classes=5, patch_size=7, hidden_size=HIDDEN, depth=2, num_heads=HEADS, mlp_dim=MLP)
    x = np.random.default_rng(1).standard_normal((4, 28, 28, 1)).astype(np.float32)
    variables = _nonzero_biases(model.init(jax.random.PRNGKey(0), x[:1]))
    masks = _ones(variables["params"])
    _drop_head(masks["block0"]["attn"], 1)
    _drop_head(masks["block0"]["attn"], 3)
    masks["block1"]["mlp"]["fc2"]["kernel"][[0, 5, 7]] = False  # 3 MLP units of block 1
    return model, variables, masks, x


def test_vit_fields_and_rebuilt_module(vit, tmp_path):
    model, variables, masks, x = vit
    shrunk = sp.shrink(model, variables, masks, x=x)
    fields = shrunk.meta["fields"]
    assert fields["block0/attn"] == {"num_heads": 2, "qkv_features": 2 * HEAD_DIM}
    assert fields["block1/mlp/fc1"] == {"features": MLP - 3}
    assert "block1/attn" not in fields and "block0/mlp/fc1" not in fields  # only changed values
    rebuilt = shrunk.rebuilt()
    assert rebuilt.block_heads == (2, HEADS) and rebuilt.block_mlp_dims == (MLP, MLP - 3)
    want = _plain(model, {"params": sp.apply_masks(variables["params"], masks)}, x)
    np.testing.assert_allclose(_plain(rebuilt, shrunk.variables, x), want, rtol=0, atol=1e-5)
    # A fresh init of the rebuilt module has exactly the shrunk shapes.
    shapes = jax.tree_util.tree_map(np.shape, rebuilt.init(jax.random.PRNGKey(1), x[:1]))
    assert shapes == jax.tree_util.tree_map(np.shape, shrunk.variables)
    sp.save_shrunk(tmp_path / "vit", shrunk)
    loaded = sp.load_shrunk(tmp_path / "vit")
    assert sp.read_shrunk_meta(tmp_path / "vit")["fields"] == fields
    np.testing.assert_allclose(_plain(loaded.rebuilt(), loaded.variables, x), want, rtol=0, atol=1e-5)


def test_vit_rejects_fields_it_cannot_express(vit):
    model = vit[0]
    with pytest.raises(ValueError, match="'patch_embed'.*cannot be expressed"):
        model.with_shrunk_fields({"patch_embed": {"features": 8}})


def test_flat_attention_is_cloned_with_fewer_heads():
    model = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=HEADS * HEAD_DIM, out_features=6)
    x = np.random.default_rng(2).standard_normal((3, 5, 8)).astype(np.float32)
    variables = _nonzero_biases(model.init(jax.random.PRNGKey(0), x[:1]))
    masks = _ones(variables["params"])
    _drop_head(masks, 2)
    shrunk = sp.shrink(model, variables, masks, x=x)
    assert shrunk.meta["fields"][""] == {"num_heads": HEADS - 1, "qkv_features": (HEADS - 1) * HEAD_DIM}
    rebuilt = shrunk.rebuilt()
    assert (rebuilt.num_heads, rebuilt.qkv_features, rebuilt.out_features) == (HEADS - 1, 12, 6)
    want = _plain(model, {"params": sp.apply_masks(variables["params"], masks)}, x)
    np.testing.assert_allclose(_plain(rebuilt, shrunk.variables, x), want, rtol=0, atol=1e-5)


class _Nested(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(10, name="hidden")(x))
        return nn.Dense(3, name="out")(h)


def test_nested_model_without_hook_names_the_limit():
    model = _Nested()
    x = np.random.default_rng(3).standard_normal((4, 6)).astype(np.float32)
    variables = _nonzero_biases(model.init(jax.random.PRNGKey(0), x[:1]))
    masks = _ones(variables["params"])
    masks["out"]["kernel"][[2, 4]] = False
    shrunk = sp.shrink(model, variables, masks, x=x)
    assert shrunk.meta["fields"] == {"hidden": {"features": 8}}
    with pytest.raises(ValueError, match=r"_Nested creates the shrunk submodules \['hidden'\].*with_shrunk_fields"):
        shrunk.rebuilt()


class _EinsumHeads(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Einsum((6, 3, 4), "btd,dhk->bthk", name="mix")(x)
        return nn.Einsum((3, 4, 5), "bthk,hkc->btc", name="out")(nn.relu(h))


def test_linen_einsum_loses_whole_heads_and_records_its_shape():
    model = _EinsumHeads()
    x = np.random.default_rng(4).standard_normal((4, 7, 6)).astype(np.float32)
    variables = _nonzero_biases(model.init(jax.random.PRNGKey(0), x[:1]))
    masks = _ones(variables["params"])
    masks["out"]["kernel"][1] = False  # head 1's consumer rows
    shrunk = sp.shrink(model, variables, masks, x=x)
    assert shrunk.meta["fields"] == {"mix": {"shape": [6, 2, 4]}, "out": {"shape": [2, 4, 5]}}
    np.testing.assert_array_equal(shrunk.params["mix"]["bias"], np.delete(variables["params"]["mix"]["bias"], 1, 0))
    want = _plain(model, {"params": sp.apply_masks(variables["params"], masks)}, x)
    np.testing.assert_allclose(np.asarray(shrunk.apply(x), np.float64), want, rtol=0, atol=1e-5)
