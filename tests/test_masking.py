"""Tests for sensprune.masking: mask helpers and the masked optax wrapper."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sensprune import masking


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(10)(x)


def _params():
    return {
        "Dense_0": {"kernel": jnp.arange(12.0).reshape(3, 4) - 5.0, "bias": jnp.ones(4)},
        "Dense_1": {"kernel": jnp.ones((4, 2), jnp.bfloat16), "bias": jnp.zeros(2)},
    }


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def test_ones_and_nonzero_masks():
    params = _params()
    ones = masking.ones_like_masks(params)
    masking.check_same_structure(params, ones)
    assert all(m.dtype == jnp.bool_ and bool(m.all()) for m in jax.tree.leaves(ones))

    nz = masking.nonzero_masks(params)
    np.testing.assert_array_equal(
        nz["Dense_0"]["kernel"], np.asarray(params["Dense_0"]["kernel"]) != 0
    )
    assert not bool(nz["Dense_1"]["bias"].any())
    assert masking.summarize_masks(nz) == {
        "Dense_0/bias": (4, 4),
        "Dense_0/kernel": (11, 12),
        "Dense_1/bias": (0, 2),
        "Dense_1/kernel": (8, 8),
    }
    assert masking.mask_sparsity(nz) == pytest.approx(3 / 26)
    assert masking.mask_sparsity(ones) == 0.0


def test_apply_masks_zeroes_and_keeps_dtype():
    params = _params()
    masks = masking.ones_like_masks(params)
    k = np.array([[1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 1, 0]], bool)
    masks["Dense_0"]["kernel"] = jnp.asarray(k)
    masks["Dense_1"]["kernel"] = jnp.zeros((4, 2), bool)
    out = masking.apply_masks(params, masks)
    np.testing.assert_array_equal(
        out["Dense_0"]["kernel"], np.where(k, np.asarray(params["Dense_0"]["kernel"]), 0)
    )
    assert out["Dense_1"]["kernel"].dtype == jnp.bfloat16
    assert not bool(out["Dense_1"]["kernel"].any())
    np.testing.assert_array_equal(out["Dense_0"]["bias"], params["Dense_0"]["bias"])
    # Also under jit (checks are static).
    out_jit = jax.jit(masking.apply_masks)(params, masks)
    np.testing.assert_array_equal(out_jit["Dense_0"]["kernel"], out["Dense_0"]["kernel"])


def test_intersect_masks():
    a = {"w": jnp.array([True, True, False, False])}
    b = {"w": jnp.array([True, False, True, False])}
    np.testing.assert_array_equal(
        masking.intersect_masks(a, b)["w"], [True, False, False, False]
    )
    with pytest.raises(ValueError, match="has dtype float32 in first masks"):
        masking.intersect_masks({"w": jnp.ones(4)}, b)
    with pytest.raises(ValueError, match="shape"):
        masking.intersect_masks(a, {"w": jnp.ones(3, bool)})


def test_check_same_structure_messages():
    params = _params()
    masks = masking.ones_like_masks(params)

    missing = {"Dense_0": dict(masks["Dense_0"]), "Dense_1": dict(masks["Dense_1"])}
    del missing["Dense_1"]["bias"]
    with pytest.raises(ValueError) as e:
        masking.check_same_structure(params, missing)
    assert (
        "masks do not match params: leaf 'Dense_1/bias' is in params but missing "
        "from masks" in str(e.value)
    )

    bad_shape = {**masks, "Dense_0": {**masks["Dense_0"], "kernel": jnp.ones((4, 3), bool)}}
    with pytest.raises(ValueError) as e:
        masking.check_same_structure(params, bad_shape)
    assert (
        "masks do not match params: leaf 'Dense_0/kernel' has shape (3, 4) in params "
        "but (4, 3) in masks" in str(e.value)
    )

    extra = {**masks, "Dense_2": {"kernel": jnp.ones((2, 2), bool)}}
    msg = "leaf 'Dense_2/kernel' is in masks but not in params"
    with pytest.raises(ValueError, match=msg):
        masking.check_same_structure(params, extra)

    floats = jax.tree.map(lambda m: m.astype(jnp.float32), masks)
    msg = "leaf 'Dense_0/bias' has dtype float32 in masks, expected bool"
    with pytest.raises(ValueError, match=msg):
        masking.check_same_structure(params, floats)
    masking.check_same_structure(params, floats, require_bool=False)  # no error

    with pytest.raises(ValueError, match="sens do not match params"):
        masking.check_same_structure(params, missing, "sens")
    with pytest.raises(ValueError, match="masks do not match params"):
        masking.apply_masks(params, bad_shape)


# ----------------------------------------------------------------------------
# masked optax wrapper
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _setup(seed=0, keep=0.3):
    """MLP 20-32-10, a fixed batch, masked params and random kernel masks.

    Data and masks come from numpy (eager jax.random calls compile one small
    program per op, which is slow on CPU). Cached: the arrays are immutable and
    no test mutates the returned dicts.
    """
    rng = np.random.default_rng(seed)
    model = MLP()
    x = jnp.asarray(rng.normal(size=(64, 20)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=64))
    params = jax.jit(model.init)(jax.random.key(seed), x)["params"]
    masks = _random_masks(rng, params, keep)
    return model, x, y, masking.apply_masks(params, masks), masks


def _random_masks(rng, params, keep):
    """Random kernel masks (~keep kept), all-True for biases."""

    def one(path, p):
        if path[-1].key == "kernel":
            return jnp.asarray(rng.random(p.shape) < keep)
        return jnp.ones(p.shape, bool)

    return jax.tree_util.tree_map_with_path(one, params)


def _make_step(model, tx, trace_counter):
    def loss_fn(params, x, y):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(params, opt_state, x, y):
        trace_counter.append(1)
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def _pruned_are_zero(params, masks):
    return all(
        not np.any(np.asarray(p)[~np.asarray(m)])
        for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks))
    )


@pytest.mark.parametrize(
    "inner",
    [
        optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.1, momentum=0.9)),
        optax.adamw(1e-2, weight_decay=1e-2),
        optax.adam(optax.cosine_decay_schedule(3e-2, 50)),
    ],
    ids=["decay+sgd_momentum", "adamw", "adam_schedule"],
)
def test_masked_training_keeps_pruned_weights_zero(inner):
    model, x, y, params0, masks = _setup()
    kept_frac = masking.summarize_masks(masks)["Dense_0/kernel"]
    assert 0.2 < kept_frac[0] / kept_frac[1] < 0.4

    tx = masking.masked(inner, masks)
    traces = []
    step = _make_step(model, tx, traces)
    params, opt_state = params0, tx.init(params0)

    losses = []
    for _ in range(50):
        params, opt_state, loss = step(params, opt_state, x, y)
        losses.append(float(loss))
        assert _pruned_are_zero(params, masks)
    assert losses[-1] < 0.7 * losses[0]
    for name in ("Dense_0", "Dense_1"):
        m = np.asarray(masks[name]["kernel"])
        before = np.asarray(params0[name]["kernel"])[m]
        after = np.asarray(params[name]["kernel"])[m]
        assert np.mean(before != after) > 0.9  # kept weights did train
    # Optimizer moments of pruned entries stayed 0 (gradients masked before tx).
    for leaf in jax.tree.leaves(opt_state.inner_state):
        if getattr(leaf, "shape", None) == masks["Dense_0"]["kernel"].shape:
            assert not np.any(np.asarray(leaf)[~np.asarray(masks["Dense_0"]["kernel"])])
    assert len(traces) == 1


def test_set_masks_does_not_retrace_and_prunes_further():
    model, x, y, params, masks = _setup(seed=1, keep=0.5)
    tx = masking.masked(optax.sgd(0.1, momentum=0.9), masks)
    traces = []
    step = _make_step(model, tx, traces)
    opt_state = tx.init(params)
    for _ in range(5):
        params, opt_state, _ = step(params, opt_state, x, y)
    assert len(traces) == 1

    # Second pruning round: a strictly sparser mask, swapped in the state.
    new_masks = masking.intersect_masks(
        masks, _random_masks(np.random.default_rng(7), params, 0.5)
    )
    params = masking.apply_masks(params, new_masks)
    opt_state = masking.set_masks(opt_state, new_masks)
    assert masking.get_masks(opt_state) is not masks
    got = masking.get_masks(opt_state)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(new_masks)):
        np.testing.assert_array_equal(a, b)
    for _ in range(5):
        params, opt_state, _ = step(params, opt_state, x, y)
        assert _pruned_are_zero(params, new_masks)
    assert len(traces) == 1
    assert step._cache_size() == 1


def test_masked_state_is_a_plain_pytree_of_arrays():
    _, _, _, params, masks = _setup()
    tx = masking.masked(optax.adamw(1e-3), masks)
    state = tx.init(params)
    assert isinstance(state, masking.PruneMaskState)
    assert isinstance(state, tuple) and state._fields == ("inner_state", "masks")
    leaves, treedef = jax.tree.flatten(state)
    assert all(isinstance(x, jax.Array) for x in leaves)
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert isinstance(rebuilt, masking.PruneMaskState)
    assert jax.tree.structure(jax.jit(lambda s: s)(state)) == treedef
    assert all(m.dtype == jnp.bool_ for m in jax.tree.leaves(state.masks))


def test_masked_init_validates_and_defaults_to_nonzero():
    params = _params()
    masks = masking.ones_like_masks(params)
    bad = {**masks, "Dense_0": {**masks["Dense_0"], "kernel": jnp.ones((4, 3), bool)}}
    with pytest.raises(ValueError, match="leaf 'Dense_0/kernel' has shape"):
        masking.masked(optax.sgd(0.1), bad).init(params)

    state = masking.masked(optax.sgd(0.1)).init(params)
    np.testing.assert_array_equal(
        state.masks["Dense_0"]["kernel"], np.asarray(params["Dense_0"]["kernel"]) != 0
    )

    # Updates are masked even if the inner transform ignores the mask
    # (here: weight decay on nonzero pruned params), and extra args pass through.
    masks = {**masks, "Dense_1": {**masks["Dense_1"], "kernel": jnp.zeros((4, 2), bool)}}
    tx = masking.masked(optax.add_decayed_weights(1.0), masks)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state, params, unused_extra=1)
    assert not bool(updates["Dense_1"]["kernel"].any())
    np.testing.assert_allclose(
        updates["Dense_0"]["kernel"], 1.0 + np.asarray(params["Dense_0"]["kernel"])
    )


def test_set_and_get_masks_errors_and_nesting():
    params = _params()
    masks = masking.ones_like_masks(params)
    tx = optax.chain(optax.clip_by_global_norm(1.0), masking.masked(optax.sgd(0.1), masks))
    state = tx.init(params)
    assert masking.get_masks(state) is not None
    new = jax.tree.map(jnp.logical_not, masks)
    state2 = masking.set_masks(state, new)
    assert not bool(masking.get_masks(state2)["Dense_0"]["kernel"].any())
    assert bool(masking.get_masks(state)["Dense_0"]["kernel"].all())  # not mutated

    with pytest.raises(ValueError, match="new masks do not match current masks"):
        masking.set_masks(state, {"Dense_0": masks["Dense_0"]})
    with pytest.raises(ValueError, match="exactly one PruneMaskState"):
        masking.get_masks(optax.sgd(0.1).init(params))


def test_unmasked_optimizer_would_revive_pruned_weights():
    """Control for the training test: without the wrapper, pruned weights move."""
    model, x, y, params, masks = _setup()
    tx = optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.1, momentum=0.9))
    step = _make_step(model, tx, [])
    params, _, _ = step(params, tx.init(params), x, y)
    assert not _pruned_are_zero(params, masks)
