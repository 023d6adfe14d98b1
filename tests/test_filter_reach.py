"""Filter methods reach the keep ratio (issues #15/#19): within the tolerance, or
``reachable=False`` with a size no nearby budget beats."""

import jax
import numpy as np
import pytest

import sensprune as sp
from experiments.models.scanned_lm import ScannedLM
from sensprune import boxing, counting, registry, zeroing
from sensprune.context import PruneContext
from sensprune.methods import thinet
from sensprune.prune import search_selection
from tests.fixtures import CNN, MLP, digits, np_init

RTOL = 0.005
FILTER_METHODS = ["ft", "softnet", "uniform_filters", "pfp", "pfp_rand", "pfp_top", "thinet"]


def _additive(costs, total):
    """Kept size = total minus the cost of each removal (a reference size model)."""
    return lambda removals: total - sum(costs[step] for step in removals)


def test_fill_schedule_skips_a_coarse_step_and_fills_with_later_ones():
    schedule = [("a", 0), ("h", 0), ("a", 1), ("h", 1), ("a", 2), ("a", 3)]
    costs = {("a", 0): 10, ("h", 0): 100, ("a", 1): 10, ("h", 1): 100, ("a", 2): 10, ("a", 3): 10}
    size_of = _additive(costs, 1000)
    # the prefix would stop after ("h", 0) at 890, 80 under the budget; "h" stays, "a" goes on
    assert thinet.fill_schedule(size_of, schedule, 970, slack=5) == ([("a", 0), ("a", 1), ("a", 2)], ["h"])
    # within the slack the prefix stands, so the layers keep one fraction
    assert thinet.fill_schedule(size_of, schedule, 970, slack=100) == ([("a", 0), ("h", 0)], [])
    assert thinet.fill_schedule(size_of, schedule, 2000, slack=5) == ([], [])


@pytest.mark.parametrize("seed", range(4))
def test_fill_schedule_never_worse_than_the_prefix(seed):
    rng = np.random.default_rng(seed)
    schedule = [(f"l{i % 3}", i) for i in range(30)]
    costs = {step: int(c) for step, c in zip(schedule, rng.choice([1, 2, 40], 30))}
    size_of = _additive(costs, 500)
    for budget in rng.integers(0, 500, 10):
        prefix = next((schedule[:m] for m in range(31) if size_of(schedule[:m]) <= budget), schedule)
        got, frozen = thinet.fill_schedule(size_of, schedule, int(budget), slack=2)
        assert set(frozen) <= {name for name, _ in schedule}
        assert len(set(got)) == len(got) and set(got) <= set(schedule)
        if size_of(prefix) <= budget:
            assert size_of(prefix) <= size_of(got) <= budget


def _lm():
    model = ScannedLM(vocab=16, dim=16, depth=2, heads=2, mlp_dim=32, max_len=8)
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (12, 8), 0, 16))
    return model, boxing.unbox_variables(model.init(jax.random.PRNGKey(0), tokens[:1])), tokens, tokens


def _net(net):
    x, y = digits()
    return net, np_init(net, x[:1]), x[:64], y[:64]


def _size(ctx, spec, budget):
    """Achieved size of one budget, counted as the search counts it (a second, direct path)."""
    alive = ctx.alive()
    fixed = counting.count_nonzero(ctx.params) - int(sum(int(a.sum()) for a in alive.values()))
    sel = zeroing.apply(ctx, spec.select(ctx, budget, jax.random.PRNGKey(0)), structured=spec.structured)
    return fixed - zeroing.zeroed_other(sel) + int(sum(sel.layer_size(name) for name in sel.masks))


def _check(ctx, methods, targets):
    ref = counting.count_params(ctx.params)
    kernel = int(sum(int(a.sum()) for a in ctx.alive().values()))
    reached = {}
    for method in methods:
        spec = registry.get_method(method)
        for keep in targets:
            target = keep * ref
            _, budget, size, ok, _ = search_selection(ctx, spec, target, jax.random.PRNGKey(0), rtol=RTOL)
            reached[method, keep] = ok
            if ok:
                assert abs(size - target) <= RTOL * target, (method, keep, size / ref)
                continue
            # unreachable: no budget around the chosen one gets closer (nor within the tolerance)
            for step in (-64, -16, -4, -1, 1, 4, 16, 64):
                other = _size(ctx, spec, int(np.clip(budget + step, 0, kernel)))
                assert abs(other - target) >= abs(size - target), (method, keep, step, other / ref, size / ref)
    return reached


@pytest.mark.parametrize("net", [MLP(), CNN()], ids=["mlp", "cnn"])
def test_filter_methods_reach_the_target_or_say_it_is_too_coarse(net):
    model, variables, x, y = _net(net)
    ctx = PruneContext(model=model, variables=variables, layers=sp.find_layers(model, variables, x[:1]), data=x,
                       labels=y)
    _check(ctx, FILTER_METHODS, (0.5, 0.7))


def test_lm_filter_methods_reach_the_target_or_say_it_is_too_coarse():
    model, variables, tokens, labels = _lm()
    ctx = PruneContext(model=model, variables=variables, layers=sp.find_layers(model, variables, tokens[:1]),
                       data=tokens, labels=labels)
    reached = _check(ctx, ["thinet", "pfp_rand", "pfp_top"], (0.6, 0.7))
    # thinet used to stop at 0.5514 / 0.6511: one fraction for all layers drops both heads at once
    assert reached["thinet", 0.6] and reached["thinet", 0.7]


def test_removal_schedule_keeps_one_fraction_up_to_a_channel():
    from types import SimpleNamespace

    sizes = {"a": 5, "b": 8, "c": 13, "p": 4}
    ctx = SimpleNamespace(layers=[SimpleNamespace(name=n, order=i) for i, n in enumerate(sizes)])
    live = {n: np.ones(k, bool) for n, k in sizes.items()}
    live["b"][3] = False  # a dead channel is never scheduled
    orders = {n: np.flatnonzero(live[n])[::-1] for n in sizes}
    schedule = thinet.removal_schedule(ctx, orders, live, protected={"p"})
    assert len(schedule) == sum(int(m.sum()) - 1 for n, m in live.items() if n != "p")
    for m in range(len(schedule) + 1):
        keep = thinet._keep_after(live, schedule[:m])
        assert keep["p"].all() and not keep["b"][3]
        kept = {n: int(keep[n].sum()) for n in ("a", "b", "c")}
        n_live = {n: int(live[n].sum()) for n in kept}
        assert min(kept.values()) >= 1
        assert max((kept[n] - 1) / n_live[n] for n in kept) <= min((kept[n] + 1) / n_live[n] for n in kept)
    for name in ("a", "b", "c"):  # each layer's removals follow its own order
        assert [c for n, c in schedule if n == name] == list(orders[name][:-1])
