"""Physical shrinking (sensprune.shrink): PFP-pruned zoo models and a custom model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sensprune as sp
from experiments.models import get_model
from sensprune import dependencies as deps_lib
from tests.test_dependencies import CatRes

SMALL_VGG = (8, 8, "M", 16, 16, "M", 16, 16, 16, "M", 32, 32, 32, "M", 32, 32, 32, "M")
MODELS = {
    "resnet20": lambda: get_model("resnet20", 10, width=8),
    "bottleneck": lambda: get_model("resnet20", 10, block="bottleneck", width=4),
    "vgg16": lambda: get_model("vgg16_bn", 10, cfg=SMALL_VGG),
    "densenet22": lambda: get_model("densenet22", 10, growth_rate=6),
    "catres": CatRes,
}


def _setup(name, n=8):
    model = MODELS[name]()
    rng = np.random.default_rng(0)
    side = 32 if name == "vgg16" else 16  # VGG's five pools need 32 x 32; the others pool globally
    data = rng.standard_normal((n, side, side, 3)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), data[:1])
    # Non-trivial BatchNorm statistics and affine params, so that BN constants matter.
    stats = jax.tree_util.tree_map(
        lambda a: a + 0.5 * np.abs(rng.standard_normal(a.shape)).astype(np.float32), variables["batch_stats"]
    )
    params = jax.tree_util.tree_map(
        lambda a: a + (0.3 * rng.standard_normal(a.shape).astype(np.float32) if a.ndim == 1 else 0),
        variables["params"],
    )
    return model, {"params": params, "batch_stats": stats}, data


def _apply(model, variables, x):
    return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)


KEEP = {"resnet20": (0.6, 0.35), "bottleneck": (0.5,), "vgg16": (0.6, 0.3), "densenet22": (0.45,), "catres": (0.7, 0.4)}


@pytest.mark.parametrize("name", list(MODELS))
def test_pfp_shrunk_matches_masked_and_predicted_count(name):
    model, variables, data = _setup(name)
    deps = deps_lib.analyze(model, variables, data[:1], train=False)
    dense = sp.count_params(variables["params"])
    for keep in KEEP[name]:
        res = sp.prune(
            model, variables, data, method="pfp", keep_ratio=keep, chunk_size=8, apply_kwargs={"train": False}
        )
        shrunk = sp.shrink(model, variables, res.masks, deps=deps, check=False, train=False)
        predicted = sp.predict_param_count(deps, variables["params"], res.masks)
        assert sp.count_params(shrunk.params) == predicted < dense
        # Removed channels' biases and norm params are gone from the masked model too (BN params are nonzero).
        assert sp.count_nonzero(shrunk.params) == sp.count_nonzero(res.params)
        # Every layer's kernel has the predicted widths.
        for layer in deps.layers:
            kernel = shrunk.params
            for key in layer.path:
                kernel = kernel[key]
            assert kernel["kernel"].shape[-2:] == shrunk.widths[layer.name]
        want = _apply(model, {**variables, "params": res.params}, data[:4])
        got = _apply(shrunk.model, shrunk.variables, data[:4])
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_round_to_and_optimizer_state():
    model, variables, data = _setup("resnet20")
    res = sp.prune(model, variables, data, method="pfp", keep_ratio=0.4, chunk_size=8, apply_kwargs={"train": False})
    tx = sp.masked(optax.adam(1e-3), res.masks)
    opt_state = tx.init(res.params)
    shrunk = sp.shrink(model, variables, res.params, x=data[:2], round_to=8, opt_state=opt_state, train=False)
    deps = deps_lib.analyze(model, variables, data[:1], train=False)
    assert sp.count_params(shrunk.params) == sp.predict_param_count(deps, variables["params"], res.params, round_to=8)
    for layer in deps.layers:
        width = shrunk.widths[layer.name][1]
        assert width % 8 == 0 or width == layer.out_channels
    # Optimizer-state subtrees shaped like params are sliced like the params; a step runs.
    def shapes(t):
        return [a.shape for a in jax.tree_util.tree_leaves(t)]
    inner = shrunk.opt_state.inner_state[0]
    assert shapes(inner.mu) == shapes(shrunk.params) == shapes(shrunk.opt_state.masks)
    grads = jax.tree_util.tree_map(jnp.ones_like, shrunk.params)
    updates, _ = tx.update(grads, shrunk.opt_state, shrunk.params)
    assert shapes(updates) == shapes(shrunk.params)
    want = _apply(model, {**variables, "params": res.params}, data[:4])
    np.testing.assert_allclose(np.asarray(shrunk.apply(data[:4], train=False)), np.asarray(want), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="round_to"):
        sp.shrink(model, variables, res.masks, deps=deps, round_to=0)


def test_save_and_load_without_the_original(tmp_path):
    model, variables, data = _setup("catres")
    res = sp.prune(model, variables, data, method="pfp", keep_ratio=0.5, chunk_size=8, apply_kwargs={"train": False})
    shrunk = sp.shrink(model, variables, res.masks, x=data[:2], train=False)
    sp.save_shrunk(tmp_path / "m", shrunk)
    loaded = sp.load_shrunk(tmp_path / "m")  # module rebuilt from the saved class and fields
    assert loaded.widths == shrunk.widths
    np.testing.assert_allclose(
        np.asarray(loaded.apply(data[:2], train=False)), np.asarray(shrunk.apply(data[:2], train=False)), atol=1e-6
    )
    with pytest.raises(ValueError, match="missing"):
        sp.load_shrunk(tmp_path / "nothing")
    (tmp_path / "m" / "shrunk.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        sp.load_shrunk(tmp_path / "m")


def test_zoo_export_by_name(tmp_path):
    model = get_model("resnet20", 10, width=4)
    x = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), x[:1])
    deps = deps_lib.analyze(model, variables, x[:1], train=False)
    removed = deps.removable & (np.arange(len(deps.groups)) % 3 == 0)
    masks, kernel_masks = sp.ones_like_masks(variables["params"]), deps_lib.kernel_masks_for(deps, removed)
    for layer in deps.layers:
        masks = _set_kernel(masks, layer, kernel_masks)
    zoo = {"name": "resnet20", "kwargs": {"num_classes": 10, "width": 4}}
    shrunk = sp.shrink(model, variables, masks, x=x, info={"zoo": zoo}, train=False)
    sp.save_shrunk(tmp_path / "z", shrunk)
    # The library never resolves zoo names: the caller rebuilds its module from the saved info.
    saved = sp.read_shrunk_meta(tmp_path / "z")["info"]["zoo"]
    assert saved == zoo
    kwargs = dict(saved["kwargs"])
    loaded = sp.load_shrunk(tmp_path / "z", lambda: get_model(saved["name"], kwargs.pop("num_classes"), **kwargs))
    assert loaded.meta["info"] == {"zoo": zoo}
    with pytest.raises(ValueError, match="factory"):
        sp.load_shrunk(tmp_path / "z", "resnet20")
    np.testing.assert_allclose(
        np.asarray(loaded.apply(x, train=False)), np.asarray(shrunk.apply(x, train=False)), atol=1e-6
    )


def _set_kernel(masks, layer, kernel_masks):
    from sensprune import paths

    return paths.set_kernel(masks, layer, jnp.asarray(kernel_masks[layer.name]))


def test_ft_joint_mean_narrows_the_residual_streams_in_aligned_counts():
    """ft with joint='mean', round_to=4 drops stream channels jointly, keeps multiples of 4, shrinks unpadded."""
    model, variables, data = _setup("resnet20")
    deps = deps_lib.analyze(model, variables, data[:1], train=False)
    # zero_dead=False: on this random-init net ~80 % of the parameters have an exactly zero gradient over
    # the 8 points (dead BN-shifted ReLUs), so with the reference's zeroing 0.4 is out of reach.
    kwargs = dict(method="ft", keep_ratio=0.4, apply_kwargs={"train": False}, chunk_size=8, zero_dead=False)
    best = sp.prune(model, variables, data, **kwargs)
    joint = sp.prune(model, variables, data, method_options={"joint": "mean", "round_to": 4}, **kwargs)

    def widths(masks):
        params = sp.shrink(model, variables, masks, deps=deps, check=False, train=False).params
        return {layer.name: sp.paths.get_kernel(params, layer).shape[-1] for layer in deps.layers}

    stem = deps.layers[0].name  # conv1 writes the first residual stream
    w = widths(joint.masks)
    # Best member: a stream channel goes only when all 4 producers rank it out, so the stream stays wider
    # than the blocks' inner convs; joint='mean' cuts stream and inner convs alike.
    assert widths(best.masks)[stem] > w[stem]
    assert len({w[layer.name] for layer in deps.layers[:7]}) == 1  # stage 1: stem + 3 blocks x 2 convs
    assert all(n % 4 == 0 or n == layer.out_channels for layer, n in zip(deps.layers, w.values()))
    # Aligned at selection time, so shrinking with round_to=4 adds no channels.
    assert sp.predict_param_count(deps, variables["params"], joint.masks, round_to=4) == sp.predict_param_count(
        deps, variables["params"], joint.masks
    )
    shrunk = sp.shrink(model, variables, joint.masks, x=data[:4], deps=deps, train=False)  # checks outputs
    assert sp.count_params(shrunk.params) == sp.predict_param_count(deps, variables["params"], joint.masks)


def test_joint_scores_against_a_loop_over_groups():
    """joint_scores = mean of per-layer-normalised producer scores over each group (NumPy loop over Group objects)."""
    from sensprune.methods import filter_norm

    model, variables, data = _setup("catres")
    layers = sp.find_layers(model, variables, data[:1])
    ctx = sp.PruneContext(model=model, variables=variables, layers=layers, data=data)
    rng = np.random.default_rng(1)
    scores = {layer.name: rng.uniform(0.1, 5.0, layer.out_channels) for layer in layers}
    got = filter_norm.joint_scores(ctx, scores)
    deps = ctx.dependencies()
    for group in deps.groups:
        members = [scores[n][f] / np.mean(scores[n]) for n, fs in group.producers.items() for f in fs]
        for name, filters in group.producers.items():
            np.testing.assert_allclose(got[name][filters], np.mean(members), rtol=1e-12)


def test_method_options_are_checked():
    model, variables, data = _setup("resnet20")
    kwargs = dict(method="ft", keep_ratio=0.5, apply_kwargs={"train": False})
    with pytest.raises(ValueError, match=r"method_options: \['nope'\].*allowed: joint, round_to"):
        sp.prune(model, variables, data, method_options={"nope": 1}, **kwargs)
    with pytest.raises(ValueError, match="joint must be one of 'best', 'mean'"):
        sp.prune(model, variables, data, method_options={"joint": "max"}, **kwargs)
    with pytest.raises(ValueError, match=r"round_to must be a positive int \(1 = no rounding\), got 0"):
        sp.prune(model, variables, data, method_options={"round_to": 0}, **kwargs)
    with pytest.raises(ValueError, match="allowed: none"):
        sp.prune(model, variables, data, method="wt", keep_ratio=0.5, method_options={"joint": "mean"})
    assert sp.method_options("softnet") == {"joint": "best", "round_to": 1}
