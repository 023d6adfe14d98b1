"""Empirical checks of what the sampling methods promise.

- Unbiasedness: averaged over many keys, the reweighted kernels of sipp_rand
  equal the original kernels (entry-wise z-test).
- Error guarantee: on a trained MLP, each (sign, unit) row's relative error of
  its same-sign, bias-free pre-activation stays within the epsilon the
  allocation promised on at least 1 - delta of held-out points.
"""

import jax
import numpy as np
import pytest

import sensprune as sp
from sensprune.methods import sipp
from tests.fixtures import digits, trained_mlp

DELTA = 0.05


def _split(a):
    """Input sign split into nonnegative pseudo-points, as the sensitivity pass does."""
    return np.concatenate([np.maximum(a, 0), np.maximum(-a, 0)], axis=0)


def test_sipp_rand_is_unbiased_over_keys():
    model, variables = trained_mlp()
    x, _ = digits()
    pts = x[1400:1464]
    layers = sp.find_layers(model, variables, pts[:1])
    ctx = sp.PruneContext(model=model, variables=variables, layers=layers, data=pts)
    name = layers[1].name
    budget = int(0.15 * sum(layer.kernel_size for layer in layers))
    w = np.asarray(variables["params"][name]["kernel"], np.float64)
    sens = np.asarray(ctx.sensitivities("max")[name].weight)
    kernels = []
    for k in jax.random.split(jax.random.PRNGKey(0), 200):
        sel = sipp.select_rand(ctx, budget, k)
        kernels.append(w * sel.masks[name] * sel.scales[name])
    kernels = np.stack(kernels)
    mean = kernels.mean(0)
    se = kernels.std(0) / np.sqrt(len(kernels))
    # 5-sigma per entry: a false alarm among ~1.5k entries has probability < 1e-3, while a
    # biased estimator (e.g. masking without reweighting) fails by tens of sigmas (checked below).
    # Entries with zero sensitivity contributed nothing on S and are never sampled, so the
    # estimator is unbiased on the sensitive entries only; the z-test needs enough hits per
    # entry for its standard error, so it looks at entries kept in at least 10 of 200 draws.
    sampled = (sens > 0) & ((kernels != 0).sum(0) >= 10)
    assert sampled.mean() > 0.5
    z = np.abs(mean - w)[sampled] / np.maximum(se[sampled], 1e-12)
    assert np.mean(z <= 5) >= 0.999, np.sort(z.ravel())[-5:]
    masked_mean = (kernels != 0).mean(0) * w
    assert np.mean(np.abs(masked_mean - w)[sampled] / np.maximum(se[sampled], 1e-12) > 5) > 0.2


@pytest.mark.parametrize("method", ["sipp_rand", "sipp_hybrid"])
def test_promised_epsilon_holds_on_held_out_points(method):
    model, variables = trained_mlp()
    x, _ = digits()
    s_points, held_out = x[1400:1528], x[1528:]
    res = sp.prune(
        model, variables, s_points, method=method, keep_ratio=0.35, key=jax.random.PRNGKey(7), delta=DELTA
    )
    inputs = sp.capture_inputs(model, variables, held_out)
    checked = 0
    for layer in sp.find_layers(model, variables, held_out[:1]):
        a = _split(np.asarray(inputs[layer.name], np.float64))
        w = np.asarray(variables["params"][layer.name]["kernel"], np.float64)
        w_hat = np.asarray(res.params[layer.name]["kernel"], np.float64)
        eps = np.asarray(res.info["epsilon"][layer.name])  # [2, out]
        within = []
        for sign, part in enumerate((w > 0, w < 0)):
            z = a @ np.where(part, w, 0.0)
            z_hat = a @ np.where(part, w_hat, 0.0)
            live = np.abs(z) > 1e-6
            rel = np.abs(z_hat - z) / np.where(live, np.abs(z), 1.0)
            within.append(np.where(live, rel <= eps[sign][None, :] + 1e-6, True))
        within = np.stack(within)
        frac = within.mean()
        checked += within.size
        assert frac >= 1 - DELTA, (layer.name, frac)
    assert checked > 1000
