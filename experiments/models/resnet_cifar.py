"""CIFAR ResNets as in bearpaw/pytorch-classification (the reference's copy).

``resnet20/32/44/56/110``. As in the reference, the number of blocks per stage
is ``n = (depth - 2) // 6`` for both block types and the block type is chosen
by depth: Bottleneck (expansion 4) iff ``depth >= 44``, else BasicBlock. So
``resnet56`` has 3 stages of 9 bottleneck blocks (each 3 convs: 83 conv/fc
layers in all) and ``resnet110`` 3 x 18. Stage widths 16/32/64 (times
``expansion`` at the block outputs); the shortcut is a 1x1 conv + BN (option B)
whenever the stride or the channel count changes.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax

from experiments.models._common import (
    CONV_INIT,
    TORCH_KERNEL_INIT,
    batch_norm,
    global_avg_pool,
    torch_bias_init,
)


def _conv(features: int, kernel: int, stride: int, name: str) -> nn.Conv:
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=stride,
        padding=kernel // 2,
        use_bias=False,
        kernel_init=CONV_INIT,
        name=name,
    )


def _shortcut(x: jax.Array, features: int, stride: int, train: bool) -> jax.Array:
    """Identity, or 1x1 conv + BN when the stride or channel count changes."""
    if stride == 1 and x.shape[-1] == features:
        return x
    y = _conv(features, 1, stride, "downsample_conv")(x)
    return batch_norm(train, "downsample_bn")(y)


class BasicBlock(nn.Module):
    """conv3x3-BN-relu-conv3x3-BN, add shortcut, relu."""

    planes: int
    stride: int = 1
    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = _conv(self.planes, 3, self.stride, "conv1")(x)
        y = nn.relu(batch_norm(train, "bn1")(y))
        y = _conv(self.planes, 3, 1, "conv2")(y)
        y = batch_norm(train, "bn2")(y)
        return nn.relu(y + _shortcut(x, self.planes, self.stride, train))


class Bottleneck(nn.Module):
    """conv1x1-BN-relu-conv3x3(stride)-BN-relu-conv1x1(4x)-BN, add shortcut, relu."""

    planes: int
    stride: int = 1
    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        out = self.planes * self.expansion
        y = _conv(self.planes, 1, 1, "conv1")(x)
        y = nn.relu(batch_norm(train, "bn1")(y))
        y = _conv(self.planes, 3, self.stride, "conv2")(y)
        y = nn.relu(batch_norm(train, "bn2")(y))
        y = _conv(out, 1, 1, "conv3")(y)
        y = batch_norm(train, "bn3")(y)
        return nn.relu(y + _shortcut(x, out, self.stride, train))


BLOCKS: dict[str, type[nn.Module]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


class CifarResNet(nn.Module):
    """bearpaw CIFAR ResNet of depth ``6n + 2``.

    Attributes:
      num_classes: classifier outputs.
      depth: total depth, ``(depth - 2) % 6 == 0``.
      block: ``'basic'``, ``'bottleneck'`` or ``None`` (reference rule:
        bottleneck iff ``depth >= 44``).
      width: channels of the stem and the first stage (16); stages use
        ``width, 2 * width, 4 * width`` planes.
    Blocks are named ``layer{stage}_{i}`` (stage 1..3), the stem ``conv1``/``bn1``,
    the classifier ``fc``. The final 8x8 average pool is a global average pool.
    """

    num_classes: int
    depth: int = 20
    block: str | None = None
    width: int = 16

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.depth < 8 or (self.depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1, got {self.depth}")
        kind = self.block or ("bottleneck" if self.depth >= 44 else "basic")
        if kind not in BLOCKS:
            raise ValueError(
                f"block must be one of {sorted(BLOCKS)} or None, got {self.block!r}"
            )
        block_cls = BLOCKS[kind]
        n = (self.depth - 2) // 6

        x = _conv(self.width, 3, 1, "conv1")(x)
        x = nn.relu(batch_norm(train, "bn1")(x))
        for stage, (mult, stride) in enumerate(((1, 1), (2, 2), (4, 2)), start=1):
            for i in range(n):
                x = block_cls(
                    self.width * mult, stride if i == 0 else 1, name=f"layer{stage}_{i}"
                )(x, train)
        x = global_avg_pool(x)
        return nn.Dense(
            self.num_classes,
            kernel_init=TORCH_KERNEL_INIT,
            bias_init=torch_bias_init(x.shape[-1]),
            name="fc",
        )(x)
