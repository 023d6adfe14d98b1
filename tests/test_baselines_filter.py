"""Filter-pruning baselines: ft, softnet, uniform_filters (out mode) and thinet (in mode)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sensprune as sp
from sensprune import group_leftovers, zeroing
from sensprune.context import PruneContext
from sensprune.layers import find_layers
from sensprune.methods import filter_norm, random_pruning, thinet  # noqa: F401  (importing registers the methods)
from tests.fixtures import CNN, MLP, digits, mlp, np_init

FILTER_METHODS = ["ft", "softnet", "uniform_filters", "thinet"]


class Residual(nn.Module):
    """Dense_0 feeds Dense_1 *and* a skip connection; Dense_1 feeds only Dense_2."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(8)(x))
        h2 = nn.relu(nn.Dense(8)(h))
        return nn.Dense(3)(h + h2)


class ConvFlatten(nn.Module):
    channel_last_flatten: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = nn.BatchNorm(use_running_average=not train)(x)
        if not self.channel_last_flatten:
            x = x.transpose(0, 3, 1, 2)  # NCHW flatten: feature = c * HW + pos
        x = nn.relu(nn.Dense(6)(x.reshape(x.shape[0], -1)))
        return nn.Dense(3)(x)


def make_ctx(model, variables, data, **kw):
    layers = find_layers(model, variables, data[:1], **kw.get("apply_kwargs", {}))
    return PruneContext(model=model, variables=variables, layers=layers, data=data, **kw)


def kmask(res, name):
    return np.asarray(res.masks[name]["kernel"])


def test_registered_flags():
    for name in FILTER_METHODS:
        m = sp.get_method(name)
        assert m.structured and not m.needs_labels
        assert m.stochastic == (name == "uniform_filters")


def _one_fraction(kept: dict) -> bool:
    """Whether one fraction ``f`` gives every layer's kept filter count as ``max(1, round(f * n))``
    (``n`` its filters; ties either way): the counts a prefix of the removal schedule leaves
    (layers stopped at a coarse removal, ``info['frozen']``, are left out)."""
    lo = max([(k.sum() - 0.5) / k.size if k.sum() > 1 else 0.0 for k in kept.values()], default=0.0)
    hi = min([(k.sum() + 0.5) / k.size for k in kept.values()], default=1.0)
    return lo <= hi


def test_ft_removes_smallest_l1_filters_same_fraction_and_consumer_columns():
    model, variables = mlp()
    x, _ = digits()
    # The pure ft selection; zeroing (the default) keeps it channel-structured (checked below).
    res = sp.prune(model, variables, x[:64], method="ft", keep_ratio=0.4, zero_dead=False)
    zeroed = sp.prune(model, variables, x[:64], method="ft", keep_ratio=0.4)
    for name in zeroed.layer_kept:
        m = kmask(zeroed, name)
        np.testing.assert_array_equal(m, m.any(1)[:, None] & m.any(0)[None, :])
    names = list(res.layer_kept)
    assert res.info["skipped"] == {} and set(res.info["frozen"]) <= set(names[:-1])
    assert _one_fraction({n: kmask(res, n).any(0) for n in names[:-1] if n not in res.info["frozen"]})
    for i, name in enumerate(names):
        w = np.asarray(variables["params"][name]["kernel"])
        filters = kmask(res, name).any(axis=0)
        if i + 1 == len(names):
            assert filters.all()  # the model's outputs are never pruned
            continue
        l1 = np.abs(w).sum(0)
        assert l1[filters].min() > l1[~filters].max()
        rows = kmask(res, name).any(1)
        np.testing.assert_array_equal(kmask(res, name), rows[:, None] & filters[None, :])
        consumer = kmask(res, names[i + 1])
        assert not consumer[~filters].any()  # input rows of removed filters are zero
        assert consumer.any(1)[filters].all()
        assert np.all(np.asarray(res.params[names[i + 1]]["kernel"])[~filters] == 0)


def _l1_l2_model():
    """Dense_0 (6 -> 4) whose filters rank differently under L1 and L2, then Dense_1 (4 -> 3)."""
    model = MLP(widths=(4,), classes=3)
    variables = np_init(model, jnp.zeros((1, 6)), seed=0)
    k = np.full((6, 4), 0.01, np.float32)
    k[:, 0] = 0.5                    # L1 3.00, L2 1.22
    k[0, 1] = 2.0                    # L1 2.05, L2 2.00
    k[:, 2] = 0.3                    # L1 1.80, L2 0.73
    k[0, 3] = 1.0                    # L1 1.05, L2 1.00
    params = {**variables["params"], "Dense_0": {**variables["params"]["Dense_0"], "kernel": jnp.asarray(k)}}
    return model, {"params": params}


@pytest.mark.parametrize("keep, ft_kept, softnet_kept", [(1, [0], [1]), (3, [0, 1, 2], [0, 1, 3])])
def test_softnet_ranks_by_l2_ft_by_l1(keep, ft_kept, softnet_kept):
    model, variables = _l1_l2_model()
    data = np.random.default_rng(0).standard_normal((16, 6)).astype(np.float32)
    for select, expected in ((filter_norm.select_ft, ft_kept), (filter_norm.select_softnet, softnet_kept)):
        ctx = make_ctx(model, variables, data)
        sel = select(ctx, 9 * keep, None)  # k filters of Dense_0: 6k entries + k rows of Dense_1 (x3)
        np.testing.assert_array_equal(np.flatnonzero(sel.masks["Dense_0"].any(0)), expected)
        np.testing.assert_array_equal(np.flatnonzero(sel.masks["Dense_1"].any(1)), expected)
        assert sel.masks["Dense_1"].any(0).all()
        assert sum(int(m.sum()) for m in sel.masks.values()) == 9 * keep


def test_filters_feeding_a_skip_connection_are_left_dense():
    model = Residual()
    data = np.random.default_rng(0).standard_normal((32, 5)).astype(np.float32)
    variables = np_init(model, data[:1], seed=0)
    ctx = make_ctx(model, variables, data)
    # The jaxpr analysis (the one used by every filter method): Dense_0's filter j, Dense_1's
    # column j and filter j and Dense_2's column j share the stream channel j (h + h2).
    deps = ctx.dependencies()
    stream = deps.out_group["Dense_0"]
    assert len(set(stream.tolist())) == 8 and deps.removable[stream].all()
    for got in (deps.in_group["Dense_1"], deps.out_group["Dense_1"], deps.in_group["Dense_2"]):
        np.testing.assert_array_equal(got, stream)
    assert not deps.removable[deps.out_group["Dense_2"]].any()  # the model output
    res = sp.prune(model, variables, data, method="ft", keep_ratio=0.6)
    # Dense_0 and Dense_1 are summed into one stream (h + h2): a stream channel is
    # removed jointly (both filters, Dense_1's and Dense_2's columns) or not at all.
    removed = ~kmask(res, "Dense_2").any(1)
    assert removed.any() and not removed.all()
    np.testing.assert_array_equal(~kmask(res, "Dense_0").any(0), removed)
    np.testing.assert_array_equal(~kmask(res, "Dense_1").any(0), removed)
    np.testing.assert_array_equal(~kmask(res, "Dense_1").any(1), removed)
    # The removed channels contribute nothing: the physically smaller model agrees.
    shrunk = sp.shrink(model, variables, res.masks, x=data)
    assert shrunk.widths["Dense_1"] == (8 - removed.sum(), 8 - removed.sum())
    np.testing.assert_allclose(
        shrunk.apply(data), model.apply({"params": res.params}, data), rtol=1e-5, atol=1e-5
    )


def test_flatten_mapping_is_verified():
    x, _ = digits()
    data = x[:16]
    good = ConvFlatten()
    variables = np_init(good, data[:1], seed=0)
    ctx = make_ctx(good, variables, data, apply_kwargs={"train": False})
    deps = ctx.dependencies()
    # feature = position * C + channel: every position's feature c is in conv filter c's group.
    np.testing.assert_array_equal(
        deps.in_group["Dense_0"].reshape(64, 4), np.broadcast_to(deps.out_group["Conv_0"], (64, 4))
    )
    assert deps.removable[deps.out_group["Conv_0"]].all()
    # Half the filters: 2 of 4 conv filters (9 entries each), 3 of 6 Dense_0 units
    # reading 2 * 64 features, 3 rows of Dense_1.
    sel = filter_norm.select_ft(ctx, 9 * 2 + (2 * 64) * 3 + 3 * 3, None)
    kept = sel.masks["Conv_0"].reshape(-1, 4).any(0)
    assert kept.sum() == 2 and sel.masks["Dense_0"].any(0).sum() == 3
    dense_rows = sel.masks["Dense_0"].any(1).reshape(64, 4)  # feature = position * C + channel
    np.testing.assert_array_equal(dense_rows, np.broadcast_to(kept, (64, 4)))
    # A channel-first flatten moves the channels off the last axis, which the analysis does not
    # follow: all of Conv_0's filters fall into one group with Dense_0's features (a safe
    # over-approximation), so the conv layer is left dense.
    bad = ConvFlatten(channel_last_flatten=False)
    ctx = make_ctx(bad, np_init(bad, data[:1], seed=0), data, apply_kwargs={"train": False})
    deps = ctx.dependencies()
    assert len(set(deps.out_group["Conv_0"].tolist())) == 1
    assert set(deps.in_group["Dense_0"].tolist()) == set(deps.out_group["Conv_0"].tolist())
    sel = filter_norm.select_ft(ctx, 9 * 2 + (2 * 64) * 3 + 3 * 3, None)
    assert sel.masks["Conv_0"].reshape(-1, 4).any(0).all()


def test_uniform_filters_random_same_fraction_and_key_deterministic():
    model, variables = mlp()
    x, _ = digits()

    def run(seed):
        key = jax.random.PRNGKey(seed)
        return sp.prune(model, variables, x[:32], method="uniform_filters", keep_ratio=0.4, key=key, zero_dead=False)

    a, b, c = run(0), run(0), run(1)
    for name in ("Dense_0", "Dense_1"):
        np.testing.assert_array_equal(kmask(a, name), kmask(b, name))
    assert _one_fraction({n: kmask(a, n).any(0) for n in ("Dense_0", "Dense_1") if n not in a.info["frozen"]})
    assert any(not np.array_equal(kmask(a, n), kmask(c, n)) for n in ("Dense_0", "Dense_1"))
    assert kmask(a, "Dense_2").any(0).all()


# ----------------------------------------------------------------------------- ThiNet


def test_greedy_order_matches_brute_force_greedy():
    x = np.random.default_rng(0).standard_normal((50, 7))
    cand = np.array([1, 1, 0, 1, 1, 1, 1], bool)
    order = thinet.greedy_removal_order(x, cand)
    chosen, remaining = [], set(np.flatnonzero(cand))
    while remaining:
        best = min(sorted(remaining), key=lambda c: np.sum((x[:, chosen + [c]].sum(1)) ** 2))
        chosen.append(best)
        remaining.remove(best)
    np.testing.assert_array_equal(order, chosen)


class OneDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(x)


def test_thinet_removes_cancelling_pair_keeps_the_channel_that_matters():
    """Channels A (0) and B (1) cancel exactly; C (2) has the smallest weights but matters."""
    rng = np.random.default_rng(0)
    z, u = rng.standard_normal(64), rng.standard_normal(64)
    data = np.stack([z, -z, 100.0 * u], axis=1).astype(np.float32)
    model = OneDense()
    kernel = np.array([[1.0, 0.8], [1.0, 0.8], [0.1, 0.1]], np.float32)
    variables = {"params": {"Dense_0": {"kernel": jnp.asarray(kernel), "bias": jnp.array([0.3, -0.2])}}}
    ctx = make_ctx(model, variables, data, protect_input_channels=False)
    order = thinet.removal_orders(ctx)["Dense_0"]
    assert set(order[:2]) == {0, 1}  # the pair is removed first ...
    sel = thinet.select(ctx, 2, None)  # ... so keeping one channel keeps C
    np.testing.assert_array_equal(sel.masks["Dense_0"].any(1), [False, False, True])
    # Removing the pair leaves the output unchanged; removing C (what magnitude
    # pruning would drop) or keeping A (the inverted ranking) does not.
    def out(m):
        return np.asarray(model.apply({"params": {"Dense_0": {**variables["params"]["Dense_0"],
                                                                          "kernel": kernel * m}}}, data))
    ref = out(np.ones_like(kernel))
    np.testing.assert_allclose(out(sel.masks["Dense_0"]), ref, atol=1e-5)
    assert np.abs(out(np.array([[1], [1], [0]], np.float32)) - ref).max() > 1.0
    assert np.abs(out(np.array([[1], [0], [0]], np.float32)) - ref).max() > 0.5
    assert thinet.channel_ranks(ctx)["Dense_0"][2] == 2  # removed last = most important


def test_thinet_in_mode_protects_inputs_and_propagates():
    model, variables = mlp()
    x, _ = digits()
    res = sp.prune(model, variables, x[:64], method="thinet", keep_ratio=0.35)
    names = list(res.layer_kept)
    # The first layer reads the model input: its input channels are protected.
    first_inputs = np.asarray(variables["params"][names[0]]["kernel"]).any(1)
    np.testing.assert_array_equal(kmask(res, names[0]).any(1), first_inputs)
    low, high = [], []  # per layer, the fractions within a channel of what it keeps
    for i, name in enumerate(names):
        m = kmask(res, name)
        rows, filters = m.any(1), m.any(0)
        np.testing.assert_array_equal(m, rows[:, None] & filters[None, :])  # whole channels / filters
        if i > 0 and name not in res.info["frozen"]:  # frozen layers stop where the next channel is too coarse
            low.append((rows.sum() - 1) / m.shape[0])
            high.append((rows.sum() + 1) / m.shape[0])
        if i + 1 < len(names):  # a filter survives exactly when its consumer keeps the channel
            np.testing.assert_array_equal(filters, kmask(res, names[i + 1]).any(1))
    assert low and max(low) <= min(high)  # the others keep one fraction, up to a channel
    assert kmask(res, names[-1]).any(0).all()


# ----------------------------------------------------------------------------- end to end


def assert_hit_or_closest(res, model, variables, data, method, target, key, grid=17, **ctx_kw):
    """Within 0.5% of the target, or (unreachable) no nominal budget on a grid gets closer."""
    if res.info["reachable"]:
        assert abs(res.keep_ratio - target) <= 0.005 * target
        return
    ctx = make_ctx(model, variables, data, **ctx_kw)
    dense = sp.count_params(variables["params"])
    fixed = sp.count_nonzero(variables["params"]) - sum(int(a.sum()) for a in ctx.alive().values())
    plain = sp.get_method(method).select

    def select(c, b, k):  # sizes after the reference's zeroing and the removed groups' biases, as the search
        sel = plain(c, b, k)
        sel = zeroing.apply(c, sel, structured=True) if res.info["zero_dead"] else sel
        return group_leftovers.apply(c, sel)

    budgets = np.linspace(0.6, 1.4, grid) * (target * dense - fixed)
    sels = [select(ctx, int(b), key) for b in budgets]
    sizes = [fixed - zeroing.zeroed_other(sel) - group_leftovers.removed_other(sel)
             + sum(int(m.sum()) for m in sel.masks.values()) for sel in sels]
    assert min(sizes) < target * dense < max(sizes)
    assert abs(res.keep_ratio - target) <= min(abs(s / dense - target) for s in sizes) + 1e-12


@pytest.mark.parametrize("method", FILTER_METHODS)
def test_prune_hits_keep_ratio_or_closest(method):
    model, variables = mlp()
    x, _ = digits()
    target, key = 0.3, jax.random.PRNGKey(0)
    res = sp.prune(model, variables, x[:64], method=method, keep_ratio=target, key=key)
    sp.check_same_structure(variables["params"], res.masks)
    for p, m, p0 in zip(
        jax.tree_util.tree_leaves(res.params), jax.tree_util.tree_leaves(res.masks),
        jax.tree_util.tree_leaves(variables["params"]),
    ):
        p, m, p0 = np.asarray(p), np.asarray(m), np.asarray(p0)
        assert p.shape == m.shape and m.dtype == bool
        assert np.all(p[~m] == 0)
        np.testing.assert_array_equal(p[m], p0[m])  # no reweighting
    assert_hit_or_closest(res, model, variables, x[:64], method, target, key)


@pytest.mark.parametrize("method", ["ft", "thinet"])
def test_filter_methods_on_cnn_with_batchnorm(method):
    x, _ = digits()
    model = CNN()
    variables = np_init(model, x[:2], seed=1)
    kw = dict(apply_kwargs={"train": False}, chunk_size=16)
    res = sp.prune(model, variables, x[:32], method=method, keep_ratio=0.5, **kw)
    assert res.info.get("skipped", {}) == {}
    assert_hit_or_closest(res, model, variables, x[:32], method, 0.5, None, grid=9, **kw)
    out = model.apply({**variables, "params": res.params}, x[:4], train=False)
    assert np.all(np.isfinite(np.asarray(out)))
    # Whole filters are removed in the hidden conv layers, never the outputs of the last layer.
    assert kmask(res, "Dense_0").any(0).all()
    filters_kept = [kmask(res, f"Conv_{i}").any(axis=(0, 1, 2)) for i in range(3)]
    assert not all(f.all() for f in filters_kept)
