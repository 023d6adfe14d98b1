"""Acceptance of issue #16, item 1: with the reference's zeroing on (the default), ``sp.prune`` keeps the
per-layer counts of the reference's allocation + zeroing at the same budget (LeNet300-100, SiPP and PFP).

The reference side is a slow NumPy re-implementation from the spec (torchprune_reference.md §1.2, §1.3,
§1.5): SiPP's global top-B; PFP's per-layer sample complexity with one global epsilon (scipy's bisection,
the reference's size formula ``in_l * min(in_{l+1}, out_l)``) and top channels; then [tp]'s zeroing of
every parameter whose loss gradient over S is exactly zero, with a hand-written float64 backward pass.
Only the sensitivities come from sensprune (they match the reference elsewhere).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

import sensprune as sp
from experiments.models import get_model
from sensprune import registry, zeroing
from sensprune.context import PruneContext
from sensprune.prune import _pruned_params, default_loss
from tests.fixtures import np_init

NAMES = ("linear0", "linear1", "linear2")
DELTA, C = 1e-16, 3.0


@pytest.fixture(scope="module")
def lenet():
    """LeNet300-100 with dead ReLU units in both hidden layers and blank border pixels, 128 labelled points."""
    rng = np.random.default_rng(5)
    x = rng.random((128, 28, 28, 1)).astype(np.float32)
    x[:, :3] = 0.0  # pixels that are zero on every point of S
    y = rng.integers(0, 10, 128)
    model = get_model("lenet300_100", num_classes=10)
    variables = np_init(model, x[:1], seed=3)
    params = jax.tree.map(np.array, variables["params"])
    params["linear0"]["bias"][:60] = -1e3
    params["linear1"]["bias"][::5] = -1e3
    return model, {"params": jax.tree.map(jnp.asarray, params)}, x, y


def _grads(params: dict, x: np.ndarray, y: np.ndarray) -> dict:
    """Loss gradients (mean softmax cross-entropy) of every kernel and bias, float64 backprop by hand."""
    h = [x.reshape(len(x), -1).astype(np.float64)]
    z = []
    for i, n in enumerate(NAMES):
        z.append(h[-1] @ np.asarray(params[n]["kernel"], np.float64) + np.asarray(params[n]["bias"], np.float64))
        if i < 2:
            h.append(np.maximum(z[-1], 0.0))
    p = np.exp(z[-1] - z[-1].max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    d = (p - np.eye(10)[y]) / len(x)
    out = {}
    for i in (2, 1, 0):
        n = NAMES[i]
        out[n] = {"kernel": h[i].T @ d, "bias": d.sum(axis=0)}
        if i:
            d = (d @ np.asarray(params[n]["kernel"], np.float64).T) * (z[i - 1] > 0)
    return out


def _zeroed_counts(params: dict, masks: dict, x, y, structured: bool) -> tuple[list[int], int]:
    """[tp]'s zeroing on the pruned net: per-layer kept kernel entries and the model's nonzero size
    (filter methods: the first layer's input channels stay, as ``protect_input_channels``)."""
    pruned = {n: {"kernel": np.asarray(params[n]["kernel"]) * masks[n], "bias": np.asarray(params[n]["bias"])}
              for n in NAMES}
    g = _grads(pruned, x, y)
    counts, size = [], 0
    for n in NAMES:
        keep = masks[n].copy()
        live = keep & (g[n]["kernel"] != 0)
        if structured:  # whole filters / input channels whose kept entries all have a zero gradient
            channels = live.any(axis=1) | (n == NAMES[0])
            keep &= channels[:, None] & live.any(axis=0)[None, :]
        else:
            keep = live
        bias = np.where(g[n]["bias"] == 0, 0.0, pruned[n]["bias"])
        counts.append(int(keep.sum()))
        size += int(keep.sum()) + int(np.count_nonzero(bias))
    return counts, size


def _sipp_masks(sens: dict, budget: int) -> dict:
    """SiPPAllocator: the global top-B of all layers' weight sensitivities."""
    flat = np.concatenate([np.asarray(sens[n].weight, np.float64).ravel() for n in NAMES])
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-flat, kind="stable")[:budget]] = True
    out, start = {}, 0
    for n in NAMES:
        shape = np.shape(sens[n].weight)
        out[n] = keep[start:start + int(np.prod(shape))].reshape(shape)
        start += int(np.prod(shape))
    return out


def _pfp_channels(sens: dict, eps: float) -> list[int]:
    """Kept input channels per layer at epsilon (PFPRandAllocator, Dense layers: P = 1, kappa = 1).

    The first layer keeps its input channels, our documented deviation (``protect_input_channels``,
    the default; the pixels of a flattened image are one channel group of the model input here).
    """
    alpha = 2 * C * np.log(8 * 2 * 1 / DELTA)
    kept = [np.shape(sens[NAMES[0]].channel)[0]]
    for n in NAMES[1:]:
        s = np.asarray(sens[n].channel, np.float64)
        coef = alpha * s.sum()
        with np.errstate(over="ignore", divide="ignore"):  # eps -> 0: unbounded samples
            m = min(max(1.0, np.ceil(3 * (6 + 2 * eps) * coef / eps**2)), 1e300)
        u = np.ceil(np.sum(1 - (1 - s / s.sum()) ** m) - 1e-9)
        kept.append(int(min(u, s.size)))
    return kept


def _pfp_masks(sens: dict, budget: int) -> dict:
    outs = [np.shape(sens[n].weight)[1] for n in NAMES]

    def size(log_eps: float) -> float:
        ins = _pfp_channels(sens, float(np.exp(log_eps)))
        return sum(ins[i] * (min(ins[i + 1], outs[i]) if i < 2 else outs[i]) for i in range(3))

    root = optimize.bisect(lambda t: size(t) - budget - 0.5, np.log(1e-300), np.log(1e150), xtol=1e-12)
    log_eps = root + 1e-11  # the side of the step where the size meets the budget
    assert size(log_eps) <= budget
    ins = _pfp_channels(sens, float(np.exp(log_eps)))
    chosen = []
    for n, k in zip(NAMES, ins):
        s = np.asarray(sens[n].channel, np.float64)
        c = np.zeros(s.size, bool)
        c[np.argsort(-s, kind="stable")[:k]] = True
        chosen.append(c)
    filters = chosen[1:] + [np.ones(10, bool)]  # a filter goes with its consumer's input channel
    return {n: chosen[i][:, None] & filters[i][None, :] for i, n in enumerate(NAMES)}


@pytest.mark.parametrize("keep", [0.1, 0.5])
@pytest.mark.parametrize("method", ["sipp", "pfp"])
def test_prune_follows_reference_allocation_with_zeroing(lenet, method, keep):
    model, variables, x, y = lenet
    res = sp.prune(model, variables, x, method=method, keep_ratio=keep, labels=y)
    assert res.info["reachable"] and res.keep_ratio == pytest.approx(keep, rel=0.005)
    budget = int(res.info["nominal_budget"])
    structured = method == "pfp"
    sens = sp.compute_sensitivities(model, variables, x, reduction="max" if structured else "mean")
    masks = (_pfp_masks if structured else _sipp_masks)(sens, budget)
    counts, size = _zeroed_counts(variables["params"], masks, x, y, structured)
    assert [res.layer_kept[n] for n in NAMES] == counts
    assert sp.count_nonzero(res.params) == size
    if not structured:  # the zeroing mattered: entries into dead units were selected, then freed
        assert res.info["zero_dead"]["kernel"] > 0 and sum(counts) < budget
        assert res.info["zero_dead"]["other"] >= 60  # the dead units' biases
    off = sp.prune(model, variables, x, method=method, keep_ratio=keep, labels=y, zero_dead=False)
    assert off.info["zero_dead"] == {}
    if not structured:  # without zeroing the search spends less nominal budget for the same size
        assert off.info["nominal_budget"] < budget


def test_zeroing_removes_exactly_the_zero_gradient_entries(lenet):
    """Direct check: at one budget, zeroing removes exactly the kept kernel entries and the nonzero
    biases whose loss gradient (jax.grad) on the selection's pruned net is zero."""
    model, variables, x, y = lenet
    ctx = PruneContext(model=model, variables=variables, layers=sp.find_layers(model, variables, x[:1]), data=x,
                       labels=y, loss_fn=default_loss, chunk_size=32)
    sel = registry.get_method("sipp").select(ctx, 20000, None)
    pruned = _pruned_params(variables["params"], ctx.layers, sel)
    g = jax.grad(lambda p: default_loss(model.apply({"params": p}, x), y))(pruned)
    zeroed = zeroing.apply(ctx, sel)
    record = zeroed.info["zero_dead"]
    for n in NAMES:
        zero = np.asarray(g[n]["kernel"]) == 0
        np.testing.assert_array_equal(zeroed.masks[n], sel.masks[n] & ~zero)
        np.testing.assert_array_equal(record["dead"][n]["bias"], np.asarray(g[n]["bias"]) == 0)
    gone = sum(int(np.sum(sel.masks[n] & (np.asarray(g[n]["kernel"]) == 0))) for n in NAMES)
    assert record["kernel"] == gone > 0
    assert record["other"] == sum(
        int(np.count_nonzero(np.asarray(pruned[n]["bias"])[np.asarray(g[n]["bias"]) == 0])) for n in NAMES
    ) >= 60
