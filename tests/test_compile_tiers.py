"""Two compile tiers (sensprune.compile_tiers): which build runs when, and that both builds agree bit for bit."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sensprune as sp
from sensprune import compile_tiers, sensitivity, zeroing
from sensprune.adapter import as_adapter
from sensprune.compile_tiers import LIGHT, QUICK, TieredJit
from tests.fixtures import Compiles

pytestmark = pytest.mark.skipif(not compile_tiers.tiered_backend(), reason="quick builds are used on a CPU only")


def _poly(x, *, power):
    return jnp.sum(jnp.sin(x) ** power, axis=0) / (1.0 + jnp.cos(x).max())


def test_first_calls_run_the_quick_build_then_the_full_one():
    tiered = TieredJit(_poly, static_argnames=("power",), promote_after=2)
    x = jnp.linspace(-2.0, 3.0, 12).reshape(4, 3)
    builds = [tiered.build(x, power=3) is tiered.quick]
    outs = []
    with Compiles() as compiles:
        for _ in range(4):
            outs.append(np.asarray(tiered(x, power=3)))
            builds.append(tiered.build(x, power=3) is tiered.quick)
    assert builds == [True, True, False, False, False]  # calls 1-2 quick, 3-4 full
    assert compiles.names == ["jit(_poly)", "jit(_poly)"]  # each build compiled once,
    assert compiles.threads[1].startswith("sensprune-tiers")  # the full one in the background from call 2
    assert all(np.array_equal(outs[0], o) for o in outs[1:])
    # a new specialisation (another static value, another shape) starts on its quick build again
    assert tiered.build(x, power=2) is tiered.quick
    assert tiered.build(x[:2], power=3) is tiered.quick
    tiered.promote()
    assert tiered.build(x, power=3) is tiered.full and tiered.build(x[:2], power=3) is tiered.quick


def test_settle_promotes_every_specialisation_seen():
    tiered = TieredJit(_poly, static_argnames=("power",), promote_after=100)
    x = jnp.ones((2, 2))
    tiered(x, power=1)
    assert tiered.build(x, power=1) is tiered.quick
    compile_tiers.settle()
    assert tiered.build(x, power=1) is tiered.full


def test_disabled_tiers_always_run_the_full_build(monkeypatch):
    monkeypatch.setattr(compile_tiers, "ENABLED", False)
    tiered = TieredJit(_poly, static_argnames=("power",), promote_after=5)
    assert tiered.build(jnp.ones(3), power=1) is tiered.full


def test_promote_after_must_be_nonnegative():
    with pytest.raises(ValueError, match="promote_after"):
        TieredJit(_poly, promote_after=-1)
    with pytest.raises(ValueError, match="compile_ahead"):
        TieredJit(_poly, promote_after=2, compile_ahead=3)


class _Net(nn.Module):
    """Two bucketed convs (signed input), a grouped conv (its own kernel program) and a dense head."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(6, (3, 3))(x))
        x = nn.relu(nn.Conv(6, (3, 3), strides=2)(x))
        x = nn.tanh(nn.Conv(6, (3, 3), feature_group_count=2)(x))
        return nn.Dense(4)(x.reshape(x.shape[0], -1))


def _steps(promote_after: int) -> dict:
    """The pass's programs, re-made with every specialisation on one build (0: full, huge: quick)."""
    def remake(name, options=QUICK):
        old = getattr(sensitivity, name)
        return TieredJit(old.__wrapped__, static_argnames=old.static_argnames, quick_options=options,
                         promote_after=promote_after)

    steps = {name: remake(name, LIGHT) for name in ("_bucket_step", "_ratio_step", "_layer_step")}
    steps["_cached_signed_capture"] = remake("_cached_signed_capture")
    return steps


@pytest.mark.parametrize("reduction", ["mean", "max"])
def test_quick_and_full_builds_agree(monkeypatch, reduction):
    """Same operations; XLA may order a dot's sums differently per build (last bits, as between XLA
    versions), so sensitivities agree to 1e-6 and the masks sp.prune selects are the same."""
    model = _Net()
    x = np.random.default_rng(0).normal(size=(9, 9, 9, 3)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), x[:1])
    results, masks = {}, {}
    for tier, promote_after in (("quick", 10**9), ("full", 0)):
        steps = _steps(promote_after)
        for name, step in steps.items():
            monkeypatch.setattr(sensitivity, name, step)
        calls = {name: (step.full._cache_size(), step.quick._cache_size()) for name, step in steps.items()}
        results[tier] = jax.device_get(sp.compute_sensitivities(model, variables, x, reduction=reduction, chunk_size=4))
        for name, step in steps.items():  # the other build got no new entry (jit caches are per options)
            other = step.full if tier == "quick" else step.quick
            assert other._cache_size() == calls[name][0 if tier == "quick" else 1], (name, tier)
        method = "sipp" if reduction == "mean" else "pfp"
        masks[tier] = sp.prune(model, variables, x, method=method, keep_ratio=0.4, chunk_size=4).masks
    for layer, quick in results["quick"].items():
        check = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=0)
        check(np.asarray(quick.weight), np.asarray(results["full"][layer].weight))
        check(np.asarray(quick.channel), np.asarray(results["full"][layer].channel))
    jax.tree.map(np.testing.assert_array_equal, masks["quick"], masks["full"])


def test_quick_and_full_zeroing_gradients_agree():
    model = _Net()
    x = np.random.default_rng(1).normal(size=(5, 9, 9, 3)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(1), x[:1])
    adapter = as_adapter(model, None, {})
    program = zeroing._abs_grad
    args = (variables, variables["params"], x, np.zeros(5, np.int32), np.int32(0))
    kw = dict(adapter=adapter, loss_fn=None)
    quick = jax.device_get(program.quick(*args, **kw))
    full = jax.device_get(program.full(*args, **kw))
    jax.tree.map(np.testing.assert_array_equal, quick, full)
    assert any(np.any(leaf == 0) or np.all(leaf > 0) for leaf in jax.tree.leaves(quick))
