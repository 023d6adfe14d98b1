"""Channel dependency analysis (sensprune.dependencies): known answers and zoo structure."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.models import get_model
from sensprune import dependencies as deps_lib


class CatRes(nn.Module):
    """Concatenation of two convs, BN, a residual add, a strided conv, global pool, fc."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        a = nn.Conv(4, (3, 3), name="a")(x)
        b = nn.Conv(3, (1, 1), name="b")(x)
        h = jnp.concatenate([a, b], axis=-1)  # 7 channels: a0..a3, b0..b2
        h = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(h))
        s = nn.relu(nn.Conv(7, (3, 3), name="c")(h) + h)  # residual stream of 7 channels
        d = nn.relu(nn.Conv(5, (3, 3), strides=2, name="d")(s))
        return nn.Dense(2, name="fc")(jnp.mean(d, axis=(1, 2)))


class Flatten(nn.Module):
    channel_last: bool = True

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(4, (3, 3), name="conv")(x))
        if not self.channel_last:
            h = jnp.transpose(h, (0, 3, 1, 2))
        return nn.Dense(3, name="fc")(nn.Dense(6, name="hidden")(h.reshape(h.shape[0], -1)))


def _init(model, shape=(1, 8, 8, 3)):
    x = jnp.ones(shape, jnp.float32)
    return model.init(jax.random.PRNGKey(0), x), x


def _as_sets(group):
    def simple(d):
        return {k: sorted(v.tolist()) for k, v in d.items()}
    return simple(group.producers), simple(group.consumers)


def test_known_answer_concat_residual():
    model = CatRes()
    variables, x = _init(model)
    deps = deps_lib.analyze(model, variables, x, train=False)
    groups = {}
    for g in deps.groups:
        groups.setdefault((len(g.inputs) > 0, g.output, g.removable), []).append(g)
    # 7 stream channels + 5 channels of d: removable.
    removable = groups[(False, False, True)]
    assert len(removable) == 12 and len(deps.groups) == 12 + 3 + 2
    for k in range(7):
        g = deps.groups[deps.out_group["c"][k]]
        first = ("a", k) if k < 4 else ("b", k - 4)
        producers, consumers = _as_sets(g)
        assert producers == {first[0]: [first[1]], "c": [k]}
        assert consumers == {"c": [k], "d": [k]}
        assert sorted(g.variables) == [
            ("batch_stats", "bn", "mean"), ("batch_stats", "bn", "var"),
            ("params", "bn", "bias"), ("params", "bn", "scale"),
        ]
        assert all(v.tolist() == [k] for v in g.variables.values())
    for j in range(5):
        assert _as_sets(deps.groups[deps.out_group["d"][j]]) == ({"d": [j]}, {"fc": [j]})
    # The input channels feed a and b (not removable); fc's outputs are the model output.
    for c in range(3):
        g = deps.groups[deps.in_group["a"][c]]
        assert g.inputs.tolist() == [c] and _as_sets(g) == ({}, {"a": [c], "b": [c]})
        assert not g.removable and "input" in g.reason
    for j in range(2):
        g = deps.groups[deps.out_group["fc"][j]]
        assert g.output and not g.removable and "output" in g.reason
    assert deps.unsafe == {} and deps.notes == ()


def test_helpers_remove_jointly():
    model = CatRes()
    variables, x = _init(model)
    deps = deps_lib.analyze(model, variables, x, train=False)
    gid = int(deps.out_group["c"][5])  # stream channel 5 = b's filter 1
    # Only one consumer drops it: kept everywhere. Both drop it: removed everywhere.
    one = {"c": np.arange(7) != 5, "d": np.ones(7, bool)}
    assert not deps_lib.joint_removal(deps, one).any()
    both = {"c": np.arange(7) != 5, "d": np.arange(7) != 5}
    removed = deps_lib.joint_removal(deps, both)
    assert np.flatnonzero(removed).tolist() == [gid]
    kin, kout = deps_lib.consumer_masks_for(deps, removed), deps_lib.producer_masks_for(deps, removed)
    assert np.flatnonzero(~kout["b"]).tolist() == [1] and np.flatnonzero(~kout["c"]).tolist() == [5]
    assert not (~kout["a"]).any() and not (~kin["fc"]).any()
    masks = deps_lib.kernel_masks_for(deps, removed)
    assert not masks["c"][..., 5, :].any() and not masks["c"][..., 5].any() and masks["c"].sum() == 9 * 6 * 6
    assert deps_lib.removed_groups(deps, masks)[gid]
    assert deps_lib.variable_keep(deps, removed)[("params", "bn", "scale")].tolist() == [5]


@pytest.mark.parametrize("channel_last", [True, False])
def test_flatten_maps_positions_to_channels(channel_last):
    model = Flatten(channel_last)
    variables, x = _init(model, (1, 5, 5, 2))
    deps = deps_lib.analyze(model, variables, x)
    if channel_last:  # feature = position * C + channel
        for c in range(4):
            g = deps.groups[deps.out_group["conv"][c]]
            assert g.removable and g.consumers["hidden"].tolist() == list(range(c, 100, 4))
    else:  # a transpose moves the channel axis: conservatively one group for all channels
        assert len(set(deps.out_group["conv"].tolist())) == 1
        assert deps.groups[deps.out_group["conv"][0]].consumers["hidden"].size == 100


def _zoo(name, **kw):
    model = get_model(name, 10, **kw)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    return model, deps_lib.analyze(model, variables, x, train=False)


def test_resnet20_streams_are_joint_groups():
    model, deps = _zoo("resnet20")
    assert deps.unsafe == {} and deps.notes == ()
    g = deps.groups[deps.out_group["conv1"][3]]  # stage-1 stream channel 3
    producers, consumers = _as_sets(g)
    assert producers == {"conv1": [3], **{f"layer1_{i}/conv2": [3] for i in range(3)}}
    assert consumers == {
        **{f"layer1_{i}/conv1": [3] for i in range(3)}, "layer2_0/conv1": [3], "layer2_0/downsample_conv": [3],
    }
    assert g.removable
    # Inner block channels are plain conv -> conv groups.
    g = deps.groups[deps.out_group["layer2_1/conv1"][7]]
    assert _as_sets(g) == ({"layer2_1/conv1": [7]}, {"layer2_1/conv2": [7]})
    assert sorted(g.variables) == [("batch_stats", "layer2_1", "bn1", k) for k in ("mean", "var")] + [
        ("params", "layer2_1", "bn1", k) for k in ("bias", "scale")
    ]
    # The last stream feeds fc (removable); fc's outputs are not.
    g = deps.groups[deps.out_group["layer3_2/conv2"][0]]
    assert g.consumers["fc"].tolist() == [0] and g.removable
    assert not deps.removable[deps.out_group["fc"]].any()


def test_densenet_concat_channels_reach_every_later_layer():
    model, deps = _zoo("densenet22")
    assert deps.unsafe == {}
    # dense1_0's new features (channels 24..35 of the block stream) feed the later layers and trans1.
    g = deps.groups[deps.out_group["dense1_0/conv2"][2]]
    assert _as_sets(g)[0] == {"dense1_0/conv2": [2]}
    assert {k: v.tolist() for k, v in g.consumers.items()} == {
        "dense1_1/conv1": [26], "dense1_2/conv1": [26], "trans1/conv1": [26],
    }
    assert g.removable


def test_bottleneck_and_vgg_groups():
    model, deps = _zoo("resnet20", block="bottleneck", width=8)
    g = deps.groups[deps.out_group["layer1_0/conv3"][5]]
    assert set(g.producers) == {"layer1_0/conv3", "layer1_0/downsample_conv", "layer1_1/conv3", "layer1_2/conv3"}
    assert g.removable
    model, deps = _zoo("vgg16_bn", cfg=(8, "M", 16, "M", 16, "M", 16, "M", 16, "M"))
    assert all(len(g.producers) <= 1 for g in deps.groups)
    g = deps.groups[deps.out_group["conv4"][3]]
    assert _as_sets(g) == ({"conv4": [3]}, {"classifier": [3]}) and g.removable
