"""Initialisers, layer helpers and ResNet blocks shared by the model zoo.

Everything mirrors its PyTorch equivalent (bearpaw/pytorch-classification for
the CIFAR nets, torchvision for the ImageNet ones).
"""

from __future__ import annotations

import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

# Kaiming normal, fan_out, gain sqrt(2): what bearpaw's CIFAR nets and torchvision
# use for convolutions (``normal(0, sqrt(2 / (k * k * out_channels)))``).
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# PyTorch's default Linear/Conv weight init, ``kaiming_uniform(a=sqrt(5))``,
# i.e. ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.
TORCH_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# torchvision / bearpaw VGG classifier init.
VGG_LINEAR_INIT = nn.initializers.normal(stddev=0.01)


def torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default bias init ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def batch_norm(train: bool, name: str) -> nn.BatchNorm:
    """BatchNorm with PyTorch's defaults (momentum 0.1 there = 0.9 here, eps 1e-5)."""
    return nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name
    )


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over the spatial axes of an NHWC map -> ``[B, C]``."""
    return jnp.mean(x, axis=(1, 2))


def conv(features: int, kernel: int, stride: int, name: str) -> nn.Conv:
    """Bias-free square conv with PyTorch-style symmetric padding ``kernel // 2``."""
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=stride,
        padding=kernel // 2,
        use_bias=False,
        kernel_init=CONV_INIT,
        name=name,
    )


def fc_head(x: jax.Array, num_classes: int, zero_bias: bool = False) -> jax.Array:
    """Global average pool, then the classifier ``fc`` with PyTorch's Linear init.

    The bias is ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` as in PyTorch, or zeros
    when ``zero_bias`` (bearpaw's Wide ResNet).
    """
    x = global_avg_pool(x)
    return nn.Dense(
        num_classes,
        kernel_init=TORCH_KERNEL_INIT,
        bias_init=nn.initializers.zeros if zero_bias else torch_bias_init(x.shape[-1]),
        name="fc",
    )(x)


def has_projection(block: nn.Module, name: str, identity_when: bool) -> bool:
    """Whether ``block`` uses its projection shortcut ``name``.

    At init the architecture rule decides (``not identity_when``); afterwards the
    presence of the projection's params does, so a model whose channels were
    removed by :func:`sensprune.shrink` (a narrower stream) keeps its structure.
    """
    if block.is_initializing():
        return not identity_when
    return block.has_variable("params", name)


def shortcut(
    x: jax.Array, features: int, stride: int, train: bool, block: nn.Module | None = None
) -> jax.Array:
    """Identity, or 1x1 conv + BN (``downsample_conv``/``downsample_bn``) when the
    stride or channel count changes (option B). With ``block`` (the calling
    module), an initialised model decides by the presence of the conv's params."""
    identity = stride == 1 and x.shape[-1] == features
    if block is not None:
        identity = not has_projection(block, "downsample_conv", identity)
    if identity:
        return x
    y = conv(features, 1, stride, "downsample_conv")(x)
    return batch_norm(train, "downsample_bn")(y)


class BasicBlock(nn.Module):
    """conv3x3(stride)-BN-relu-conv3x3-BN, add shortcut, relu (expansion 1).

    ``base_width`` is accepted for a uniform block signature and ignored.
    """

    planes: int
    stride: int = 1
    base_width: int = 64
    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = conv(self.planes, 3, self.stride, "conv1")(x)
        y = nn.relu(batch_norm(train, "bn1")(y))
        y = conv(self.planes, 3, 1, "conv2")(y)
        y = batch_norm(train, "bn2")(y)
        return nn.relu(y + shortcut(x, self.planes, self.stride, train, self))


class Bottleneck(nn.Module):
    """conv1x1-BN-relu-conv3x3(stride)-BN-relu-conv1x1(4x)-BN, add shortcut, relu.

    The stride sits in the 3x3 conv (torchvision v1.5). The inner width is
    ``planes * base_width / 64``: ``planes`` for the default 64 (bearpaw CIFAR
    and standard torchvision ResNets), ``2 * planes`` for Wide ResNet-50-2.
    """

    planes: int
    stride: int = 1
    base_width: int = 64
    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        inner = int(self.planes * (self.base_width / 64.0))
        out = self.planes * self.expansion
        y = conv(inner, 1, 1, "conv1")(x)
        y = nn.relu(batch_norm(train, "bn1")(y))
        y = conv(inner, 3, self.stride, "conv2")(y)
        y = nn.relu(batch_norm(train, "bn2")(y))
        y = conv(out, 1, 1, "conv3")(y)
        y = batch_norm(train, "bn3")(y)
        return nn.relu(y + shortcut(x, out, self.stride, train, self))


RESNET_BLOCKS: dict[str, type[nn.Module]] = {
    "basic": BasicBlock,
    "bottleneck": Bottleneck,
}
