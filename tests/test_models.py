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


def vit_count(classes: int, patch: int = 7, d: int = 64, depth: int = 4, mlp: int = 128, hw: int = 28) -> int:
    # patch conv, class token, positions (patches + 1); per block 2 LayerNorms,
    # q/k/v/out projections (d x d + d each, heads only reshape them), MLP; final LN, head.
    tokens = (hw // patch) ** 2 + 1
    block = 2 * 2 * d + 4 * (d * d + d) + dense(d, mlp) + dense(mlp, d)
    return conv(1, d, patch, bias=True) + d + tokens * d + depth * block + 2 * d + dense(d, classes)


def mobilenet_count(classes: int, stem: int = 16, blocks=((32, 1), (64, 2), (64, 1), (128, 2), (128, 1))) -> int:
    # stem conv + BN; per block a depthwise 3x3 (9 weights per channel) + BN, pointwise 1x1 + BN.
    total, cin = conv(1, stem, 3) + bn(stem), stem
    for c, _ in blocks:
        total += 9 * cin + bn(cin) + conv(cin, c, 1) + bn(c)
        cin = c
    return total + dense(cin, classes)


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
    if name == "vit_tiny":
        return vit_count(classes)
    if name == "mobilenet_small":
        return mobilenet_count(classes)
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
            if isinstance(module, (nn.Dense, nn.Conv, nn.DenseGeneral)):
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
    assert input_shape("vit_tiny") == input_shape("mobilenet_small") == (28, 28, 1)
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
    "vit_tiny": (lambda: get_model("vit_tiny", 10), (28, 28, 1)),
    "mobilenet_small": (lambda: get_model("mobilenet_small", 10), (28, 28, 1)),
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


# --------------------------------------------------------------------------
# ViT and MobileNet: structure, and pruning through sp.prune (small widths).
# --------------------------------------------------------------------------


def test_vit_pooling_and_bad_fields():
    x = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)
    mean = models.ViT(10, patch_size=4, hidden_size=8, depth=1, num_heads=2, mlp_dim=8, pool="mean")
    v = jax.eval_shape(mean.init, rng(0), x)["params"]
    assert "cls_token" not in v and v["pos_embed"].shape == (1, 49, 8)  # 7x7 patches, no class token
    assert v["block0"]["attn"]["query"]["kernel"].shape == (8, 2, 4)  # [in, heads, head dim]
    for bad, match in ((dict(pool="max"), "pool='max'; allowed: cls, mean"),
                       (dict(num_heads=3), "divisible by num_heads=3"), (dict(patch_size=5), "patch_size=5")):
        fields = dict(patch_size=4, hidden_size=8, depth=1, num_heads=2, mlp_dim=8) | bad
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(models.ViT(10, **fields).init, rng(0), x)


def _small_vit():
    return models.ViT(10, patch_size=7, hidden_size=16, depth=2, num_heads=2, mlp_dim=32)


def _small_mobilenet():
    return models.MobileNet(10, stem_width=8, blocks=((16, 2), (16, 1)))


PRUNE_CASES = {"vit": _small_vit, "mobilenet": _small_mobilenet}
ZOO_METHODS = ("sipp", "wt", "pfp", "ft")  # every registered method: tests/test_layer_kinds.py, same layer kinds


@functools.cache
def pruned_case(case: str, method: str, keep: float = 0.6):
    import sensprune as sp

    model = PRUNE_CASES[case]()
    x = normal((24, 28, 28, 1), seed=3)
    variables = synthetic_variables(model, x[:2])
    res = sp.prune(model, variables, x, labels=np.arange(24) % 10, method=method, keep_ratio=keep,
                   key=rng(1), allow_dead_layers=True)
    return model, variables, x, res


def _leaves(tree, prefix=()):
    return {tuple(k.key for k in p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("case", sorted(PRUNE_CASES))
@pytest.mark.parametrize("method", ZOO_METHODS)
def test_zoo_models_prune(case, method):
    _, variables, _, res = pruned_case(case, method)
    params, masks = _leaves(res.params), _leaves(res.masks)
    for path, mask in masks.items():  # pruned entries are exactly zero, kept ones unchanged
        kept = np.asarray(mask, bool)
        assert np.all(np.asarray(params[path])[~kept] == 0), path
    dense = res.info["dense_layers"]
    if method in ("sipp", "wt"):  # weight methods reach the keep ratio and score every kernel
        assert abs(res.keep_ratio - 0.6) <= 0.005 and not dense
        return
    assert res.info["reachable"] == (abs(res.keep_ratio - 0.6) <= 0.005 * 0.6)  # rtol=0.005 is relative
    for path, mask in masks.items():
        name = "/".join(path[:-1])
        kept = np.asarray(mask, bool)
        if path[-1] != "kernel":
            continue
        if name in dense:  # attention projections / depthwise convs are not scored by filter methods,
            # but a removed channel takes its whole depthwise slice along (last axis: one channel each)
            per_channel = kept.reshape(-1, kept.shape[-1])
            assert (per_channel.all(axis=0) | ~per_channel.any(axis=0)).all(), name
            assert ("attn" in name) if case == "vit" else name.endswith("/dw")
        elif kept.ndim == 3 and "attn" in name:  # whole heads: the head axis (out: 0, query/key/value: 1)
            axis = 0 if name.endswith("/out") else 1
            heads = np.moveaxis(kept, axis, 0).reshape(kept.shape[axis], -1)
            assert (heads.all(axis=1) | ~heads.any(axis=1)).all(), name
        else:  # whole channels: the mask is (kept inputs) x (kept outputs, i.e. filters the consumers still read)
            k = kept.reshape(-1, *kept.shape[-2:])
            rows, cols = k.any(axis=(0, 2)), k.any(axis=(0, 1))
            np.testing.assert_array_equal(k, np.broadcast_to(rows[:, None] & cols[None, :], k.shape), err_msg=name)
    assert sum(not np.asarray(m).all() for m in masks.values()) >= 2  # something was pruned


def test_vit_pfp_shrinks_mlp_units_and_heads():
    import sensprune as sp

    model, variables, x, res = pruned_case("vit", "pfp")
    layers = [layer for layer in sp.find_layers(model, variables, x[:1]) if layer.name not in res.info["dense_layers"]]
    deps = sp.analyze_dependencies(model, variables, x[:1], layers=layers)
    shrunk = sp.shrink(model, variables, res.masks, x=x[:4], deps=deps)
    assert sp.count_params(shrunk.params) == sp.predict_param_count(deps, variables["params"], res.masks)
    masked_out = model.apply({"params": res.params}, x)
    np.testing.assert_allclose(shrunk.apply(x), masked_out, rtol=1e-5, atol=1e-5 * float(jnp.abs(masked_out).max()))
    for block in ("block0", "block1"):
        rows = np.asarray(res.masks[block]["mlp"]["fc2"]["kernel"]).any(axis=1)  # MLP units still read
        assert shrunk.params[block]["mlp"]["fc1"]["kernel"].shape == (16, int(rows.sum()))
        heads = int(np.asarray(res.masks[block]["attn"]["out"]["kernel"]).any(axis=(1, 2)).sum())  # heads still read
        assert shrunk.params[block]["attn"]["query"]["kernel"].shape == (16, heads, 8)
    assert sum(int(r.sum()) for r in (np.asarray(res.masks[b]["mlp"]["fc2"]["kernel"]).any(axis=1)
                                      for b in ("block0", "block1"))) < 64


def test_pipeline_records_layers_a_filter_method_left_dense():
    import types

    import sensprune as sp
    from experiments import pipeline

    # attention projections are pruned as heads now; depthwise convs are still not scored by filter methods
    model, variables, x, res = pruned_case("mobilenet", "pfp")
    layers = sp.find_layers(model, variables, x[:1])
    left = [layer.name for layer in layers if layer.name not in res.layer_kept]
    assert left and all(name.endswith("/dw") for name in left) and set(left) <= set(res.info["dense_layers"])
    exp = types.SimpleNamespace(layers=layers, dense_flops=sp.dense_flops(layers))
    meta = pipeline._prune_meta(exp, res)
    assert list(meta["layer_kept"]) == [layer.name for layer in layers]
    assert meta["layer_kept"] == sp.layer_nonzero(res.params, layers)
    assert all(meta["layer_kept"][name] > 0 for name in left)
    assert meta["flops"] == pytest.approx(sp.flops(res.params, layers) / exp.dense_flops, rel=1e-9)
    assert meta["flops"] > res.flops / exp.dense_flops  # the depthwise convs' FLOPs are counted
