"""End-to-end tests of sensprune.prune on small Flax models."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sensprune as sp
from tests.fixtures import CNN, MLP, digits, trained_mlp

ALL = ["sipp", "sipp_rand", "sipp_hybrid", "pfp", "pfp_rand", "pfp_top"]


@functools.lru_cache(maxsize=None)
def cnn():
    x, _ = digits()
    model = CNN(dilation=2)
    variables = model.init(jax.random.PRNGKey(1), x[:2])
    return model, variables


def _granule(res, variables):
    """Largest parameter count one structured decision (a channel column or a filter) removes."""
    out = 0
    for name in res.layer_kept:
        k = np.asarray(variables["params"][name]["kernel"])
        out = max(out, k.size // k.shape[-2], k.size // k.shape[-1])
    return out / sp.count_params(variables["params"])


def _check_result(res, variables, target, structured=False):
    sp.check_same_structure(variables["params"], res.masks)
    leaves_p = jax.tree_util.tree_leaves(res.params)
    leaves_m = jax.tree_util.tree_leaves(res.masks)
    for p, m in zip(leaves_p, leaves_m):
        assert p.shape == m.shape and m.dtype == jnp.bool_
        assert np.all(np.asarray(p)[~np.asarray(m)] == 0)
    if res.info["reachable"] or not structured:
        assert abs(res.keep_ratio - target) <= 0.005 * target, (res.keep_ratio, target)
    else:
        # Whole channels are coarse on a tiny net: the search must land within one granule.
        assert abs(res.keep_ratio - target) <= _granule(res, variables), (res.keep_ratio, target)


@pytest.mark.parametrize("method", ALL)
def test_methods_hit_keep_ratio_mlp(method):
    model, variables = trained_mlp()
    x, _ = digits()
    res = sp.prune(model, variables, x[1400:1528], method=method, keep_ratio=0.3, key=jax.random.PRNGKey(0))
    _check_result(res, variables, 0.3, structured=method.startswith("pfp"))
    assert sum(res.layer_kept.values()) < sum(res.layer_total.values())
    assert 0 < res.flops < res.flops_dense


@pytest.mark.parametrize("method", ALL)
def test_methods_on_cnn_with_batchnorm(method):
    model, variables = cnn()
    x, _ = digits()
    res = sp.prune(
        model, variables, x[:48], method=method, keep_ratio=0.5, key=jax.random.PRNGKey(1),
        apply_kwargs={"train": False}, chunk_size=16,
    )
    _check_result(res, variables, 0.5, structured=method.startswith("pfp"))
    out = model.apply({**variables, "params": res.params}, x[:4], train=False)
    assert np.all(np.isfinite(out))


def test_sipp_keeps_global_top_sensitivities():
    model, variables = trained_mlp()
    x, _ = digits()
    pts = x[1400:1464]
    sens = sp.compute_sensitivities(model, variables, pts, reduction="mean")
    res = sp.prune(model, variables, pts, method="sipp", keep_ratio=0.25, zero_dead=False)
    kept = np.concatenate([np.asarray(sens[n].weight)[np.asarray(m)] for n, m in _kernel_masks(res).items()])
    dropped = np.concatenate([np.asarray(sens[n].weight)[~np.asarray(m)] for n, m in _kernel_masks(res).items()])
    assert kept.min() >= dropped.max()
    # With the reference's zeroing (zero_dead=True), SiPP selects the global top at the nominal budget and
    # then loses the selected entries of exactly zero gradient over S: what it keeps is still the
    # top, and every entry above the selection's threshold that is not kept was zeroed.
    res = sp.prune(model, variables, pts, method="sipp", keep_ratio=0.25, zero_dead=True)
    kept = np.concatenate([np.asarray(sens[n].weight)[np.asarray(m)] for n, m in _kernel_masks(res).items()])
    every = np.sort(np.concatenate([np.asarray(sens[n].weight).ravel() for n in res.layer_kept]))
    selected = kept.size + res.info["zero_dead"]["kernel"]
    threshold = every[-selected]
    assert res.info["zero_dead"]["kernel"] > 0 and kept.min() >= threshold
    assert int(np.sum(every >= threshold)) - kept.size == res.info["zero_dead"]["kernel"]
    # Deterministic SiPP does not reweight.
    for n, m in _kernel_masks(res).items():
        k_new = np.asarray(res.params[n]["kernel"])
        k_old = np.asarray(variables["params"][n]["kernel"])
        np.testing.assert_array_equal(k_new[np.asarray(m)], k_old[np.asarray(m)])


def _kernel_masks(res):
    return {n: res.masks[n]["kernel"] for n in res.layer_kept}


def test_same_key_same_result_and_keys_differ():
    model, variables = trained_mlp()
    x, _ = digits()
    def run(k):
        return sp.prune(model, variables, x[1400:1464], method="sipp_rand", keep_ratio=0.3, key=k)
    a, b, c = run(jax.random.PRNGKey(3)), run(jax.random.PRNGKey(3)), run(jax.random.PRNGKey(4))
    for la, lb in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_array_equal(la, lb)
    assert any(
        not np.array_equal(la, lc)
        for la, lc in zip(jax.tree_util.tree_leaves(a.masks), jax.tree_util.tree_leaves(c.masks))
    )


@pytest.mark.parametrize("method", ["sipp", "pfp"])
def test_fused_pass_gives_the_same_masks(method, monkeypatch):
    from sensprune import sensitivity

    model, variables = cnn()
    x, _ = digits()
    seen = []
    real = sensitivity.compute_sensitivities

    def spy(*args, **kwargs):
        seen.append(kwargs["fused"])
        return real(*args, **kwargs)

    monkeypatch.setattr(sensitivity, "compute_sensitivities", spy)
    kw = dict(method=method, keep_ratio=0.3, key=jax.random.PRNGKey(0), chunk_size=16)
    plain = sp.prune(model, variables, x[:40], **kw)
    fused = sp.prune(model, variables, x[:40], fused_pass=True, **kw)
    assert seen == [False, True]  # one cached pass per prune call, fused in the second
    for a, b in zip(jax.tree_util.tree_leaves(plain.masks), jax.tree_util.tree_leaves(fused.masks)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("method", ["sipp", "sipp_rand", "pfp"])
def test_iterative_pruning_keeps_pruned_weights_pruned(method):
    model, variables = trained_mlp()
    x, _ = digits()
    dense = sp.count_params(variables["params"])
    first = sp.prune(model, variables, x[1400:1464], method=method, keep_ratio=0.5, key=jax.random.PRNGKey(0))
    second = sp.prune(
        model, {"params": first.params}, x[1400:1464], method=method, keep_ratio=0.2,
        key=jax.random.PRNGKey(1), reference_size=dense,
    )
    tol = 0.001 if second.info["reachable"] else _granule(second, variables)
    assert abs(second.keep_ratio - 0.2) <= tol
    for m1, m2 in zip(jax.tree_util.tree_leaves(first.masks), jax.tree_util.tree_leaves(second.masks)):
        assert not np.any(np.asarray(m2) & ~np.asarray(m1))


def test_pfp_prunes_whole_channels_and_propagates():
    model, variables = trained_mlp()
    x, _ = digits()
    res = sp.prune(model, variables, x[1400:1464], method="pfp", keep_ratio=0.4)
    names = list(res.layer_kept)
    for i, name in enumerate(names):
        m = np.asarray(res.masks[name]["kernel"])
        rows_kept = m.any(axis=1)
        # Whole input channels: every kept column pattern is all-or-nothing per input row,
        # except for output filters removed by propagation.
        filters = m.any(axis=0)
        np.testing.assert_array_equal(m, rows_kept[:, None] & filters[None, :])
        if i + 1 < len(names):
            consumer = np.asarray(res.masks[names[i + 1]]["kernel"]).any(axis=1)
            # A filter survives exactly when its consumer kept the channel.
            np.testing.assert_array_equal(filters, consumer)
    # The first layer reads the model input: its input channels are protected.
    first = np.asarray(res.masks[names[0]]["kernel"])
    alive_inputs = np.asarray(variables["params"][names[0]]["kernel"]).any(axis=1)
    np.testing.assert_array_equal(first.any(axis=1), alive_inputs)


def test_bad_inputs_raise_clear_errors():
    model, variables = trained_mlp()
    x, _ = digits()
    pts = x[:8]
    for bad in (0.0, -0.1, 1.5, float("nan"), "half"):
        with pytest.raises(ValueError, match="keep_ratio"):
            sp.prune(model, variables, pts, method="sipp", keep_ratio=bad)
    with pytest.raises(ValueError, match="unknown method 'nope'.*sipp"):
        sp.prune(model, variables, pts, method="nope", keep_ratio=0.5)
    with pytest.raises(ValueError, match="key"):
        sp.prune(model, variables, pts, method="sipp_rand", keep_ratio=0.5)
    with pytest.raises(ValueError, match="params"):
        sp.prune(model, variables["params"], pts, method="sipp", keep_ratio=0.5)
    with pytest.raises(ValueError, match="data"):
        sp.prune(model, variables, pts[:0], method="sipp", keep_ratio=0.5)
    other = MLP(widths=(7,)).init(jax.random.PRNGKey(0), pts[:1])
    with pytest.raises(ValueError, match="variables do not match the model MLP"):
        sp.prune(model, other, pts, method="sipp", keep_ratio=0.5)


def test_keep_ratio_one_keeps_everything():
    model, variables = trained_mlp()
    x, _ = digits()
    res = sp.prune(model, variables, x[:16], method="sipp", keep_ratio=1.0)
    assert res.keep_ratio == pytest.approx(1.0)
    assert all(bool(np.all(m)) for m in jax.tree_util.tree_leaves(res.masks))
