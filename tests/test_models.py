"""Tests for the model zoo (experiments.models).

Parameter counts (``params`` only, BN scale/bias included, ``batch_stats``
excluded) are checked against torchvision's published numbers for the ImageNet
nets and against arithmetic written here from the architecture descriptions
for the others, independent of the Flax modules.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import models
from experiments.models import (
    MODEL_DATASET_FAMILY,
    MODELS,
    CifarResNet,
    ImageNetVGG,
    get_model,
    input_shape,
)

# --------------------------------------------------------------------------
# Independent parameter-count arithmetic.
# --------------------------------------------------------------------------


def bn(c: int) -> int:
    return 2 * c  # scale + bias


def conv(cin: int, cout: int, k: int, bias: bool = False) -> int:
    return k * k * cin * cout + (cout if bias else 0)


def dense(cin: int, cout: int) -> int:
    return cin * cout + cout


def fcnet_count(sizes: list[int]) -> int:
    return sum(dense(a, b) for a, b in zip(sizes[:-1], sizes[1:]))


def lenet5_count(hw: int, cin: int, classes: int) -> int:
    # conv3x3 VALID -> pool2 -> conv3x3 VALID -> pool2 -> fc1 conv over the map.
    s = ((hw - 2) // 2 - 2) // 2
    return (
        conv(cin, 6, 3, True)
        + conv(6, 16, 3, True)
        + conv(16, 120, s, True)
        + dense(120, 84)
        + dense(84, classes)
    )


def cifar_resnet_count(depth: int, classes: int, bottleneck: bool | None = None) -> int:
    # bearpaw (reference copy): n = (depth-2)//6 blocks per stage for both block
    # types; bottleneck iff depth >= 44; option-B shortcut (1x1 conv + BN).
    n = (depth - 2) // 6
    if bottleneck is None:
        bottleneck = depth >= 44
    exp = 4 if bottleneck else 1
    total = conv(3, 16, 3) + bn(16)
    cin = 16
    for planes, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(n):
            s = stride if i == 0 else 1
            if bottleneck:
                total += conv(cin, planes, 1) + bn(planes)
                total += conv(planes, planes, 3) + bn(planes)
                total += conv(planes, 4 * planes, 1) + bn(4 * planes)
            else:
                total += conv(cin, planes, 3) + bn(planes)
                total += conv(planes, planes, 3) + bn(planes)
            if s != 1 or cin != planes * exp:
                total += conv(cin, planes * exp, 1) + bn(planes * exp)
            cin = planes * exp
    return total + dense(64 * exp, classes)


VGG_CFGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
         512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512,
         "M", 512, 512, 512, 512, "M"],
}  # fmt: skip


def cifar_vgg_count(depth: int, use_bn: bool, classes: int, *, cin: int = 3, cfg=None, last: int = 512) -> int:
    total = 0
    for v in cfg or VGG_CFGS[depth]:
        if v == "M":
            continue
        total += conv(cin, v, 3, bias=True) + (bn(v) if use_bn else 0)
        cin = v
    return total + dense(last, classes)


def wrn_count(depth: int, k: int, classes: int) -> int:
    n = (depth - 4) // 6
    total = conv(3, 16, 3)
    cin = 16
    for c in (16 * k, 32 * k, 64 * k):
        for _ in range(n):
            total += bn(cin) + conv(cin, c, 3) + bn(c) + conv(c, c, 3)
            if cin != c:
                total += conv(cin, c, 1)
            cin = c
    return total + bn(cin) + dense(cin, classes)


def densenet_count(depth: int, growth: int, classes: int) -> int:
    n = (depth - 4) // 6
    c = 2 * growth
    total = conv(3, c, 3)
    for b in range(3):
        for _ in range(n):
            total += bn(c) + conv(c, 4 * growth, 1) + bn(4 * growth)
            total += conv(4 * growth, growth, 3)
            c += growth
        if b < 2:
            out = c // 2
            total += bn(c) + conv(c, out, 1)
            c = out
    return total + bn(c) + dense(c, classes)


# torchvision's published parameter counts (1000 classes).
TORCHVISION_COUNTS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "wide_resnet50_2": 68_883_240,
    "vgg11_bn_imagenet": 132_868_840,
    "vgg16_bn_imagenet": 138_365_992,
}


def expected_count(name: str, classes: int) -> int:
    if name in TORCHVISION_COUNTS:
        assert classes == 1000
        return TORCHVISION_COUNTS[name]
    if name == "lenet300_100":
        return fcnet_count([784, 300, 100, classes])
    if name == "lenet500_300_100":
        return fcnet_count([784, 500, 300, 100, classes])
    if name == "lenet5":
        return lenet5_count(28, 1, classes)
    if name.startswith("resnet"):
        return cifar_resnet_count(int(name[len("resnet"):]), classes)
    if name == "vgg_small_bn":
        small = (32, 32, "M", 64, 64, "M", 128, 128, "M", 256, 256, "M")
        return cifar_vgg_count(0, True, classes, cin=1, cfg=small, last=256)
    if name.startswith("vgg"):
        depth = int(name[3:5])
        return cifar_vgg_count(depth, name.endswith("_bn"), classes)
    if name.startswith("wrn"):
        depth, k = map(int, name[3:].split("_"))
        return wrn_count(depth, k, classes)
    if name.startswith("densenet"):
        depth = int(name[len("densenet"):])
        return densenet_count(depth, 40 if depth == 190 else 12, classes)
    raise AssertionError(f"no expected count for {name}")


def rng(seed: int) -> jax.Array:
    """A typed key using the RBG PRNG: much cheaper to compile on CPU than threefry."""
    return jax.random.key(seed, impl="rbg")


def normal(shape, seed: int = 1) -> jax.Array:
    """Test inputs from NumPy (avoids compiling a JAX sampler per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def n_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


# --------------------------------------------------------------------------
# Every registered model: shapes, counts, layer calls (all via eval_shape).
# --------------------------------------------------------------------------


def test_formulas_match_published_figures():
    # Cross-check the arithmetic above against published sizes: bearpaw README
    # (ResNet-110 1.70M, WRN-28-10 36.48M, DenseNet-BC-100-12 0.77M,
    # DenseNet-BC-190-40 25.62M, VGG-19-BN 20.04M), WRN paper (WRN-16-8 11.0M),
    # ResNet-20 with option-B shortcuts 0.27M.
    assert cifar_resnet_count(20, 10) == 272_474
    assert round(cifar_resnet_count(110, 10) / 1e6, 2) == 1.70
    assert round(wrn_count(16, 8, 10) / 1e6, 1) == 11.0
    assert round(wrn_count(28, 10, 10) / 1e6, 2) == 36.48
    assert round(densenet_count(100, 12, 10) / 1e6, 2) == 0.77
    assert round(densenet_count(190, 40, 10) / 1e6, 2) == 25.62
    assert round(cifar_vgg_count(19, True, 10) / 1e6, 2) == 20.04
    assert fcnet_count([784, 300, 100, 10]) == 266_610
    assert lenet5_count(32, 1, 10) == 81_194  # reference layout on Resize(32) MNIST


def test_registry_covers_expected_names():
    for name in MODELS:
        assert MODEL_DATASET_FAMILY[name] in ("mnist", "cifar", "imagenet")
    assert set(TORCHVISION_COUNTS) == {
        n for n, f in MODEL_DATASET_FAMILY.items() if f == "imagenet"
    }
    for name in ("lenet300_100", "lenet5", "resnet20", "resnet56", "resnet110",
                 "vgg16_bn", "wrn16_8", "densenet22", "densenet100"):  # fmt: skip
        assert name in MODELS


def _trace_model(model: nn.Module, x: jax.ShapeDtypeStruct):
    """Abstract ``init_with_output`` (one trace, no compute).

    Returns the output shape, the variables' shapes and the module paths of every
    Dense/Conv call; also checks every BatchNorm uses PyTorch's momentum / eps.
    """
    calls = []

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__":
            if isinstance(module, (nn.Dense, nn.Conv)):
                calls.append(tuple(module.path))
            if isinstance(module, nn.BatchNorm):
                assert (module.momentum, module.epsilon) == (0.9, 1e-5)
                assert module.use_running_average  # train=False by default
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        out, variables = jax.eval_shape(model.init_with_output, jax.random.key(0), x)
    return out, variables, calls


@pytest.mark.parametrize("name", sorted(MODELS))
def test_registered_model_shapes_and_counts(name):
    classes = 1000 if MODEL_DATASET_FAMILY[name] == "imagenet" else 10
    model = get_model(name, classes)
    x = jax.ShapeDtypeStruct((2, *input_shape(name)), jnp.float32)
    out, variables, calls = _trace_model(model, x)
    assert out.shape == (2, classes)
    assert out.dtype == jnp.float32
    assert n_params(variables["params"]) == expected_count(name, classes)

    # Each Dense/Conv is called exactly once and holds exactly one kernel.
    assert len(calls) == len(set(calls))
    flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    kernels = {tuple(k.key for k in p[:-1]) for p, _ in flat if p[-1].key == "kernel"}
    assert set(calls) == kernels


def test_input_shapes():
    assert input_shape("lenet300_100") == (28, 28, 1)
    assert input_shape("resnet20") == (32, 32, 3)
    assert input_shape("densenet22") == (32, 32, 3)
    assert input_shape("resnet50") == (224, 224, 3)
    assert input_shape("vgg16_bn_imagenet") == (224, 224, 3)


def test_unknown_name_lists_available():
    with pytest.raises(ValueError, match="unknown network 'nope'; available: ") as e:
        get_model("nope", 10)
    msg = str(e.value)
    for name in ("lenet300_100", "resnet20", "vgg16_bn", "resnet50"):
        assert name in msg
    with pytest.raises(ValueError, match="unknown network"):
        input_shape("nope")


def test_resnet_depth_rules():
    # Reference rule: n = (depth-2)//6 blocks per stage; bottleneck iff depth >= 44.
    def n_kernels(name):
        m = get_model(name, 10)
        v = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
        leaves = jax.tree_util.tree_flatten_with_path(v["params"])[0]
        return sum(p[-1].key == "kernel" for p, _ in leaves)

    assert n_kernels("resnet20") == 1 + 18 + 2 + 1  # stem, convs, 2 shortcuts, fc
    assert n_kernels("resnet56") == 1 + 3 * 9 * 3 + 3 + 1  # 9 bottlenecks/stage
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(10, depth=21).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_lenet5_fc1_covers_map():
    for hw, cin in ((28, 1), (32, 1), (32, 3)):
        m = get_model("lenet5", 10)
        v = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, hw, hw, cin)))
        s = ((hw - 2) // 2 - 2) // 2
        assert v["params"]["fc1"]["kernel"].shape == (s, s, 16, 120)
        assert n_params(v["params"]) == lenet5_count(hw, cin, 10)


def test_width_overrides():
    m = get_model("lenet300_100", 10, widths=(30, 10))
    v = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    assert n_params(v["params"]) == fcnet_count([784, 30, 10, 10])
    m = get_model("resnet20", 10, width=8)
    v = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert v["params"]["fc"]["kernel"].shape == (32, 10)


# --------------------------------------------------------------------------
# Real forward passes (batch 2).
# --------------------------------------------------------------------------

SMALL_CASES = {
    "lenet300_100": (lambda: get_model("lenet300_100", 10), (28, 28, 1)),
    "lenet5": (lambda: get_model("lenet5", 10), (28, 28, 1)),
    "resnet20": (lambda: get_model("resnet20", 10), (32, 32, 3)),
    "resnet8_bottleneck": (
        lambda: CifarResNet(10, depth=8, block="bottleneck"),
        (32, 32, 3),
    ),
    "vgg16_bn": (lambda: get_model("vgg16_bn", 10), (32, 32, 3)),
    "wrn10_1": (lambda: models.wrn(10, 1)(num_classes=10), (32, 32, 3)),
    "densenet22": (lambda: get_model("densenet22", 10), (32, 32, 3)),
}


def synthetic_variables(model: nn.Module, x: jax.Array, seed: int = 0):
    """Variables with the model's structure, filled from NumPy (He-scaled kernels,
    small biases, unit BN scale / running var). Avoids compiling the init RNG,
    which is the most expensive part of these tests on CPU; the real
    initialisers are exercised in ``test_init_statistics_torch_like``."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    gen = np.random.default_rng(seed)

    def fill(path, leaf):
        key = path[-1].key
        if key == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = gen.standard_normal(leaf.shape) * math.sqrt(2.0 / fan_in)
        elif key in ("scale", "var"):
            value = np.ones(leaf.shape)
        else:  # bias, BN bias, running mean
            value = 0.1 * gen.standard_normal(leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.cache
def run_case(case: str):
    """Eval and train forward passes of a small case in ONE jitted call.

    Compiling on CPU dominates the cost, so each case is compiled once and the
    result is shared by the tests below.
    """
    make, shape = SMALL_CASES[case]
    model = make()
    x = normal((2, *shape))
    variables = synthetic_variables(model, x)

    @jax.jit
    def eval_and_train(v, x):
        out = model.apply(v, x, train=False)
        out_t, updates = model.apply(v, x, train=True, mutable=["batch_stats"])
        return out, out_t, updates

    return x, variables, *eval_and_train(variables, x)


@pytest.mark.parametrize("case", sorted(SMALL_CASES))
def test_forward_train_and_eval(case):
    _, variables, out, out_t, updates = run_case(case)
    assert out.shape == out_t.shape == (2, 10)
    assert np.all(np.isfinite(np.asarray(out)))
    assert np.all(np.isfinite(np.asarray(out_t)))
    has_bn = "batch_stats" in variables
    assert ("batch_stats" in updates) == has_bn
    if has_bn:
        old = jax.tree_util.tree_leaves(variables["batch_stats"])
        new = jax.tree_util.tree_leaves(updates["batch_stats"])
        assert len(old) == len(new)
        assert all(not np.allclose(a, b) for a, b in zip(old, new))
        # Eval mode uses running stats: outputs differ from batch-stat outputs.
        assert not np.allclose(out, out_t)
    else:
        np.testing.assert_allclose(out, out_t)  # train flag is a no-op


def test_bn_momentum_matches_pytorch():
    # running = 0.9 * running + 0.1 * batch (PyTorch momentum 0.1); the stem BN
    # sees conv1's output (no bias). Flax tracks the biased batch variance.
    x, v, _, _, upd = run_case("resnet8_bottleneck")
    conv_out = jax.lax.conv_general_dilated(
        x, v["params"]["conv1"]["kernel"], (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )  # fmt: skip
    old, new = v["batch_stats"]["bn1"], upd["batch_stats"]["bn1"]
    np.testing.assert_allclose(
        new["mean"], 0.9 * old["mean"] + 0.1 * conv_out.mean(axis=(0, 1, 2)),
        rtol=1e-4, atol=1e-6,
    )  # fmt: skip
    np.testing.assert_allclose(
        new["var"], 0.9 * old["var"] + 0.1 * conv_out.var(axis=(0, 1, 2)),
        rtol=1e-4, atol=1e-6,
    )  # fmt: skip


def test_init_statistics_torch_like_bottleneck():
    model = CifarResNet(10, depth=8, block="bottleneck")
    v = jax.jit(model.init)(rng(0), jnp.zeros((1, 32, 32, 3)))
    k = v["params"]["layer3_0"]["conv2"]["kernel"]  # 3x3, 64 -> 64: kaiming fan_out
    assert k.shape == (3, 3, 64, 64)
    assert abs(float(k.std()) - math.sqrt(2.0 / (9 * 64))) < 0.01
    fc = v["params"]["fc"]  # PyTorch Linear default: U(+-1/sqrt(fan_in))
    bound = 1 / math.sqrt(256)
    assert float(jnp.abs(fc["kernel"]).max()) <= bound
    assert abs(float(fc["kernel"].std()) * math.sqrt(3) / bound - 1) < 0.1
    assert 0 < float(jnp.abs(fc["bias"]).max()) <= bound
    bn1 = v["params"]["bn1"]
    assert np.all(bn1["scale"] == 1) and np.all(bn1["bias"] == 0)
    stats = v["batch_stats"]["bn1"]
    assert np.all(stats["mean"] == 0) and np.all(stats["var"] == 1)

    model = get_model("lenet5", 10)  # conv with PyTorch default weight and bias init
    v = jax.jit(model.init)(rng(1), jnp.zeros((1, 28, 28, 1)))
    b = v["params"]["conv1"]["bias"]
    assert 0 < float(jnp.abs(b).max()) <= 1 / math.sqrt(9)
    assert float(jnp.abs(v["params"]["conv1"]["kernel"]).max()) <= 1 / math.sqrt(9)


def test_imagenet_vgg_small_with_dropout():
    model = ImageNetVGG(5, cfg=(8, "M"), hidden=16)
    x = normal((2, 28, 28, 3))  # 28 -> 14 -> adaptive-pooled to 7
    v = jax.jit(model.init)(rng(0), x)
    assert v["params"]["fc6"]["kernel"].shape == (7, 7, 8, 16)

    @jax.jit
    def run(v, x, key):
        out = model.apply(v, x)
        out_t, _ = model.apply(
            v, x, train=True, mutable=["batch_stats"], rngs={"dropout": key}
        )
        return out, out_t

    out, out_t = run(v, x, rng(2))
    assert out.shape == out_t.shape == (2, 5)
    with pytest.raises(ValueError, match="multiple of 7x7"):
        bad = jax.ShapeDtypeStruct((1, 30, 30, 3), jnp.float32)
        jax.eval_shape(model.init, rng(0), bad)


def test_init_statistics_torch_like():
    model = CifarResNet(10, depth=8)
    v = jax.jit(model.init)(rng(0), jnp.zeros((1, 32, 32, 3)))
    k = v["params"]["layer3_0"]["conv2"]["kernel"]  # 3x3, 64 -> 64
    assert abs(float(k.std()) - math.sqrt(2.0 / (9 * 64))) < 0.01
    fc = v["params"]["fc"]
    bound = 1 / math.sqrt(64)
    assert float(jnp.abs(fc["kernel"]).max()) <= bound
    assert float(jnp.abs(fc["bias"]).max()) <= bound
    assert float(jnp.abs(fc["bias"]).max()) > 0
    bn1 = v["params"]["bn1"]
    assert np.all(bn1["scale"] == 1) and np.all(bn1["bias"] == 0)
