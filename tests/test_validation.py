"""Issue #17 items 1 and 7: prune refuses non-finite inputs and bad arguments, keep_ratio=1 keeps all."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sensprune as sp
from sensprune import validation
from tests.fixtures import digits, mlp, trained_mlp


def _points():
    x, _ = digits()
    return np.array(x[1400:1464])


@pytest.mark.parametrize("method", ["sipp", "pfp"])
def test_nan_point_raises_naming_the_point(method):
    model, variables = trained_mlp()
    x = _points()
    x[5, 2, 3, 0] = np.nan
    x[17, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"2 of 64 points hold NaN or inf.*point indices 5, 17"):
        sp.prune(model, variables, x, method=method, keep_ratio=0.3, key=jax.random.PRNGKey(0))


def test_nan_point_in_a_list_of_batches_is_located():
    model, variables = trained_mlp()
    x = _points()
    x[40, 1, 1, 0] = -np.inf
    with pytest.raises(ValueError, match=r"point indices 40"):
        sp.prune(model, variables, [x[:32], x[32:]], method="wt", keep_ratio=0.3)


def test_point_checks_on_pytrees_and_integer_tokens():
    tokens = np.random.default_rng(0).integers(0, 100, (8, 5))
    validation.check_finite_points(tokens)  # integers are finite
    mask = np.ones((8, 5), np.float32)
    validation.check_finite_points({"tokens": tokens, "mask": mask})
    mask[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"1 of 8 points.*\(in mask\).*point indices 3"):
        validation.check_finite_points({"tokens": tokens, "mask": mask})


def test_nan_param_raises_naming_its_path():
    model, variables = trained_mlp()
    params = jax.tree.map(np.array, variables["params"])
    params["Dense_1"]["bias"][3] = np.nan
    with pytest.raises(ValueError, match=r"params/Dense_1/bias \(1 of 32 entries\)"):
        sp.prune(model, {"params": params}, _points(), method="sipp", keep_ratio=0.3)


@pytest.mark.parametrize("method", ["sipp", "pfp"])
def test_non_finite_sensitivities_of_a_diverged_model_raise_naming_the_layer(method):
    model, variables = trained_mlp()
    # Finite but huge weights: activations overflow float32 in the last layers.
    params = jax.tree_util.tree_map_with_path(
        lambda p, a: a * 1e25 if p[-1].key == "kernel" else a, variables["params"])
    with pytest.raises(ValueError, match=r"sensitivities over S are NaN or inf in layer\(s\) .*Dense_"):
        sp.prune(model, {"params": params}, _points(), method=method, keep_ratio=0.3, key=jax.random.PRNGKey(0))


def test_bad_keep_ratio_and_key_are_refused_up_front():
    model, variables = mlp()
    x = _points()
    for bad in (True, False, np.bool_(True), "0.5"):
        with pytest.raises(ValueError, match="keep_ratio must be a number in"):
            sp.prune(model, variables, x, method="wt", keep_ratio=bad)
    with pytest.raises(ValueError, match=r"key must be one jax.random key.*PRNGKey\(seed\).*got int \(123\)"):
        sp.prune(model, variables, x, method="sipp_rand", keep_ratio=0.5, key=123)
    with pytest.raises(ValueError, match="key must be one jax.random key"):
        sp.prune(model, variables, x, method="sipp_rand", keep_ratio=0.5, key=np.zeros(3, np.float32))
    validation.check_key(jax.random.PRNGKey(0))
    validation.check_key(jax.random.key(0))


def test_keep_ratio_one_keeps_everything_on_a_fresh_model():
    model, _ = mlp()
    x = _points()
    fresh = model.init(jax.random.PRNGKey(0), x[:1])  # zero-initialised biases
    assert sp.count_nonzero(fresh["params"]) < sp.count_params(fresh["params"])
    for method in ("sipp", "pfp", "wt"):
        res = sp.prune(model, fresh, x, method=method, keep_ratio=1, key=jax.random.PRNGKey(0))
        assert res.keep_ratio == 1.0 and res.info["reachable"]
        assert all(bool(jnp.all(m)) for m in jax.tree_util.tree_leaves(res.masks))
        for a, b in zip(jax.tree_util.tree_leaves(res.params), jax.tree_util.tree_leaves(fresh["params"])):
            np.testing.assert_array_equal(a, b)
        assert res.layer_kept == res.layer_total
