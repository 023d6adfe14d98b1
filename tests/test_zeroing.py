"""Data-dependent zeroing (issue #16, item 1): parameters of exactly zero gradient over S go."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sensprune as sp
from experiments.models import get_model
from sensprune import points, zeroing
from sensprune.context import PruneContext
from sensprune.prune import default_loss
from tests.fixtures import np_init


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(5, name="d0")(x.reshape(x.shape[0], -1)))
        x = nn.relu(nn.Dense(4, name="d1")(x))
        return nn.Dense(3, name="d2")(x)


def _tiny():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 6)).astype(np.float32)
    x[:, 2] = 0.0  # an input channel that is zero on every point of S
    model = Tiny()
    variables = np_init(model, x[:1])
    params = jax.tree.map(np.array, variables["params"])
    params["d0"]["bias"][1] = -100.0  # unit 1 of d0: a dead ReLU on S
    params["d1"]["kernel"][:, 3] = 0.0  # unit 3 of d1: no input left, bias 0 -> relu(0) = 0
    params["d1"]["bias"][3] = -0.5
    variables = {"params": jax.tree.map(jnp.asarray, params)}
    return model, variables, x


def _ctx(model, variables, x, labels=None):
    layers = sp.find_layers(model, variables, points.take(x, 0, 1))  # x: any pytree of points
    return PruneContext(model=model, variables=variables, layers=layers, data=x, loss_fn=default_loss,
                        labels=labels, chunk_size=5)


@pytest.mark.parametrize("with_labels", [False, True])
def test_dead_params_match_jax_grad(with_labels):
    model, variables, x = _tiny()
    y = np.arange(x.shape[0]) % 3
    dead = zeroing.dead_params(_ctx(model, variables, x, y if with_labels else None), variables["params"])
    grad = jax.grad(lambda p: default_loss(model.apply({"params": p}, x), y))(variables["params"])
    for d, g in zip(jax.tree.leaves(dead), jax.tree.leaves(grad)):
        np.testing.assert_array_equal(d, np.asarray(g) == 0)
    d0, d1, d2 = dead["d0"], dead["d1"], dead["d2"]
    assert d0["kernel"][2].all() and d0["kernel"][:, 1].all() and d0["bias"][1]  # zero input, dead unit
    assert d1["kernel"][1].all()  # reads the dead unit
    assert d1["bias"][3] and d2["kernel"][3].all()  # unit without input: dead, its readers see zeros
    assert not d2["bias"].any()


def test_dead_params_match_finite_differences():
    model, variables, x = _tiny()
    y = np.arange(x.shape[0]) % 3
    dead = zeroing.dead_params(_ctx(model, variables, x), variables["params"])
    k = np.asarray(variables["params"]["d0"]["kernel"], np.float64)

    def loss(kernel):
        p = dict(variables["params"], d0=dict(variables["params"]["d0"], kernel=jnp.asarray(kernel, jnp.float32)))
        return float(default_loss(model.apply({"params": p}, x), y))

    for i, j in [(2, 0), (0, 1), (3, 1), (0, 0), (4, 3)]:
        e = np.zeros_like(k)
        e[i, j] = 1e-2
        moved = loss(k + e) != loss(k - e)
        assert moved == (not dead["d0"]["kernel"][i, j]), (i, j)


@pytest.fixture(scope="module")
def lenet_dead_units():
    """LeNet300-100 whose first 100 hidden units are dead ReLUs on S (large negative biases)."""
    model = get_model("lenet300_100", num_classes=10)
    x = np.random.default_rng(1).standard_normal((128, 28, 28, 1)).astype(np.float32)
    variables = np_init(model, x[:1])
    params = jax.tree.map(np.array, variables["params"])
    params["linear0"]["bias"][:100] = -1e3
    return model, {"params": jax.tree.map(jnp.asarray, params)}, x


def _zero_grad_kept(model, variables, x, params):
    """Kept kernel entries whose loss gradient over S is exactly zero, per layer (direct jax.grad)."""
    y = np.zeros(x.shape[0], np.int32)
    g = jax.grad(lambda p: default_loss(model.apply({"params": p}, x), y))(params)
    return [int(np.sum((np.asarray(params[n]["kernel"]) != 0) & (np.asarray(g[n]["kernel"]) == 0)))
            for n in ("linear0", "linear1", "linear2")]


def test_sipp_zeroing_reallocates_budget_on_lenet(lenet_dead_units):
    model, variables, x = lenet_dead_units
    off = sp.prune(model, variables, x, method="sipp", keep_ratio=0.1, zero_dead=False)
    on = sp.prune(model, variables, x, method="sipp", keep_ratio=0.1, zero_dead=True)
    assert off.info["reachable"] and on.info["reachable"]
    assert on.keep_ratio == pytest.approx(0.1, rel=0.005)  # the zeroed budget is re-spent
    # Without zeroing, SiPP spends budget on the dead units' inputs (their bias-free shares are positive).
    dead_off = _zero_grad_kept(model, variables, x, off.params)
    assert dead_off[0] > 1000
    assert _zero_grad_kept(model, variables, x, on.params) == [0, 0, 0]
    assert not np.asarray(on.params["linear0"]["kernel"])[:, :100].any()
    assert not np.asarray(on.params["linear0"]["bias"])[:100].any()  # biases of dead units go as well
    assert not np.asarray(on.masks["linear0"]["bias"])[:100].any()
    # The freed budget goes to entries that matter: more kept entries into live units.
    live_on = int(np.sum(np.asarray(on.params["linear0"]["kernel"])[:, 100:] != 0))
    live_off = int(np.sum(np.asarray(off.params["linear0"]["kernel"])[:, 100:] != 0))
    assert live_on + sum(v for k, v in on.layer_kept.items() if k != "linear0") > (
        live_off + sum(v for k, v in off.layer_kept.items() if k != "linear0")
    )
    assert on.info["nominal_budget"] > off.info["nominal_budget"]
    assert on.info["zero_dead"]["kernel"] > 0 and off.info["zero_dead"] == {}


def test_pfp_zeroing_removes_dead_filters(lenet_dead_units):
    model, variables, x = lenet_dead_units
    on = sp.prune(model, variables, x, method="pfp", keep_ratio=0.2, zero_dead=True)
    assert _zero_grad_kept(model, variables, x, on.params) == [0, 0, 0]
    assert abs(on.keep_ratio - 0.2) <= 0.01


class TwoInputs(nn.Module):
    @nn.compact
    def __call__(self, a, b):
        h = nn.relu(nn.Dense(8, name="da")(a)) + nn.relu(nn.Dense(8, name="db")(b["x"]))
        return nn.Dense(3, name="out")(h)


def test_zeroing_with_tuple_and_dict_points_matches_jax_grad():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((12, 4)).astype(np.float32)
    a[:, 1] = 0.0  # zero on S: its entries have a zero gradient
    b = {"x": rng.standard_normal((12, 5)).astype(np.float32)}
    model = TwoInputs()
    variables = model.init(jax.random.PRNGKey(0), a[:1], {"x": b["x"][:1]})
    y = np.arange(12) % 3
    ctx = _ctx(model, variables, (a, b), y)
    dead = zeroing.dead_params(ctx, variables["params"])
    grad = jax.grad(lambda p: default_loss(model.apply({"params": p}, a, b), y))(variables["params"])
    for d, g in zip(jax.tree.leaves(dead), jax.tree.leaves(grad)):
        np.testing.assert_array_equal(d, np.asarray(g) == 0)
    assert dead["da"]["kernel"][1].all()
    res = sp.prune(model, variables, (a, b), method="sipp", keep_ratio=0.5, labels=y)  # zeroing on by default
    assert not np.asarray(res.params["da"]["kernel"])[1].any()
    assert res.info["zero_dead"]["kernel"] >= 0 and abs(res.keep_ratio - 0.5) <= 0.05


class Tokens(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(200, 16, name="embed")(tokens).mean(axis=1)
        return nn.Dense(4, name="head")(nn.relu(nn.Dense(32, name="hidden")(h)))


def test_zeroing_leaves_embedding_rows_unused_by_s():
    tokens = np.random.default_rng(4).integers(0, 20, (32, 6))  # S uses 20 of the 200 tokens
    model = Tokens()
    variables = model.init(jax.random.PRNGKey(0), tokens[:1])
    table = np.asarray(variables["params"]["embed"]["embedding"])
    res = sp.prune(model, variables, tokens, method="sipp", keep_ratio=0.9)
    np.testing.assert_array_equal(np.asarray(res.params["embed"]["embedding"]), table)
    assert np.asarray(res.masks["embed"]["embedding"]).all()
    assert res.keep_ratio == pytest.approx(0.9, rel=0.005)
    # the zero-gradient pattern of those rows is real; only the scope keeps them
    assert zeroing.dead_params(_ctx(model, variables, tokens), variables["params"])["embed"]["embedding"][20:].all()


class WhileLooped(nn.Module):
    """A prunable head after a dense layer inside ``nn.while_loop`` (no reverse-mode gradient)."""

    def setup(self):
        self.loop = nn.Dense(8)
        self.head = nn.Dense(3)

    def __call__(self, x):
        if self.is_initializing():
            self.loop(x)
        x, _ = nn.while_loop(lambda mdl, c: c[1] < 2, lambda mdl, c: (nn.relu(mdl.loop(c[0])), c[1] + 1), self, (x, 0))
        return self.head(x)


def test_zeroing_is_skipped_with_the_reason_when_the_model_cannot_be_differentiated(caplog):
    x = np.random.default_rng(5).standard_normal((16, 8)).astype(np.float32)
    model = WhileLooped()
    variables = model.init(jax.random.PRNGKey(0), x[:1])
    with caplog.at_level("WARNING"):
        res = sp.prune(model, variables, x, method="sipp", keep_ratio=0.8)
    reason = res.info["zero_dead"]["skipped"]
    assert "while_loop" in reason and set(res.info["zero_dead"]) == {"skipped"}
    assert sum("zero_dead skipped" in r.getMessage() for r in caplog.records) == 1  # once, not per budget
    off = sp.prune(model, variables, x, method="sipp", keep_ratio=0.8, zero_dead=False)
    assert off.info["zero_dead"] == {}
    for a, b in zip(jax.tree.leaves(res.masks), jax.tree.leaves(off.masks)):
        np.testing.assert_array_equal(a, b)  # the selection is the method's own
    assert res.keep_ratio == pytest.approx(off.keep_ratio)


def test_zeroing_raises_faults_other_than_differentiation():
    model, variables, x = _tiny()

    def broken(out, y):
        raise RuntimeError("loss bug")

    ctx = _ctx(model, variables, x, np.arange(x.shape[0]) % 3)
    ctx = PruneContext(model=model, variables=variables, layers=ctx.layers, data=x, loss_fn=broken,
                       labels=ctx.labels, chunk_size=5)
    with pytest.raises(RuntimeError, match="loss bug"):
        zeroing.dead_params(ctx, variables["params"])
